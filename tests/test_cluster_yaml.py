"""cluster.yaml: valid for the installed Ray's cluster launcher, and shaped for driver-only head nodes."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_valid_for_the_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text())))


def test_head_runs_drivers_only_and_workers_declare_their_gpus():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    assert types and all(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert {"runs", "wandb", ".venv"} <= set(config["rsync_exclude"])
    commands = " ".join(config["setup_commands"])
    assert ".bashrc" not in commands and "--no-deps -e" in commands
    for path in ("cluster.yaml", "README.md"):
        assert "/mnt/shared" not in (ROOT / path).read_text()
