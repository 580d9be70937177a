"""The public API: `import rayforge as rf` exposes the pipeline as documented functions, the same the CLI calls."""

from __future__ import annotations

import inspect

import rayforge
import rayforge as rf

API = ["train", "forge", "rebuild", "attack", "report", "audit", "export_por", "verify_por", "Recorder", "load_config"]


def test_every_stage_is_a_documented_callable():
    for name in API:
        obj = getattr(rf, name)
        assert callable(obj) and inspect.getdoc(obj) and len(inspect.getdoc(obj)) > 40, name
    assert set(API) <= set(rf.__all__)


def test_subpackages_and_functions_share_their_names():
    # importing the subpackages of the same names (as every stage does) leaves the functions in place, and every
    # import form still reaches the subpackages
    import rayforge.forge.driver as forge_driver
    import rayforge.train.run
    from rayforge.audit import run_audit
    from rayforge.forge import swap
    from rayforge.rebuild.engine import rebuild_group  # noqa: F401
    from rayforge.report.render import write_report  # noqa: F401

    for name in ("train", "forge", "rebuild", "report", "audit"):
        obj = getattr(rf, name)
        assert callable(obj) and inspect.signature(obj) == inspect.signature(getattr(rf.api, name)), name
    assert rf.forge.driver is forge_driver and rf.forge.swap is swap and rf.audit.run_audit is run_audit
    assert rayforge.train.run.TrainingRun.__name__ == "TrainingRun"
    assert rf.Recorder.__name__ == "Recorder" and inspect.isclass(rf.Recorder)


def test_train_and_load_config_from_python(tmp_path):
    from helpers import tiny_config

    path = tmp_path / "c.yaml"
    path.write_text("name: api\ndata: {dataset: synthetic, synthetic_train: 20, synthetic_test: 10}\n"
                    "model: {name: logreg}\ntrain: {epochs: 1, batch_size: 10, threads: 1}\n")
    cfg = rf.load_config(path, ["train.lr=0.2"])
    assert cfg.train.lr == 0.2 and cfg.name == "api"
    summary = rf.train(path, tmp_path / "run", overrides=["train.lr=0.2"], progress=False)
    assert summary["steps"] == 2 and (tmp_path / "run" / "trajectory" / "steps.parquet").is_file()
    summary = rf.train(tiny_config(), tmp_path / "run2", progress=False)
    assert summary["steps"] == 12
