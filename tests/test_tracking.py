"""Metric logging: the jsonl record, one W&B run per (run directory, stage) resumed on rerun, offline W&B for real,
and the fall-back to offline when the W&B server cannot be reached."""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading

import pytest

from rayforge import tracking
from rayforge.config import WandbConfig
from rayforge.tracking import MetricLogger, reachable, run_config, stage_run

SHA = "feedbeef" * 8
ROWS = [{"group": 0, "members": [1, 2], "d_theta": 0.5, "first_step": 0, "forged_steps": 3},
        {"group": 1, "members": [3], "d_theta": 0.0, "first_step": 1, "forged_steps": 2}]


def _make_run(path):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("name: demo\nseed: 3\nmodel: {name: lenet5}\n")
    (path / "dataset.json").write_text(json.dumps({"dataset": "mnist", "n": 10, "train_sha256": SHA}))
    return path


@pytest.fixture
def run_dir(tmp_path):
    return _make_run(tmp_path / "run")


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """W&B's own state in a private home; settings and the reachability probe start afresh."""
    import wandb

    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    for var in ("WANDB_BASE_URL", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tracking, "_reachable_cache", {})
    monkeypatch.setattr(tracking, "_warned", set())
    wandb.teardown()
    yield monkeypatch
    wandb.teardown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_some(run_dir, stage="forge-paper"):
    with MetricLogger(run_dir, stage, WandbConfig(), {"kappa": 2}, run_name="demo") as log:
        for step in (4, 1, 7):  # units land in any order
            log.log({"forge/grad_error_mean": step / 10}, step=step)
        log.d_theta(ROWS)
        log.summary({"rows": 3})


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_is_the_record_and_disabled_touches_no_wandb(run_dir):
    _log_some(run_dir)
    assert _jsonl(run_dir / "metrics" / "forge-paper.jsonl") == [
        {"step": 4, "forge/grad_error_mean": 0.4}, {"step": 1, "forge/grad_error_mean": 0.1},
        {"step": 7, "forge/grad_error_mean": 0.7}, {"summary": {"rows": 3}}]
    assert not (run_dir / "wandb").exists() and not (run_dir / "metrics" / "wandb.json").exists()


def test_stage_run_ids_are_per_directory_and_stage(tmp_path, run_dir):
    twin = _make_run(tmp_path / "elsewhere" / "run")  # same name, same contents, another directory
    ids = {stage_run(d, s)["id"] for d in (run_dir, twin) for s in ("train", "forge-paper")}
    assert len(ids) == 4
    assert stage_run(run_dir, "train") == stage_run(run_dir, "train")
    assert stage_run(run_dir, "train")["group"] != stage_run(twin, "train")["group"]
    assert stage_run(run_dir, "train")["name"] == "run-train"
    assert not any(c in i for i in ids for c in ":;,#?/'")
    # a run being built elsewhere gets the id of where it will end up
    staging = _make_run(tmp_path / ".run.partial-1")
    assert stage_run(staging, "train", final_dir=tmp_path / "fresh")["id"] == \
        stage_run(_make_run(tmp_path / "fresh"), "train")["id"]
    # another config at the same path is another W&B run; a recorded run always wins
    derived = stage_run(run_dir, "train")
    (run_dir / "config.yaml").write_text("name: demo\nseed: 4\n")
    assert stage_run(run_dir, "train")["id"] != derived["id"]
    (run_dir / "metrics").mkdir()
    (run_dir / "metrics" / "wandb.json").write_text(json.dumps({"train": {**derived, "mode": "offline"}}))
    assert stage_run(run_dir, "train") == derived


def test_run_config_carries_dataset_model_seed(run_dir):
    config = run_config(run_dir, {"kappa": 2})
    assert config["dataset"] == {"name": "mnist", "n": 10, "sha256": SHA}
    assert config["model"] == {"name": "lenet5"} and config["seed"] == 3 and config["params"] == {"kappa": 2}
    assert config["run_dir"] == str(run_dir.resolve())
    assert "params" not in run_config(run_dir, {"name": "demo", "seed": 3, "model": {"name": "lenet5"}})


def test_offline_writes_under_run_and_a_rerun_resumes_the_same_id(run_dir, wandb_env):
    wandb_env.setenv("WANDB_MODE", "offline")
    _log_some(run_dir)
    _log_some(run_dir)  # a rerun of the stage
    recorded = json.loads((run_dir / "metrics" / "wandb.json").read_text())["forge-paper"]
    assert recorded["mode"] == "offline" and recorded["id"] == stage_run(run_dir, "forge-paper")["id"]
    runs = sorted(p for p in (run_dir / "wandb").glob("offline-run-*") if p.is_dir())
    # W&B names a rerun's directory "<time>-<id>", or "<time>-<id>-1" when both started in the same second
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{recorded['id']}(-\d+)?", p.name)
                                  for p in runs), [p.name for p in runs]
    history = (runs[0] / f"run-{recorded['id']}.wandb").read_bytes()
    for expected in (SHA, "lenet5", "kappa", "forge/step", "d_theta/groups"):
        assert expected.encode() in history, expected
    assert len(_jsonl(run_dir / "metrics" / "forge-paper.jsonl")) == 8  # the jsonl keeps both sessions


def test_online_without_network_falls_back_to_offline_with_one_line(run_dir, wandb_env, capfd):
    wandb_env.setenv("WANDB_MODE", "online")
    wandb_env.setenv("WANDB_API_KEY", "x" * 40)
    wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    _log_some(run_dir)
    _log_some(run_dir, "report-paper")  # the next stage of the run: offline at once, no second warning
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "wandb sync" in warnings[0], err
    recorded = json.loads((run_dir / "metrics" / "wandb.json").read_text())["forge-paper"]
    assert recorded["mode"] == "offline"
    assert any(p.name.endswith(recorded["id"]) for p in (run_dir / "wandb").glob("offline-run-*"))


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A server that answers every request with 401, as W&B does for a wrong API key."""

    def _refuse(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(401)
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_POST = do_HEAD = _refuse

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_online_init_failure_falls_back_to_offline(run_dir, wandb_env, refusing_server, capfd):
    wandb_env.setenv("WANDB_MODE", "online")
    wandb_env.setenv("WANDB_API_KEY", "x" * 40)
    wandb_env.setenv("WANDB_BASE_URL", refusing_server)
    _log_some(run_dir)
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("rayforge: warning")]
    assert len(warnings) == 1 and "W&B init failed" in warnings[0]
    recorded = json.loads((run_dir / "metrics" / "wandb.json").read_text())["forge-paper"]
    assert recorded["mode"] == "offline"
    assert any(p.name.endswith(recorded["id"]) for p in (run_dir / "wandb").glob("offline-run-*"))


def test_reachable_means_an_http_server_answers(monkeypatch, refusing_server):
    monkeypatch.setattr(tracking, "_reachable_cache", {})
    assert reachable(refusing_server)
    assert not reachable(f"http://127.0.0.1:{_closed_port()}")
    assert not reachable("not a url")


def test_training_logs_under_the_id_of_its_final_directory(tmp_path, wandb_env, make_config):
    from rayforge.train.trainer import train

    train(make_config(wandb={"mode": "offline"}), tmp_path / "run", progress=False)
    runs_path = tmp_path / "run" / "metrics" / "wandb.json"
    recorded = json.loads(runs_path.read_text())["train"]
    runs_path.unlink()
    assert recorded["id"] == stage_run(tmp_path / "run", "train")["id"]  # derived again from where the run is
    assert any(p.name.endswith(recorded["id"]) for p in (tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert recorded["name"] == "run-train"
