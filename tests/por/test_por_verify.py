"""PoR verification: valid PoRs pass every step selection; each tampering is caught with a named reason (or as a
malformed artifact); the artifact is never unpickled and no path is taken from it."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from rayforge.errors import MalformedArtifact, RayforgeError
from rayforge.por import DEFAULT_TOL, parse_selection, verify_por
from rayforge.rebuild.forged_log import ForgedLogs
from rayforge.train.log import ckpt_name, read_steps, steps_table
from rayforge.io import write_parquet
from rayforge.train.run import TrainingRun


def _copy(por: dict, tmp_path: Path) -> Path:
    dst = tmp_path / "por"
    shutil.copytree(por["por"], dst)
    return dst


def _rewrite_steps(por_dir: Path, edit) -> None:
    steps = read_steps(por_dir / "steps.parquet")
    batch, flip, lr = [b.copy() for b in steps.batch], [f.copy() for f in steps.flip], steps.lr.copy()
    edit(batch, flip, lr)
    write_parquet(por_dir / "steps.parquet", steps_table(batch, flip, lr))


def _codes(report) -> set[str]:
    return set(report.reason_codes)


# ------------------------------------------------------------------------------------------------ valid PoRs

@pytest.mark.parametrize("selection", ["all", "topq:1", "random:3"])
def test_valid_por_passes(plain_por, modified_por, selection):
    for por in (plain_por, modified_por):
        report = verify_por(por["por"], model_path=por["deployed"], steps=selection, seed=1)
        assert report.valid, [str(r) for r in report.reasons]
        assert report.segments and all(s.ok and s.distance == 0.0 for s in report.segments)
        assert report.epsilon_measured == por["manifest"]["epsilon"]  # exactly: one deterministic l2
        total = len(por["manifest"]["checkpoints"]) - 1
        expected = {"all": total, "random:3": 3}.get(selection)
        if expected:
            assert len(report.segments) == expected
        doc = json.loads(json.dumps(report.to_json()))
        assert doc["valid"] is True and doc["tol"] == DEFAULT_TOL


def test_modified_por_checks_velocity(modified_por):
    report = verify_por(modified_por["por"], steps="all")
    assert report.valid and report.velocity_tol is not None
    assert all(s.velocity_distance == 0.0 for s in report.segments)


def test_random_selection_is_reproducible_from_the_printed_seed(plain_por):
    first = verify_por(plain_por["por"], steps="random:2")
    assert first.seed is not None
    again = verify_por(plain_por["por"], steps="random:2", seed=first.seed)
    assert [(s.start, s.stop) for s in again.segments] == [(s.start, s.stop) for s in first.segments]
    assert len({(s.start, s.stop) for s in first.segments}) == 2


def test_topq_picks_the_largest_updates_per_epoch(old_por):
    report = verify_por(old_por["por"], steps="all")
    norms = {(s.start, s.stop): s.update_norm for s in report.segments}
    top = verify_por(old_por["por"], steps="topq:1")
    # 6 steps per epoch, checkpoints every 3: epoch 0 holds segments 0-3 and 3-6, epoch 1 holds 6-9 and 9-12
    want = [max([(0, 3), (3, 6)], key=norms.get), max([(6, 9), (9, 12)], key=norms.get)]
    assert [(s.start, s.stop) for s in top.segments] == want


def test_bad_arguments():
    for bad in ("some", "topq:0", "random:x", "topq"):
        with pytest.raises(RayforgeError, match="--steps"):
            parse_selection(bad)
    with pytest.raises(RayforgeError, match="no PoR directory"):
        verify_por("/nonexistent/por")


# ------------------------------------------------------------------------------------------------ tamperings

def test_point_inserted_into_one_batch(plain_por, tmp_path):
    por = _copy(plain_por, tmp_path)

    def edit(batch, flip, lr):
        batch[4][0] = 7

    _rewrite_steps(por, edit)
    report = verify_por(por)
    assert not report.valid and "point_in_batch" in _codes(report)
    assert "steps 4" in next(str(r) for r in report.reasons if r.code == "point_in_batch")


def test_other_group_member_inserted(plain_por, tmp_path):
    por = _copy(plain_por, tmp_path)
    other = next(x for x in plain_por["manifest"]["excluded"] if x != 7)

    def edit(batch, flip, lr):
        batch[9][1] = other

    _rewrite_steps(por, edit)
    assert "excluded_in_batch" in _codes(verify_por(por))


def test_duplicate_content_at_another_index(mnist_por, tmp_path):
    run = TrainingRun.open(mnist_por["run_dir"])
    logs = ForgedLogs(run, "paper")
    glog = logs.group_log(int(logs.splits.group_of[mnist_por["manifest"]["point"]]))
    twin = mnist_por["twin"]
    assert twin not in mnist_por["manifest"]["excluded"]
    # Even the honest export fails, truthfully: the twin (the same example) is trained on wherever the original
    # batches are kept. Phase 1 itself never picks it (rayforge.forge.twins), though its gradient is the point's.
    honest = verify_por(mnist_por["por"], data_root=mnist_por["data_root"], model_path=mnist_por["deployed"])
    assert not honest.valid and "duplicate_in_batch" in _codes(honest)
    forged_steps = sorted(glog.forged)
    assert not any(twin in glog.forged[t][0] for t in forged_steps)
    # Without the twin anywhere, no duplicate is reported; put it back into one forged batch: flagged at that step.
    por = _copy(mnist_por, tmp_path)
    excluded = set(mnist_por["manifest"]["excluded"])
    step = forged_steps[-1]

    def edit(batch, flip, lr):
        for t, b in enumerate(batch):
            if twin in b:
                b[b == twin] = next(i for i in range(20) if i not in b and i not in excluded and i != twin)
        batch[step][0] = twin

    _rewrite_steps(por, edit)
    report = verify_por(por, data_root=mnist_por["data_root"])
    detail = next(str(r) for r in report.reasons if r.code == "duplicate_in_batch")
    assert detail.endswith(f"steps {step}") and str(twin) in detail


def test_learning_rate_changed(plain_por, tmp_path):
    por = _copy(plain_por, tmp_path)

    def edit(batch, flip, lr):
        lr[5] = np.nextafter(lr[5], 1.0)  # one ulp is enough

    _rewrite_steps(por, edit)
    report = verify_por(por)
    assert not report.valid and "lr_schedule" in _codes(report)


def test_one_checkpoint_weight_changed(old_por, tmp_path):
    por = _copy(old_por, tmp_path)
    path = por / ckpt_name(6)
    tensors = load_file(str(path))
    tensors["param/linear.weight"][3, 5] += 1e-2
    save_file(tensors, str(path))
    report = verify_por(por)
    assert not report.valid and "replay_mismatch" in _codes(report)
    bad = {(s.start, s.stop) for s in report.segments if s.ok is False}
    assert (3, 6) in bad and (6, 9) in bad and (0, 3) not in bad
    assert [s.distance for s in report.segments if (s.start, s.stop) == (3, 6)][0] == pytest.approx(1e-2, rel=1e-3)


def test_velocity_changed(modified_por, tmp_path):
    por = _copy(modified_por, tmp_path)
    c = modified_por["manifest"]["checkpoints"][2]
    path = por / ckpt_name(c)
    tensors = load_file(str(path))
    tensors["velocity/linear.bias"][0] += 1.0
    save_file(tensors, str(path))
    report = verify_por(por)
    assert "replay_mismatch" in _codes(report)
    assert any(s.velocity_distance and s.velocity_distance > 0.5 for s in report.segments if s.stop == c)


def test_step_row_deleted(plain_por, tmp_path):
    # The last row: the table stays contiguous but is one step short of the declared training.
    por = _copy(plain_por, tmp_path)

    def edit(batch, flip, lr):
        del batch[-1], flip[-1]
        lr.resize(len(batch), refcheck=False)

    _rewrite_steps(por, edit)
    report = verify_por(por)
    assert not report.valid and {"step_count", "checkpoints"} <= _codes(report)
    # A middle row: the step column has a gap, which no valid table has.
    por = tmp_path / "gap"
    shutil.copytree(plain_por["por"], por)
    table = pq.read_table(por / "steps.parquet")
    write_parquet(por / "steps.parquet", pa.concat_tables([table.slice(0, 5), table.slice(6)]))
    with pytest.raises(MalformedArtifact, match="steps must run"):
        verify_por(por)


def test_checkpoint_missing(plain_por, tmp_path):
    por = _copy(plain_por, tmp_path)
    (por / ckpt_name(6)).unlink()
    report = verify_por(por)
    assert not report.valid and "missing_checkpoint" in _codes(report)
    assert {s.skipped for s in report.segments if 6 in (s.start, s.stop)} == {"a checkpoint is missing or unreadable"}


def test_final_checkpoint_missing_with_topq(plain_por, tmp_path):
    por = _copy(plain_por, tmp_path)
    (por / ckpt_name(12)).unlink()
    assert "missing_checkpoint" in _codes(verify_por(por, steps="topq:1", model_path=plain_por["deployed"]))


def test_different_dataset(mnist_por):
    report = verify_por(mnist_por["por"], data_root=mnist_por["other_root"])
    assert not report.valid and "dataset_mismatch" in _codes(report)
    assert all(s.skipped == "the dataset differs" for s in report.segments)


def test_data_root_comes_from_the_verifier_not_the_artifact(mnist_por, tmp_path, monkeypatch):
    por = _copy(mnist_por, tmp_path)
    m = json.loads((por / "por.json").read_text())
    m["dataset"]["config"]["data_root"] = str(mnist_por["other_root"])  # a hostile path: ignored
    (por / "por.json").write_text(json.dumps(m))
    monkeypatch.setenv("RAYFORGE_DATA", str(mnist_por["data_root"]))
    report = verify_por(por)
    assert "dataset_mismatch" not in _codes(report)
    assert _codes(report) == {"duplicate_in_batch"}  # the dataset's own duplicate, nothing else


class _Trap:
    """Unpickling this creates `marker`: proof that someone unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_named_like_checkpoints_are_never_loaded(plain_por, tmp_path):
    control = tmp_path / "control-unpickled"
    action, args = _Trap(control).__reduce__()  # what unpickling the trap would run
    action(*args)
    assert control.exists()  # the trap works when unpickled

    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({"param/linear.weight": _Trap(marker), "harmless": 1})
    por = _copy(plain_por, tmp_path)
    (por / "ckpt-00000003.pt").write_bytes(payload)  # extra file named like a checkpoint
    (por / ckpt_name(5)).write_bytes(payload)  # a safetensors name, but not a listed step
    report = verify_por(por)
    assert not report.valid and "unexpected_file" in _codes(report)
    detail = next(str(r) for r in report.reasons if r.code == "unexpected_file")
    assert "ckpt-00000003.pt" in detail and ckpt_name(5) in detail
    # a listed checkpoint that is really a pickle
    (por / ckpt_name(6)).write_bytes(payload)
    report = verify_por(por, steps="topq:1")
    assert "bad_checkpoint" in _codes(report)
    assert not marker.exists()


def test_deployed_model_must_match(plain_por, modified_por, tmp_path):
    # Another model entirely: hash mismatch, and far more than epsilon away
    report = verify_por(plain_por["por"], model_path=modified_por["deployed"])
    assert "deployed_mismatch" in _codes(report)
    # The right model with one weight moved
    tensors = load_file(str(plain_por["deployed"]))
    tensors["param/linear.bias"][0] += 1.0
    save_file(tensors, str(tmp_path / "moved.safetensors"))
    report = verify_por(plain_por["por"], model_path=tmp_path / "moved.safetensors")
    assert {"deployed_mismatch", "epsilon_exceeded"} <= _codes(report)
    # A plain state_dict (no param/ prefix) of the deployed model is accepted
    plain = {k.split("/", 1)[1]: v for k, v in load_file(str(plain_por["deployed"])).items()}
    save_file(plain, str(tmp_path / "plain.safetensors"))
    assert verify_por(plain_por["por"], model_path=tmp_path / "plain.safetensors").valid


def test_understated_epsilon(plain_por, tmp_path):
    por = _copy(plain_por, tmp_path)
    m = json.loads((por / "por.json").read_text())
    m["epsilon"] /= 2
    (por / "por.json").write_text(json.dumps(m))
    report = verify_por(por, model_path=plain_por["deployed"])
    assert {"epsilon_exceeded", "claims_inconsistent"} <= _codes(report)


def test_flip_and_init_tamperings(plain_por, tmp_path):
    por = _copy(plain_por, tmp_path)

    def edit(batch, flip, lr):
        flip[2][0] = True

    _rewrite_steps(por, edit)
    path = por / ckpt_name(0)
    tensors = load_file(str(path))
    tensors["param/linear.bias"] = torch.zeros_like(tensors["param/linear.bias"])
    save_file(tensors, str(path))
    assert {"flip", "init"} <= _codes(verify_por(por))


# ------------------------------------------------------------------------------------------------ malformed manifests

def _edit_manifest(plain_por, tmp_path, name, edit) -> Path:
    por = tmp_path / name
    shutil.copytree(plain_por["por"], por)
    m = json.loads((por / "por.json").read_text())
    edit(m)
    (por / "por.json").write_text(json.dumps(m))
    return por


@pytest.mark.parametrize("name,edit,match", [
    ("unknown_key", lambda m: m.update(extra=1), "unknown"),
    ("missing_key", lambda m: m.pop("epsilon"), "missing"),
    ("nested_unknown", lambda m: m["training"].update(optimizer="adam"), "unknown"),
    ("bool_for_int", lambda m: m.update(point=True), "'point'"),
    ("point_out_of_range", lambda m: m.update(point=60), "'point'"),
    ("float_for_int", lambda m: m["training"].update(batch_size=10.0), "batch_size"),
    ("negative_lr", lambda m: m["training"].update(lr=-0.1), "training.lr"),
    ("unknown_model", lambda m: m["training"].update(model="os.system"), "training.model"),
    ("wrong_format", lambda m: m.update(format="rayforge-por-0"), "format"),
    ("point_not_excluded", lambda m: m.update(excluded=[8]), "excluded"),
    ("unsorted_checkpoints", lambda m: m.update(checkpoints=[0, 6, 3, 12]), "increasing"),
    ("huge_synthetic", lambda m: m["dataset"]["config"].update(synthetic_train=10 ** 8), "synthetic_train"),
    ("short_hash", lambda m: m.update(deployed_sha256="abc"), "deployed_sha256"),
])
def test_malformed_manifest(plain_por, tmp_path, name, edit, match):
    with pytest.raises(MalformedArtifact, match=match):
        verify_por(_edit_manifest(plain_por, tmp_path, name, edit))


def test_manifest_json_is_strict(plain_por, tmp_path):
    por = _copy(plain_por, tmp_path)
    text = (por / "por.json").read_text()
    (por / "por.json").write_text(text.replace('"epsilon": ', '"epsilon": NaN, "epsilon": ', 1))
    with pytest.raises(MalformedArtifact):
        verify_por(por)
    (por / "por.json").write_text(text.replace('"point": 7', '"point": 7, "point": 8'))
    with pytest.raises(MalformedArtifact, match="duplicate key"):
        verify_por(por)
    (por / "por.json").write_bytes(b"\x80\x81")
    with pytest.raises(MalformedArtifact, match="JSON"):
        verify_por(por)
    (por / "por.json").unlink()
    with pytest.raises(MalformedArtifact, match="por.json"):
        verify_por(por)


def test_other_thread_count_passes_within_tolerance_and_threads_are_restored(plain_por):
    torch.set_num_threads(2)
    report = verify_por(plain_por["por"], threads=1)
    assert report.valid and report.threads == 1 and report.max_distance <= DEFAULT_TOL
    assert torch.get_num_threads() == 2
    with pytest.warns(UserWarning, match="trained with 1"):  # by default a warning, one line
        report = verify_por(plain_por["por"], threads=2, tol=0.0)  # a tiny logreg: bit-exact even across threads
    assert report.threads == 2 and all(s.distance <= 1e-6 for s in report.segments)
