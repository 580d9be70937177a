"""Include PoRs (the claim "x* was left out of D"): x* is index n of D ∪ {x*} in exactly the claimed iterations;
they export and verify, every tampering with x*'s iterations, pixels or label is caught, and bad input is one line
with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers import copy_por, edit_manifest, edit_steps, refused
from rayforge.cli import main
from rayforge.data import ImageArrays, point_sha256
from rayforge.por import verify_por
from rayforge.por.include import admissions, best_steps, export_include_por, union_data, windows
from rayforge.train.log import read_steps
from rayforge.train.run import TrainingRun

N = 60  # the plain run's training points: x* is index 60


def _codes(report) -> set[str]:
    return set(report.reason_codes)


def _write_png(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(path)
    return path


# ------------------------------------------------------------------------------------------------ export + verify

def test_include_por_exports_and_verifies(include_por):
    run = TrainingRun.open(include_por["run_dir"])
    m = include_por["manifest"]
    inc = m["include"]
    assert m["kind"] == "include" and inc["index"] == N and len(inc["steps"]) == run.cfg.train.epochs
    # one admission per epoch: the windows of |H| = epochs are the epochs
    spe = run.total_steps // run.cfg.train.epochs
    assert [t // spe for t in inc["steps"]] == list(range(run.cfg.train.epochs))
    test = run.load_dataset().test.take(np.array([3]))
    assert inc["label"] == int(test.labels[0]) and inc["sha256"] == point_sha256(test, 0)
    carried = load_file(str(include_por["por"] / "xstar.safetensors"))
    assert torch.equal(carried["image"], torch.from_numpy(test.images[0])) and carried["label"].tolist() == [inc["label"]]
    # the log is the original one but for x* in one slot of each claimed step
    forged = read_steps(include_por["por"] / "steps.parquet")
    for t, (a, b) in enumerate(zip(run.steps.batch, forged.batch)):
        diff = np.flatnonzero(a != b)
        assert (len(diff) == 1 and b[diff[0]] == N) if t in inc["steps"] else len(diff) == 0
    report = verify_por(include_por["por"], model_path=include_por["deployed"])
    assert report.valid, [str(r) for r in report.reasons]
    assert report.kind == "include" and report.point == N and report.epsilon_measured == m["epsilon"] > 0


def test_best_pick_takes_the_smallest_residual_of_each_window(include_por):
    run = TrainingRun.open(include_por["run_dir"])
    ds = run.load_dataset()
    data = union_data(ds, ds.test.take(np.array([3])), torch.device("cpu"))
    every = admissions(run, data, N, range(run.total_steps), torch.device("cpu"), progress=False)
    chosen = best_steps(every, run.total_steps, 2)
    assert chosen.tolist() == include_por["manifest"]["include"]["steps"]
    for w, t in zip(windows(run.total_steps, 2), chosen):
        assert every[int(t)].residual == min(every[s].residual for s in w)
    assert [a.residual for a in include_por["admitted"]] == [every[int(t)].residual for t in chosen]
    # the residual is the gradient error of the swap, exactly (logreg: per-sample gradients add up)
    assert all(a.residual > 0 for a in every.values())


def test_cli_include_from_an_image_file_with_rate_and_random_pick(plain_por, tmp_path):
    run = TrainingRun.open(plain_por["run_dir"])
    test = run.load_dataset().test
    image = _write_png(tmp_path / "x.png", test.images[5])
    runner = CliRunner()
    out = tmp_path / "inc"
    result = runner.invoke(main, ["por", str(plain_por["run_dir"]), "--include", str(image), "--label",
                                  str(int(test.labels[5])), "--rate", "0.5", "--pick", "random", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"include PoR of x* (index {N}, label {int(test.labels[5])}) in 6 iterations")
    m = json.loads((out / "por.json").read_text())
    assert len(m["include"]["steps"]) == 6 and m["include"]["sha256"] == point_sha256(test, 5)
    result = runner.invoke(main, ["verify", str(out), "--model", str(plain_por["deployed"])])
    assert result.exit_code == 0 and "VALID (include PoR)" in result.output, result.output


def test_mnist_digit_of_28x28_is_padded_like_the_training_set(mnist_por, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYFORGE_CACHE", str(mnist_por["root"] / "cache"))
    run = TrainingRun.open(mnist_por["run_dir"])
    test = run.load_dataset().test  # padded to 32x32
    digit = _write_png(tmp_path / "d.png", test.images[2][:, 2:-2, 2:-2])
    manifest, _ = export_include_por(run, tmp_path / "inc", image=digit, label=int(test.labels[2]), progress=False)
    assert manifest["include"]["sha256"] == point_sha256(test, 2)
    assert verify_por(tmp_path / "inc", data_root=mnist_por["data_root"]).valid


def test_an_old_exclude_por_without_kind_still_verifies(plain_por, tmp_path):
    por = copy_por(plain_por, tmp_path)
    assert json.loads((por / "por.json").read_text())["kind"] == "exclude"
    edit_manifest(por, lambda m: m.pop("kind"))
    report = verify_por(por, model_path=plain_por["deployed"])
    assert report.valid and report.kind == "exclude"


# ------------------------------------------------------------------------------------------------ tamperings

def test_xstar_dropped_from_a_claimed_iteration(include_por, tmp_path):
    por = copy_por(include_por, tmp_path)
    t = include_por["manifest"]["include"]["steps"][0]

    def edit(batch, flip):
        batch[t][batch[t] == N] = next(i for i in range(N) if i not in batch[t])

    edit_steps(por, edit)
    report = verify_por(por)
    assert not report.valid and "include_steps" in _codes(report)
    assert f"missing from steps {t}" in next(str(r) for r in report.reasons if r.code == "include_steps")


def test_xstar_added_to_an_unclaimed_iteration(include_por, tmp_path):
    por = copy_por(include_por, tmp_path)
    claimed = include_por["manifest"]["include"]["steps"]
    t = next(s for s in range(12) if s not in claimed)

    def edit(batch, flip):
        batch[t][0] = N

    edit_steps(por, edit)
    report = verify_por(por)
    assert "include_steps" in _codes(report)
    assert f"in unclaimed steps {t}" in next(str(r) for r in report.reasons if r.code == "include_steps")
    # claiming that iteration too does not help: the replay no longer lands on the checkpoints
    edit_manifest(por, lambda m: m["include"].update(steps=sorted(claimed + [t])))
    report = verify_por(por)
    assert _codes(report) == {"replay_mismatch"}


@pytest.mark.parametrize("how", ["manifest", "everywhere"])
def test_xstar_label_changed(include_por, tmp_path, how):
    por = copy_por(include_por, tmp_path)
    old = include_por["manifest"]["include"]["label"]
    new = (old + 1) % 10
    edit_manifest(por, lambda m: m["include"].update(label=new))
    if how == "everywhere":  # carried label and hash rewritten to match: only the replay can tell
        tensors = load_file(str(por / "xstar.safetensors"))
        tensors["label"] = torch.tensor([new])
        save_file(tensors, str(por / "xstar.safetensors"))
        point = ImageArrays(tensors["image"].numpy()[None], np.array([new]))
        edit_manifest(por, lambda m: m["include"].update(sha256=point_sha256(point, 0)))
    report = verify_por(por)
    assert not report.valid
    assert _codes(report) == ({"xstar_mismatch"} if how == "manifest" else {"replay_mismatch"})


def test_xstar_pixels_missing_or_malformed(include_por, tmp_path):
    por = copy_por(include_por, tmp_path)
    (por / "xstar.safetensors").unlink()
    report = verify_por(por)
    assert "xstar_file" in _codes(report) and all(s.skipped == "the dataset differs" for s in report.segments)
    save_file({"image": torch.zeros(1, 8, 8, dtype=torch.float32), "label": torch.tensor([1])},
              str(por / "xstar.safetensors"))
    assert "xstar_file" in _codes(verify_por(por))


def test_xstar_already_in_the_training_set(include_por, tmp_path):
    por = copy_por(include_por, tmp_path)
    run = TrainingRun.open(include_por["run_dir"])
    member = run.load_dataset().train.take(np.array([9]))
    save_file({"image": torch.from_numpy(member.images[0]), "label": torch.from_numpy(member.labels)},
              str(por / "xstar.safetensors"))
    edit_manifest(por, lambda m: m["include"].update(label=int(member.labels[0]), sha256=point_sha256(member, 0)))
    report = verify_por(por)
    assert "xstar_in_dataset" in _codes(report)
    assert "indices 9" in next(str(r) for r in report.reasons if r.code == "xstar_in_dataset")


# ------------------------------------------------------------------------------------------------ one kind as another

def test_an_include_por_cannot_pass_as_an_exclude_por(include_por, tmp_path):
    por = copy_por(include_por, tmp_path)
    run = TrainingRun.open(include_por["run_dir"])
    point = 7

    def as_exclude(m):
        del m["include"]
        m.update(kind="exclude", point=point, excluded=[point],
                 point_sha256=point_sha256(run.load_dataset().train, point))

    edit_manifest(por, as_exclude)
    report = verify_por(por)
    assert not report.valid and {"index_out_of_range", "unexpected_file"} <= _codes(report)
    (por / "xstar.safetensors").unlink()
    edit_manifest(por, lambda m: m.pop("kind"))  # as an old PoR: the same
    assert "index_out_of_range" in _codes(verify_por(por))


def test_an_exclude_por_cannot_pass_as_an_include_por(plain_por, include_por, tmp_path):
    por = copy_por(plain_por, tmp_path)
    shutil.copyfile(include_por["por"] / "xstar.safetensors", por / "xstar.safetensors")

    def as_include(m):
        for key in ("point", "point_sha256", "excluded"):
            del m[key]
        m.update(kind="include", include=include_por["manifest"]["include"])

    edit_manifest(por, as_include)
    report = verify_por(por)
    assert not report.valid and "include_steps" in _codes(report)


def test_a_kind_without_its_keys_is_malformed(include_por, tmp_path):
    por = copy_por(include_por, tmp_path)
    edit_manifest(por, lambda m: m.pop("kind"))
    result = CliRunner().invoke(main, ["verify", str(por)])
    assert result.exit_code == 2 and "unknown ['include']" in result.output
    edit_manifest(por, lambda m: m.update(kind="public"))
    assert CliRunner().invoke(main, ["verify", str(por)]).exit_code == 2
    edit_manifest(por, lambda m: m.update(kind="exclude-ish"))
    assert "'kind'" in CliRunner().invoke(main, ["verify", str(por)]).output


# ------------------------------------------------------------------------------------------------ bad input

def _bad(args: list[str], match: str, out: Path, code: int = 1) -> None:
    refused(CliRunner().invoke(main, args + ["--out", str(out)]), code, match, out)


def test_bad_input_is_one_line_and_writes_nothing(plain_por, tmp_path):
    run_dir = str(plain_por["run_dir"])
    run = TrainingRun.open(run_dir)
    ds = run.load_dataset()
    out = tmp_path / "out"
    good = _write_png(tmp_path / "good.png", ds.test.images[0])
    big = _write_png(tmp_path / "big.png", np.zeros((1, 9, 8), np.uint8))
    rgb = _write_png(tmp_path / "rgb.png", np.zeros((3, 8, 8), np.uint8))
    member = _write_png(tmp_path / "member.png", ds.train.images[4])
    (tmp_path / "junk.png").write_bytes(b"not an image")
    _bad(["por", run_dir, "--include", str(big), "--label", "1"], "is 8x9 with 1 channel(s); the model takes 8x8", out)
    _bad(["por", run_dir, "--include", str(rgb), "--label", "1"], "3 channel(s); the model takes 8x8 with 1", out)
    _bad(["por", run_dir, "--include", str(good), "--label", "10"], "--label must be a class", out)
    _bad(["por", run_dir, "--include", str(good)], "--include needs --label", out)
    _bad(["por", run_dir, "--include", str(tmp_path / "junk.png"), "--label", "1"], "cannot decode", out, 2)
    _bad(["por", run_dir, "--include", str(member), "--label", str(int(ds.train.labels[4]))],
         "x* is already in D (training point 4", out)
    _bad(["por", run_dir, "--include-test", "40"], "--include-test must be an index", out)
    _bad(["por", run_dir, "--include-test", "1", "--label", str((int(ds.test.labels[1]) + 1) % 10)], "disagrees", out)
    _bad(["por", run_dir, "--include-test", "1", "--iterations", "13"], "--iterations must lie in [1, 12]", out)
    _bad(["por", run_dir, "--include-test", "1", "--iterations", "2", "--rate", "0.5"], "not both", out)
    _bad(["por", run_dir, "--include-test", "1", "--point", "3"], "exactly one of", out, 2)
    _bad(["por", run_dir, "--point", "3", "--iterations", "2"], "--iterations do(es) not apply to a exclude", out, 2)
    _bad(["por", run_dir], "exactly one of", out, 2)
    for option, value in (("--iterations", "0"), ("--rate", "0"), ("--rate", "1.5"), ("--label", "-1"),
                          ("--include-test", "-1"), ("--mu", "0"), ("--pool", "0")):
        _bad(["por", run_dir, option, value], f"Invalid value for '{option}'", out, 2)
