"""Public-data PoRs: every batch from D_p, nothing of D in the PoR; they export and verify without D, every
tampering with D_p indices or D_p itself is caught, one kind cannot pass as another, bad D_p is one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import copy_por, edit_manifest, edit_steps, refused
from rayforge.cli import main
from rayforge.data import ImageArrays, arrays_sha256, point_sha256
from rayforge.data.public import load_public, write_image_folder
from rayforge.errors import UnusableInput
from rayforge.por import verify_por
from rayforge.por.export import dataset_block
from rayforge.por.public import export_public_por
from rayforge.train.log import read_steps
from rayforge.train.run import TrainingRun

N_PUBLIC = 40  # the plain run's test split


def _codes(report) -> set[str]:
    return set(report.reason_codes)


def test_public_por_exports_and_verifies_without_d(public_por, tmp_path, monkeypatch):
    run = TrainingRun.open(public_por["run_dir"])
    m = public_por["manifest"]
    assert m["kind"] == "public" and set(m) == {"format", "kind", "seed", "public", "deployed_sha256", "training",
                                               "checkpoints", "epsilon", "d_theta"}
    text = (public_por["por"] / "por.json").read_text()
    assert run.info["train_sha256"] not in text and "synthetic" not in text  # nothing names D
    public = load_public(public_por["public"])
    assert m["public"]["n"] == N_PUBLIC and m["public"]["sha256"] == arrays_sha256(public)
    assert m["public"]["num_classes"] == run.num_classes  # the model's classes, which D_p need not all show
    steps = read_steps(public_por["por"] / "steps.parquet")
    assert len(steps) == run.total_steps and all(len(b) == 10 and b.max() < N_PUBLIC for b in steps.batch)
    assert sorted(p.name for p in public_por["por"].iterdir()) == sorted(
        ["por.json", "steps.parquet"] + [f"ckpt-{c:08d}.safetensors" for c in m["checkpoints"]])
    assert set(run.checkpoints) < set(m["checkpoints"])  # with one-step windows around the largest updates
    # D is nowhere a verifier could find it: the PoR still verifies, from D_p alone
    monkeypatch.setenv("RAYFORGE_DATA", str(tmp_path))
    monkeypatch.setenv("RAYFORGE_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["verify", str(public_por["por"]), "--data-root", str(public_por["public"]),
                                       "--model", str(public_por["deployed"])])
    assert result.exit_code == 0 and "VALID (public PoR)" in result.stdout, result.output


def test_hybrid_takes_the_better_strategy_per_step(public_por, tmp_path):
    run = TrainingRun.open(public_por["run_dir"])
    errors = {}
    for strategy in ("paper", "swap"):
        summary = {}
        export_public_por(run, public_por["public"], tmp_path / strategy, strategy=strategy, mu=4, pool_size=20,
                          progress=False, summary=summary)
        errors[strategy] = summary["relative_errors"]
    hybrid = public_por["summary"]["relative_errors"]
    assert len(hybrid) == run.total_steps
    # the first step is forged at the same θ₀ by all three; later ones follow the original trajectory too
    np.testing.assert_array_equal(hybrid, np.minimum(errors["paper"], errors["swap"]))
    assert (errors["swap"] < errors["paper"]).any()  # greedy matching is not the paper's draw


def test_verify_needs_the_public_data_root(public_por):
    with pytest.raises(UnusableInput, match="--data-root"):
        verify_por(public_por["por"])
    result = CliRunner().invoke(main, ["verify", str(public_por["por"])])
    assert result.exit_code == 2 and result.output.count("\n") == 1


# ------------------------------------------------------------------------------------------------ tamperings

def test_a_public_index_changed(public_por, tmp_path):
    por = copy_por(public_por, tmp_path)
    root = public_por["public"]

    def edit(batch, flip):
        batch[4][0] = next(i for i in range(N_PUBLIC) if i not in batch[4])

    edit_steps(por, edit)
    report = verify_por(por, data_root=root)
    assert _codes(report) == {"replay_mismatch"}

    def outside(batch, flip):
        batch[7][1] = N_PUBLIC

    edit_steps(por, outside)
    report = verify_por(por, data_root=root)
    assert "index_out_of_range" in _codes(report)
    assert f"indices outside [0, {N_PUBLIC}) at steps 7" in next(str(r) for r in report.reasons
                                                                 if r.code == "index_out_of_range")


def test_another_class_count_is_refused(public_por, tmp_path):
    # the model's classes come from the manifest (D_p need not show them all): another count builds another model
    por = copy_por(public_por, tmp_path)
    edit_manifest(por, lambda m: m["public"].update(num_classes=7))
    report = verify_por(por, data_root=public_por["public"])
    assert not report.valid and "bad_checkpoint" in _codes(report)


def test_a_short_batch_and_another_public_dataset(public_por, tmp_path):
    por = copy_por(public_por, tmp_path)

    def edit(batch, flip):
        batch[3], flip[3] = batch[3][:-1], flip[3][:-1]

    edit_steps(por, edit)
    assert "batch_size" in _codes(verify_por(por, data_root=public_por["public"]))
    other = tmp_path / "other"
    shutil.copytree(public_por["public"], other)
    first = sorted((other / "train" / "0").iterdir())[0]
    pixels = np.asarray(Image.open(first)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(first)
    report = verify_por(public_por["por"], data_root=other)
    assert "dataset_mismatch" in _codes(report) and all(s.skipped == "the dataset differs" for s in report.segments)


# ------------------------------------------------------------------------------------------------ one kind as another

def test_a_public_por_cannot_pass_as_an_exclude_por(public_por, tmp_path):
    por = copy_por(public_por, tmp_path)
    run = TrainingRun.open(public_por["run_dir"])
    ds = run.load_dataset()

    def as_exclude(m):
        for key in ("public", "seed"):
            del m[key]
        m.update(kind="exclude", point=0, excluded=[0], dataset=dataset_block(run),
                 point_sha256=point_sha256(ds.train, 0))

    edit_manifest(por, as_exclude)
    report = verify_por(por)
    assert not report.valid and "replay_mismatch" in _codes(report)  # its indices name D_p's points, not D's


def test_an_exclude_por_cannot_pass_as_a_public_por(plain_por, public_por, tmp_path):
    por = copy_por(plain_por, tmp_path)

    def as_public(m):
        for key in ("point", "point_sha256", "excluded", "dataset"):
            del m[key]
        m.update(kind="public", seed=3, public=public_por["manifest"]["public"])

    edit_manifest(por, as_public)
    report = verify_por(por, data_root=public_por["public"])
    assert not report.valid and "index_out_of_range" in _codes(report)  # D's indices run past D_p's 40 points
    assert all(s.skipped == "a batch holds an index out of range" for s in report.segments)


def test_d_keys_in_a_public_manifest_are_malformed(public_por, tmp_path):
    por = copy_por(public_por, tmp_path)
    run = TrainingRun.open(public_por["run_dir"])
    edit_manifest(por, lambda m: m.update(dataset=dataset_block(run)))
    result = CliRunner().invoke(main, ["verify", str(por), "--data-root", str(public_por["public"])])
    assert result.exit_code == 2 and "unknown ['dataset']" in result.output


# ------------------------------------------------------------------------------------------------ bad input

def _bad(args: list[str], match: str, out: Path, code: int = 1) -> None:
    refused(CliRunner().invoke(main, args + ["--out", str(out)]), code, match, out)


def _folder(root: Path, images: np.ndarray, labels) -> Path:
    return write_image_folder(ImageArrays(images.astype(np.uint8), np.asarray(labels, np.int64)), root)


def test_bad_public_data_is_one_line_and_writes_nothing(plain_por, tmp_path):
    run_dir = str(plain_por["run_dir"])
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 10
    wrong_size = _folder(tmp_path / "size", rng.integers(0, 256, (30, 1, 9, 8)), labels)
    wrong_channels = _folder(tmp_path / "rgb", rng.integers(0, 256, (30, 3, 8, 8)), labels)
    small = _folder(tmp_path / "small", rng.integers(0, 256, (9, 1, 8, 8)), np.arange(9))
    eleven = tmp_path / "eleven"
    shutil.copytree(_folder(tmp_path / "ten", rng.integers(0, 256, (30, 1, 8, 8)), labels), eleven)
    shutil.copytree(eleven / "train" / "9", eleven / "train" / "x")  # an 11th class
    gaps = _folder(tmp_path / "gaps", rng.integers(0, 256, (30, 1, 8, 8)), 1 + labels % 3)
    _bad(["por", run_dir, "--public", str(wrong_size)], "images are 8x9 with 1 channel(s); the model takes 8x8", out)
    _bad(["por", run_dir, "--public", str(wrong_channels)], "with 3 channel(s); the model takes 8x8 with 1", out)
    _bad(["por", run_dir, "--public", str(small)], "9 points, fewer than a batch of 10", out)
    _bad(["por", run_dir, "--public", str(eleven)], "11 classes; the model knows 10", out)
    _bad(["por", run_dir, "--public", str(gaps)], "must be 0..2", out)
    _bad(["por", run_dir, "--public", str(tmp_path / "nowhere")], "no train/<class>/ folders", out)
    _bad(["por", run_dir, "--public", str(tmp_path / "ten"), "--pool", "5"], "--pool must be an integer >= 10", out)
    _bad(["por", run_dir, "--public", str(tmp_path / "ten"), "--strategy", "magic"], "unknown strategy", out)
    _bad(["por", run_dir, "--public", str(tmp_path / "ten"), "--label", "3"], "--label do(es) not apply", out, 2)
