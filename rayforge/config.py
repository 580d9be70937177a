"""The one typed configuration: nested dataclasses loaded from YAML, with `--set key=value` overrides.

Unknown keys and values of the wrong type are errors (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from rayforge.errors import RayforgeError


@dataclass
class DataConfig:
    dataset: str = "mnist"  # mnist | cifar10 | imagefolder (train/<class>/*, test/<class>/* under data_root) | synthetic
    data_root: Optional[str] = None  # searched first, then $RAYFORGE_DATA, then the download cache
    subset: Optional[int] = None  # n training points drawn by `seed` (the paper's sampling approximation)
    flip: bool = False  # random horizontal flip, from flags recorded in the log
    # synthetic only: a tiny generated dataset for tests (no files needed)
    synthetic_train: int = 200
    synthetic_test: int = 100
    synthetic_shape: list = field(default_factory=lambda: [1, 8, 8])


@dataclass
class ModelConfig:
    name: str = "lenet5"


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 100
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine (annealed per step to 0 over all steps)
    checkpoint_every: Optional[int] = None  # steps; default: once per epoch
    threads: Optional[int] = None  # torch intra-op threads; None keeps torch's default
    device: str = "auto"  # auto (cuda when available) | cpu | cuda


@dataclass
class ForgeConfig:
    strategy: str = "paper"
    kappa: int = 5
    mu: int = 200
    lam: int = 1
    dsub_size: Optional[int] = None
    chunk: int = 8  # candidates per batched gradient pass (bounds memory)
    points: Optional[int] = None  # sampling approximation: only the groups of this many sampled points
    grad_method: str = "auto"  # candidate gradients: auto | hooks (no BatchNorm; fastest) | vmap (torch.func) | loop
    pool_size: int = 256  # swap/hybrid strategies: substitutes drawn per step
    pool_target: float = 0.0  # swap/hybrid: parts whose grad_error/grad_norm stays above this get more pool ...
    pool_rounds: int = 0  # ... at most this many times (another pool_size each); 0: a fixed pool
    # Units of work on Ray: (step window, parts). window: steps per unit, never across a checkpoint (null: whole
    # checkpoint segments when they give every actor 4 units, else the log cut into about 64 windows);
    # parts_per_unit: parts forged together (null: all κ, which share their samples).
    window: Optional[int] = None
    parts_per_unit: Optional[int] = None


ATTACK_NAMES = ("lira", "enhanced", "enhanced_ref", "mentr", "xent", "mida")


@dataclass
class AttackConfig:
    # None: every attack that can run in the setting, i.e. all of ATTACK_NAMES with data.flip, all but mida without.
    attacks: Optional[list] = None
    shadows: int = 16  # LiRA's default; even
    # Shadow architecture and schedule; None: the target's. The paper's (Appendix C, LiRA's code) are 16 cnn32_3_max
    # for MNIST (lr 0.001, batch 64, 20 epochs) and 16 wrn28_2 for CIFAR-10 (lr 0.1, batch 256, 100 epochs); LiRA's
    # code trains them with momentum 0.9 and weight decay 5e-4. The paper configs set all of these.
    shadow_model: Optional[str] = None
    shadow_epochs: Optional[int] = None
    shadow_lr: Optional[float] = None
    shadow_batch_size: Optional[int] = None
    shadow_momentum: Optional[float] = None
    shadow_weight_decay: Optional[float] = None
    holdout: Optional[int] = None  # |V|, held-out non-members (default n; where they come from: attacks/evaluate.py)
    population_data: Optional[int] = None  # |P|, EnhancedMIA's (attack P's) population data (default |V|)
    control: int = 4  # shadows that in turn play the target for the exchangeable control (0: none)
    common: int = 5  # Common points per evaluated point (the paper: 5)
    validation: int = 5  # Validation points per evaluated point (the paper: 5)


@dataclass
class RayConfig:
    # "auto": as many actors as the cluster's GPUs allow (its CPUs when no GPU is asked for), up to the work
    actors: Union[int, str] = "auto"
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0  # 1 on a GPU cluster: always requested, so an autoscaler adds GPU nodes
    address: Optional[str] = None  # a cluster to join (or $RAY_ADDRESS); None: a private local Ray
    units_in_flight: int = 2  # units queued per actor (backpressure: the driver hands out work as units land)


@dataclass
class WandbConfig:
    mode: Optional[str] = None  # online | offline | disabled; None: online with an API key, else offline
    project: str = "rayforge"
    entity: Optional[str] = None


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    forge: ForgeConfig = field(default_factory=ForgeConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, allowing int -> float; raise a one-line error otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], where)
        for candidate in inner:  # the first type that accepts the value
            try:
                return _coerce(value, candidate, where)
            except RayforgeError:
                pass
        names = " or ".join(getattr(t, "__name__", str(t)) for t in inner)
        raise RayforgeError(f"config: '{where}' must be {names}, got {value!r}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise RayforgeError(f"config: '{where}' must be a mapping, got {value!r}")
        return _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise RayforgeError(f"config: '{where}' must be an integer, got {value!r}")
    expected = {"list": list, "dict": dict}.get(getattr(tp, "__name__", ""), tp)
    if origin is not None:
        expected = origin
    if not isinstance(value, expected):
        raise RayforgeError(f"config: '{where}' must be {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise RayforgeError(f"config: unknown key '{where}' (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name in known:
        if name in raw:
            where = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(raw[name], hints[name], where)
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RayforgeError(f"config: cannot set '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(items: typing.Iterable[str]) -> list[tuple[str, Any]]:
    """Parse `key=value` strings; values are YAML scalars (so `lr=0.1`, `flip=true`, `subset=null` work)."""
    out = []
    for item in items:
        if "=" not in item:
            raise RayforgeError(f"--set expects key=value, got '{item}'")
        key, text = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(text)))
    return out


def config_from_dict(raw: dict, overrides: typing.Iterable[str] = ()) -> Config:
    raw = dict(raw or {})
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    cfg = _build(Config, raw)
    if cfg.attack.attacks is None:
        cfg.attack.attacks = [a for a in ATTACK_NAMES if a != "mida" or cfg.data.flip]
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise RayforgeError(f"config: no such file '{path}'")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RayforgeError(f"config: '{path}' is not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise RayforgeError(f"config: '{path}' must hold a mapping at the top level")
    try:
        return config_from_dict(raw, overrides)
    except RayforgeError as exc:
        raise RayforgeError(f"{exc} [in {path}]") from None


def validate(cfg: Config) -> None:
    t = cfg.train
    checks = [
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.lr > 0, "train.lr must be > 0"),
        (0 <= t.momentum < 1, "train.momentum must be in [0, 1)"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.lr_schedule in ("constant", "cosine"), "train.lr_schedule must be 'constant' or 'cosine'"),
        (t.device in ("auto", "cpu", "cuda"), "train.device must be auto, cpu or cuda"),
        (t.checkpoint_every is None or t.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (cfg.data.subset is None or cfg.data.subset >= 1, "data.subset must be >= 1"),
        (cfg.forge.kappa >= 1, "forge.kappa must be >= 1"),
        (cfg.forge.mu >= 1, "forge.mu must be >= 1"),
        (cfg.forge.lam >= 1, "forge.lam must be >= 1"),
        (cfg.forge.chunk >= 1, "forge.chunk must be >= 1"),
        (cfg.forge.pool_size >= 1, "forge.pool_size must be >= 1"),
        (cfg.forge.pool_target >= 0 and cfg.forge.pool_rounds >= 0, "forge.pool_target and pool_rounds must be >= 0"),
        (cfg.forge.points is None or cfg.forge.points >= 1, "forge.points must be >= 1"),
        (cfg.forge.dsub_size is None or cfg.forge.dsub_size >= 1, "forge.dsub_size must be >= 1"),
        (cfg.forge.grad_method in ("auto", "hooks", "vmap", "loop"), "forge.grad_method must be auto, hooks, vmap or loop"),
        (cfg.ray.actors == "auto" or (isinstance(cfg.ray.actors, int) and cfg.ray.actors >= 1),
         "ray.actors must be 'auto' or an integer >= 1"),
        (cfg.ray.num_cpus_per_actor >= 0 and cfg.ray.num_gpus_per_actor >= 0,
         "ray.num_cpus_per_actor and ray.num_gpus_per_actor must be >= 0"),
        (cfg.ray.units_in_flight >= 1, "ray.units_in_flight must be >= 1"),
        (cfg.forge.window is None or cfg.forge.window >= 1, "forge.window must be >= 1"),
        (cfg.forge.parts_per_unit is None or cfg.forge.parts_per_unit >= 1, "forge.parts_per_unit must be >= 1"),
        (cfg.wandb.mode in (None, "online", "offline", "disabled"), "wandb.mode must be online, offline or disabled"),
        *attack_checks(cfg),
    ]
    for ok, message in checks:
        if not ok:
            raise RayforgeError(f"config: {message}")


def attack_checks(cfg: Config) -> list[tuple[bool, str]]:
    """(ok, why not) for the attack section: every attack listed must be able to run in this setting."""
    a = cfg.attack
    names = a.attacks if a.attacks is not None else list(ATTACK_NAMES)
    unknown = [x for x in names if x not in ATTACK_NAMES]
    positive = lambda v: v is None or v > 0  # noqa: E731
    return [
        (not unknown, f"attack.attacks: unknown attack {(unknown or [''])[0]!r} (known: {', '.join(ATTACK_NAMES)})"),
        (len(names) >= 1, "attack.attacks is empty: name at least one attack"),
        (len(set(names)) == len(names), "attack.attacks lists an attack twice"),
        (a.shadows >= 2 and a.shadows % 2 == 0, "attack.shadows must be even and >= 2"),
        ("mida" not in names or cfg.data.flip,
         "attack mida needs data.flip: true (it reads the losses of the augmented copies training used); "
         "remove mida from attack.attacks or train with flips"),
        ("lira" not in names or a.shadows >= 4,
         "attack lira needs attack.shadows >= 4 (its leave-one-out calibration must leave every point an IN and "
         "an OUT shadow)"),
        (0 <= a.control <= a.shadows, "attack.control must be between 0 and attack.shadows"),
        (a.control == 0 or a.shadows >= 4,
         "attack.control needs attack.shadows >= 4 (with one shadow playing the target, every point must keep an "
         "IN and an OUT shadow); set attack.control: 0"),
        (a.holdout is None or a.holdout >= 1, "attack.holdout must be >= 1"),
        (a.population_data is None or a.population_data >= 1, "attack.population_data must be >= 1"),
        (a.common >= 0 and a.validation >= 0, "attack.common and attack.validation must be >= 0"),
        (all(positive(v) for v in (a.shadow_epochs, a.shadow_lr, a.shadow_batch_size)),
         "attack.shadow_epochs, shadow_lr and shadow_batch_size must be > 0"),
        (a.shadow_momentum is None or 0 <= a.shadow_momentum < 1, "attack.shadow_momentum must be in [0, 1)"),
        (a.shadow_weight_decay is None or a.shadow_weight_decay >= 0, "attack.shadow_weight_decay must be >= 0"),
        (_known_model(a.shadow_model), f"attack.shadow_model: unknown model {a.shadow_model!r}"),
    ]


def _known_model(name: str | None) -> bool:
    if name is None or ":" in name:  # a `module:callable` model is resolved when it is built
        return True
    from rayforge.models import model_names

    return name in model_names()


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
