"""The Proof-of-Repudiation artifact on disk, and what export and verify share about it.

A PoR directory holds exactly:

    por.json                              the manifest (format "rayforge-por-1", strictly schema-checked on read)
    steps.parquet                         the forged log: step int64, batch list<int32>, flip list<bool>, lr float64
    ckpt-<8-digit step>.safetensors       the forged trajectory's state *before* that step, at every step listed in
                                          por.json "checkpoints": param/*, buffer/*, velocity/* (with momentum)

Nothing else. PoRs travel to parties who must treat them as hostile, so the reader here parses JSON with duplicate
keys, NaN and Infinity refused, checks the exact key set and the type and range of every value, and never takes a
path from the artifact.

`model_sha256` is the canonical hash of a model's parameters that ties a PoR to a deployed model (see its docstring).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from rayforge.config import DataConfig, config_from_dict
from rayforge.errors import MalformedArtifact, RayforgeError

POR_FORMAT = "rayforge-por-1"
MANIFEST = "por.json"
STEPS_FILE = "steps.parquet"
MODEL_HASH_TAG = b"rayforge-model-sha256-1"
MAX_MANIFEST_BYTES = 64 << 20

# Bounds on what a hostile manifest may ask a verifier to build or run (far above any real setting).
MAX_POINTS = 100_000_000
MAX_STEPS = 100_000_000
MAX_SYNTHETIC_VALUES = 1 << 27  # synthetic points x pixels (generated as float64: 1 GiB)
MAX_SIDE = 4096
MAX_CHANNELS = 64
MAX_THREADS = 256
MAX_SEED = (1 << 63) - 1

TOP_KEYS = {"format", "point", "point_sha256", "excluded", "deployed_sha256", "dataset", "training", "checkpoints",
            "epsilon", "d_theta"}
DATASET_KEYS = {"config", "seed", "n", "train_sha256"}
TRAINING_KEYS = {"model", "in_shape", "batch_size", "momentum", "weight_decay", "lr", "lr_schedule", "epochs",
                 "threads", "flip"}
DATA_CONFIG_KEYS = {f.name for f in dataclasses.fields(DataConfig)}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------------------------------------- model hash

def _field(h, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def model_sha256(params: Mapping[str, torch.Tensor]) -> str:
    """Canonical SHA-256 (hex) of a model's parameters, independent of file format and key order.

    `params` maps parameter names (as `named_parameters()` gives them, without the checkpoint's "param/" prefix;
    see `params_of`) to tensors. The hash covers, after the tag b"rayforge-model-sha256-1" and for every name in
    sorted (Unicode code point) order: the name (UTF-8), the dtype (e.g. "torch.float32"), the shape (decimal dims
    joined by ","), and the tensor's raw C-contiguous bytes (host order: little-endian on every platform torch
    supports). Each field is preceded by its length as an 8-byte little-endian integer, so no two different models
    give the same byte stream. Buffers (BatchNorm statistics) and optimizer state are not covered: like ε and d_θ,
    the hash is about θ.
    """
    h = hashlib.sha256()
    _field(h, MODEL_HASH_TAG)
    for name in sorted(params):
        t = params[name].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        _field(h, name.encode("utf-8"))
        _field(h, str(t.dtype).encode())
        _field(h, ",".join(str(d) for d in t.shape).encode())
        _field(h, raw)
    return h.hexdigest()


def params_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters of a checkpoint-style tensor dict ("param/<name>" keys), by their plain names."""
    return {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}


def l2_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """‖a − b‖₂ over the tensors of `a` (b must hold the same names), in float64 and in one fixed order: names
    sorted, each tensor's squares summed by numpy (pairwise, single-threaded). The same tensors therefore give the
    same bits whatever the dict order or thread count, so a PoR's ε is compared with the verifier's measurement
    exactly, without slack."""
    sq = 0.0
    for name in sorted(a):
        diff = _float64(a[name]) - _float64(b[name])
        sq += float(np.square(diff).sum())
    return math.sqrt(sq)


def _float64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).contiguous().numpy().reshape(-1)


# ---------------------------------------------------------------------------------------------- manifest

@dataclass(frozen=True)
class TrainingSpec:
    """What the forged log claims about training: the update rule g of the PoL and the learning-rate schedule."""

    model: str
    in_shape: tuple[int, int, int]
    batch_size: int
    momentum: float
    weight_decay: float
    lr: float
    lr_schedule: str
    epochs: int
    threads: int | None
    flip: bool


@dataclass(frozen=True)
class Manifest:
    point: int
    point_sha256: str
    excluded: np.ndarray  # int64, sorted, unique, holds `point`
    deployed_sha256: str
    data: DataConfig
    seed: int
    n: int
    train_sha256: str
    training: TrainingSpec
    checkpoints: list[int]
    epsilon: float
    d_theta: float

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.training.batch_size)

    @property
    def total_steps(self) -> int:
        """τ as the declared training implies it: epochs x ceil(n / batch_size)."""
        return self.training.epochs * self.steps_per_epoch


def _bad(where: str, what: str) -> MalformedArtifact:
    return MalformedArtifact(f"{MANIFEST}: '{where}' {what}")


def _keys(obj: Any, expected: set[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise _bad(where, f"must be an object, got {type(obj).__name__}")
    missing, extra = sorted(expected - set(obj)), sorted(set(obj) - expected)
    if missing or extra:
        raise _bad(where, f"has the wrong keys (missing {missing}, unknown {extra})")
    return obj


def _int(v: Any, lo: int, hi: int, where: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(where, f"must be an integer in [{lo}, {hi}], got {v!r}"[:300])
    return v


def _float(v: Any, where: str, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
           hi_open: bool = False) -> float:
    ok = type(v) in (int, float) and math.isfinite(v)
    if ok:
        v = float(v)
        ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if not ok:
        raise _bad(where, f"must be a finite number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, "
                          f"got {v!r}"[:300])
    return v


def _str(v: Any, where: str, choices=None) -> str:
    if type(v) is not str or (choices is not None and v not in choices):
        raise _bad(where, f"must be {'one of ' + str(sorted(choices)) if choices else 'a string'}, got {v!r}"[:300])
    return v


def _hex64(v: Any, where: str) -> str:
    if type(v) is not str or not _HEX64.match(v):
        raise _bad(where, "must be 64 lowercase hex digits")
    return v


def _bool(v: Any, where: str) -> bool:
    if type(v) is not bool:
        raise _bad(where, f"must be true or false, got {v!r}"[:300])
    return v


def _int_list(v: Any, where: str, lo: int, hi: int, min_len: int, max_len: int) -> list[int]:
    if type(v) is not list or not min_len <= len(v) <= max_len:
        raise _bad(where, f"must be a list of {min_len}..{max_len} integers")
    out = [_int(x, lo, hi, f"{where}[{i}]") for i, x in enumerate(v)]
    if any(b <= a for a, b in zip(out, out[1:])):
        raise _bad(where, "must be strictly increasing")
    return out


def _data_config(raw: Any, seed: int) -> DataConfig:
    from rayforge.data import KNOWN_DATASETS

    raw = _keys(raw, DATA_CONFIG_KEYS, "dataset.config")
    _str(raw["dataset"], "dataset.config.dataset", KNOWN_DATASETS)
    if raw["data_root"] is not None:
        _str(raw["data_root"], "dataset.config.data_root")  # recorded, never used: see verify_por's data_root
    if raw["subset"] is not None:
        _int(raw["subset"], 1, MAX_POINTS, "dataset.config.subset")
    _bool(raw["flip"], "dataset.config.flip")
    shape = raw["synthetic_shape"]
    if type(shape) is not list or len(shape) != 3:
        raise _bad("dataset.config.synthetic_shape", "must be a list of 3 integers")
    _int(shape[0], 1, MAX_CHANNELS, "dataset.config.synthetic_shape[0]")
    for i in (1, 2):
        _int(shape[i], 1, MAX_SIDE, f"dataset.config.synthetic_shape[{i}]")
    pixels = shape[0] * shape[1] * shape[2]
    for key in ("synthetic_train", "synthetic_test"):
        _int(raw[key], 1, MAX_POINTS, f"dataset.config.{key}")
        if raw[key] * pixels > MAX_SYNTHETIC_VALUES:
            raise _bad(f"dataset.config.{key}", f"asks for more than {MAX_SYNTHETIC_VALUES} generated values")
    try:  # the project's own config checks (types, ranges) on top
        return config_from_dict({"seed": seed, "data": dict(raw)}).data
    except RayforgeError as exc:
        raise MalformedArtifact(f"{MANIFEST}: 'dataset.config' is not a valid data config ({exc})") from None


def _model_name(v: Any) -> str:
    """A registered model, or `module:callable` (built by the verifier only when trusted)."""
    from rayforge.models import is_code_reference, model_names

    if type(v) is str and is_code_reference(v):
        return v
    return _str(v, "training.model", set(model_names()))


def _training(raw: Any) -> TrainingSpec:
    raw = _keys(raw, TRAINING_KEYS, "training")
    shape = raw["in_shape"]
    if type(shape) is not list or len(shape) != 3:
        raise _bad("training.in_shape", "must be a list of 3 integers")
    in_shape = (_int(shape[0], 1, MAX_CHANNELS, "training.in_shape[0]"),
                _int(shape[1], 1, MAX_SIDE, "training.in_shape[1]"),
                _int(shape[2], 1, MAX_SIDE, "training.in_shape[2]"))
    return TrainingSpec(
        model=_model_name(raw["model"]),
        in_shape=in_shape,
        batch_size=_int(raw["batch_size"], 1, MAX_POINTS, "training.batch_size"),
        momentum=_float(raw["momentum"], "training.momentum", 0.0, 1.0, hi_open=True),
        weight_decay=_float(raw["weight_decay"], "training.weight_decay", 0.0),
        lr=_float(raw["lr"], "training.lr", 0.0, lo_open=True),
        lr_schedule=_str(raw["lr_schedule"], "training.lr_schedule", {"constant", "cosine"}),
        epochs=_int(raw["epochs"], 1, MAX_STEPS, "training.epochs"),
        threads=None if raw["threads"] is None else _int(raw["threads"], 1, MAX_THREADS, "training.threads"),
        flip=_bool(raw["flip"], "training.flip"),
    )


def _strict_json(data: bytes) -> Any:
    def no_duplicates(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise MalformedArtifact(f"{MANIFEST}: duplicate key '{k}'"[:300])
            out[k] = v
        return out

    def no_constants(name):
        raise MalformedArtifact(f"{MANIFEST}: {name} is not allowed")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, over-long integers, deep nesting
        raise MalformedArtifact(f"{MANIFEST}: not valid JSON ({type(exc).__name__})") from None


def parse_manifest(obj: Any) -> Manifest:
    """Check a decoded por.json strictly: exact key sets, types, ranges and internal consistency."""
    top = _keys(obj, TOP_KEYS, "<top>")
    if top["format"] != POR_FORMAT:
        raise _bad("format", f"must be \"{POR_FORMAT}\", got {top['format']!r}"[:300])
    ds = _keys(top["dataset"], DATASET_KEYS, "dataset")
    seed = _int(ds["seed"], 0, MAX_SEED, "dataset.seed")
    n = _int(ds["n"], 1, MAX_POINTS, "dataset.n")
    data = _data_config(ds["config"], seed)
    training = _training(top["training"])
    if training.flip != data.flip:
        raise _bad("training.flip", "disagrees with dataset.config.flip")
    point = _int(top["point"], 0, n - 1, "point")
    excluded = _int_list(top["excluded"], "excluded", 0, n - 1, 1, n - 1)
    if point not in excluded:
        raise _bad("excluded", "must hold the point")
    steps_per_epoch = -(-n // training.batch_size)
    if training.epochs * steps_per_epoch > MAX_STEPS:
        raise _bad("training.epochs", f"implies more than {MAX_STEPS} steps")
    checkpoints = _int_list(top["checkpoints"], "checkpoints", 0, MAX_STEPS, 2, MAX_STEPS)
    if checkpoints[0] != 0:
        raise _bad("checkpoints", "must start at step 0")
    return Manifest(
        point=point,
        point_sha256=_hex64(top["point_sha256"], "point_sha256"),
        excluded=np.asarray(excluded, dtype=np.int64),
        deployed_sha256=_hex64(top["deployed_sha256"], "deployed_sha256"),
        data=data, seed=seed, n=n,
        train_sha256=_hex64(ds["train_sha256"], "dataset.train_sha256"),
        training=training,
        checkpoints=checkpoints,
        epsilon=_float(top["epsilon"], "epsilon", 0.0),
        d_theta=_float(top["d_theta"], "d_theta", 0.0),
    )


def read_manifest(por_dir: Path) -> Manifest:
    path = Path(por_dir) / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise MalformedArtifact(f"{por_dir}: no {MANIFEST} (or not a regular file)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise MalformedArtifact(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
    return parse_manifest(_strict_json(path.read_bytes()))
