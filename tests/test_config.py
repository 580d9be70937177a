"""Typed config: YAML loading, dotted overrides, and clear errors."""

from pathlib import Path

import pytest

from rayforge.config import load_config
from rayforge.errors import RayforgeError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.batch_size == 100 and cfg.train.epochs >= 1


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 2\n")
    cfg = load_config(path, ["train.lr=1", "data.flip=true", "data.subset=null"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.data.flip is True
    with pytest.raises(RayforgeError, match="must be int"):
        load_config(path, ["train.epochs=two"])
    with pytest.raises(RayforgeError, match="key=value"):
        load_config(path, ["train.epochs"])
    with pytest.raises(RayforgeError, match="train.momentum"):
        load_config(path, ["train.momentum=1.5"])


def test_ray_actors_is_auto_or_a_count(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 2\n")
    assert load_config(path).ray.actors == "auto"
    assert load_config(path, ["ray.actors=3"]).ray.actors == 3
    assert load_config(path, ["ray.actors=auto"]).ray.actors == "auto"
    for bad in ("ray.actors=0", "ray.actors=many", "ray.actors=true", "ray.actors=1.5"):
        with pytest.raises(RayforgeError, match="ray.actors"):
            load_config(path, [bad])
    with pytest.raises(RayforgeError, match="forge.window"):
        load_config(path, ["forge.window=0"])
