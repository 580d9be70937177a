"""Typed config: YAML loading, dotted overrides, and clear errors."""

from pathlib import Path

import pytest

from rayforge.config import load_config
from rayforge.errors import RayforgeError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.epochs >= 1
    if not path.name.startswith("quickstart"):  # the paper's settings: b=100 (the quickstarts are tuned for speed)
        assert cfg.train.batch_size == 100
    if cfg.data.dataset == "cifar10":  # the paper trains every CIFAR-10 model with random flips (so MIDA runs)
        assert cfg.data.flip


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


def test_default_attacks_are_those_that_can_run(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("attack:\n  shadows: 4\n")
    assert load_config(path).attack.attacks == ["lira", "enhanced", "enhanced_ref", "mentr", "xent"]
    assert load_config(path, ["data.flip=true"]).attack.attacks[-1] == "mida"


@pytest.mark.parametrize("overrides,why", [
    (["attack.attacks=[lira, mida]"], "mida needs data.flip: true"),
    (["attack.attacks=[lira]", "attack.shadows=2", "attack.control=0"], "lira needs attack.shadows >= 4"),
    (["attack.attacks=[enhanced, nope]"], "unknown attack 'nope'"),
    (["attack.attacks=[]"], "attack.attacks is empty"),
    (["attack.attacks=[xent, xent]"], "twice"),
    (["attack.attacks=[xent]", "attack.shadows=2", "attack.control=2"], "attack.control needs attack.shadows >= 4"),
    (["attack.control=20"], "attack.control must be between"),
    (["attack.shadow_model=nope"], "unknown model 'nope'"),
    (["attack.shadow_lr=0"], "shadow_lr"),
    (["attack.shadow_momentum=1"], "shadow_momentum"),
    (["attack.holdout=0"], "attack.holdout"),
    (["attack.population_data=0"], "attack.population_data"),
])
def test_attacks_that_cannot_run_are_refused_at_config_read(tmp_path, overrides, why):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 2\n")
    with pytest.raises(RayforgeError, match=why) as err:
        load_config(path, overrides)
    assert "\n" not in str(err.value)


def test_shadow_schedule_overrides_the_targets(tmp_path):
    from rayforge.attacks.shadows import shadow_model_name, shadow_train_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.05\n  momentum: 0.5\n")
    cfg = load_config(path)
    assert shadow_train_config(cfg) == cfg.train and shadow_model_name(cfg) == "lenet5"
    cfg = load_config(path, ["attack.shadow_model=cnn32_3_max", "attack.shadow_lr=0.001",
                             "attack.shadow_batch_size=64", "attack.shadow_epochs=20"])
    tc = shadow_train_config(cfg)
    assert (tc.lr, tc.batch_size, tc.epochs, tc.momentum) == (0.001, 64, 20, 0.5)
    assert shadow_model_name(cfg) == "cnn32_3_max"
