"""The repudiability audit: Theorem 1 executable, planted out-of-distribution points ranked first, the outputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import folder_order, tiny_config, write_image_folder

import rayforge as rf
from rayforge.errors import RayforgeError
from rayforge.train.run import TrainingRun


def _train_folder(tmp_path, root, **train):
    cfg = tiny_config(data={"dataset": "imagefolder", "data_root": str(root)}, train=train)
    rf.train(cfg, tmp_path / "run", progress=False)
    return tmp_path / "run"


def _points(run_dir):
    return pq.read_table(run_dir / "audit" / "points.parquet").to_pandas().set_index("point")


@pytest.fixture(scope="module")
def theorem_run(tmp_path_factory):
    """Theorem 1's setting: logistic regression, batch size 1; x_2..x_n on an affine subspace Γ of the 4x4 pixel
    space (only pixels 0 and 1 vary; two classes, ten near-copies each, so every one has neighbours), x_1 off it.
    x_1 lies by class 0's points in Γ but is labelled 1 (y_1 != σ(wᵀx_1), the theorem's other assumption), so
    only its own off-Γ component can fit it and its gradient stays large: its membership is visible."""
    tmp = tmp_path_factory.mktemp("theorem")
    base = np.full(16, 128)
    images, labels = [], []
    for k in range(10):
        for label, (p0, p1) in ((0, (200 + k, 60)), (1, (60, 200 + k))):
            x = base.copy()
            x[0], x[1] = p0, p1
            images.append(x)
            labels.append(label)
    off = base.copy()
    off[0], off[1] = 205, 60
    off[4:] = np.tile([255, 0], 6)  # far from Γ: every other pixel moves
    names = [f"on_{i:02d}" for i in range(len(images))] + ["zz_off"]
    images, labels = np.array(images + [off]).reshape(-1, 4, 4), np.array(labels + [1])
    root = write_image_folder(tmp / "data", (images, labels), (images[:-1], labels[:-1]), names)
    run_dir = _train_folder(tmp, root, batch_size=1, epochs=3, lr=0.1, checkpoint_every=7)
    rf.audit(run_dir, use_ray=False, progress=False)
    x1 = [f.stem for f in folder_order(root)].index("zz_off")
    return run_dir, x1


def test_theorem1_off_subspace_point_is_not_repudiable(theorem_run):
    run_dir, x1 = theorem_run
    points = _points(run_dir)
    assert len(points) == 21 and (points["appearances"] == 3).all()  # every point audited at its 3 steps
    assert not points.loc[x1, "repudiable"] and "Theorem 1" in points.loc[x1, "reason"]
    others = points.drop(index=x1)
    assert others["repudiable"].all() and (others["reason"] == "").all()
    assert points["score"].idxmax() == x1

    # The theorem's bound, per step: min_j ‖g_1 − g_j‖ >= ‖p_1 − y_1‖·dist(x̃_1, Γ̃), with ‖g_1‖ = ‖p_1 − y_1‖·‖x̃_1‖
    # (x̃ = the normalised input with the bias's 1): the unmatched share is at least dist(x̃_1, Γ̃)/‖x̃_1‖.
    run = TrainingRun.open(run_dir)
    x = run.tensor_data(run.load_dataset(), "cpu").x.reshape(21, -1).double().numpy()
    x = np.hstack([x, np.ones((21, 1))])
    rest = np.delete(x, x1, axis=0).T
    coef = np.linalg.lstsq(rest, x[x1], rcond=None)[0]
    bound = np.linalg.norm(x[x1] - rest @ coef) / np.linalg.norm(x[x1])
    assert bound > 0.5  # far off Γ
    assert points.loc[x1, "unmatched"] >= bound - 1e-6
    assert others["unmatched"].max() < 0.2  # on Γ, near-copies stand in for each other
    assert points.loc[x1, "unmatched_influence"] > points["self_influence"].mean()

    summary = json.loads((run_dir / "audit" / "summary.json").read_text())
    assert summary["points"] == 21 and summary["not_repudiable"] == 1
    assert summary["least_repudiable"][0]["point"] == x1
    logged = [json.loads(line) for line in (run_dir / "metrics" / "audit.jsonl").read_text().splitlines()]
    assert logged[-1]["summary"]["audit/not_repudiable"] == 1
    assert (run_dir / "report" / "audit_least_repudiable.png").stat().st_size > 0
    from rayforge.audit import audit_report

    line = audit_report(run_dir)  # what `rayforge report` appends to tables.md
    assert line.startswith("Repudiability audit: 95.2% of 21 points repudiable (1 not") and f"#{x1} (" in line


def test_planted_out_of_distribution_points_rank_first(tmp_path):
    """Ten classes of noisy prototypes (8x8) plus three planted images unlike any of them and unlike each other
    (a checkerboard, stripes, a corner block), with labels of the in-distribution classes."""
    from rayforge.data.synthetic import make_synthetic

    train, test = make_synthetic(120, 40, [1, 8, 8], seed=2)
    checker = np.indices((8, 8)).sum(0) % 2 * 255
    stripes = np.repeat([[0, 255]], 4, axis=0).reshape(1, 8).repeat(8, axis=0)
    block = np.zeros((8, 8))
    block[:4, :4] = 255
    planted = np.stack([checker, stripes, block])
    images = np.concatenate([train.images[:, 0], planted])
    labels = np.concatenate([train.labels, [3, 5, 7]])
    names = [f"in_{i:03d}" for i in range(120)] + ["ood_checker", "ood_stripes", "ood_block"]
    root = write_image_folder(tmp_path / "data", (images, labels), (test.images[:, 0], test.labels), names)
    run_dir = _train_folder(tmp_path, root, batch_size=10, epochs=3, lr=0.1)
    rf.audit(run_dir, use_ray=False, progress=False)

    points = _points(run_dir)
    order = [f.stem for f in folder_order(root)]
    ood = {order.index(n) for n in names[-3:]}
    ranked = points.sort_values("score", ascending=False).index.tolist()
    assert set(ranked[:3]) == ood
    assert not points.loc[list(ood), "repudiable"].any()
    assert points.drop(index=list(ood))["repudiable"].mean() > 0.9


def test_audit_resumes_and_refuses_other_parameters(theorem_run):
    """A second audit of the same run with the same parameters reuses the stored segments (same rows, byte for
    byte); other parameters are refused with one line instead of mixing their rows in."""
    run_dir, _ = theorem_run
    rows = run_dir / "audit" / "substitution" / "rows.parquet"
    before = rows.read_bytes()
    rf.audit(run_dir, use_ray=False, progress=False)
    assert rows.read_bytes() == before
    with pytest.raises(RayforgeError, match="other parameters") as err:
        rf.audit(run_dir, pool=7, use_ray=False, progress=False)
    assert "\n" not in str(err.value)
