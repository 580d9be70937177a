"""Shadow models: K models each trained on a seeded random half of the population (LiRA's construction).

Every point is IN for exactly K/2 shadows (per point, a random permutation of the K shadows with the first K/2
IN, as in the reference's `keep.argsort(0) < K/2`), so every point has equally many IN and OUT models to fit its
statistics from. Each shadow's logits on every point, plain and mirrored (plus any other view an attack asks for,
e.g. MIDA's shifted copies), are computed once and cached: every attack needs them, and they never change.

The shadows' architecture and schedule are the attack config's (`shadow_train_config`): the paper's are LiRA's
cnn32-3-max (MNIST) and WRN-28-2 (CIFAR-10); the target's by default.

On disk (a directory; safetensors and JSON only, never pickle):
    shadows.json               model name, population fingerprint, K, N, in_mask (K strings of '0'/'1')
    shadow-<kk>.safetensors    state of shadow k: param/<name>, buffer/<name>
    logits.safetensors         one float32 (K, N, C) tensor per cached view, named by `Query.key`
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rayforge.attacks.base import Population, model_logits
from rayforge.attacks.views import MIRROR, PLAIN, Query
from rayforge.config import Config, TrainConfig
from rayforge.errors import MalformedArtifact, RayforgeError
from rayforge.models import build_model
from rayforge.train.log import check_state, load_state
from rayforge.io import atomic_write_json, read_tensors, save_tensors
from rayforge.train.schedule import make_plan
from rayforge.train.sgd import SGDHyper, train_step, zero_velocity

SHADOWS_FORMAT = "rayforge-shadows/2"


def shadow_model_name(cfg: Config) -> str:
    return cfg.attack.shadow_model or cfg.model.name


def shadow_train_config(cfg: Config) -> TrainConfig:
    """The target's training config with the attack config's shadow schedule (epochs, lr, batch size, momentum,
    weight decay) where it sets one."""
    a = cfg.attack
    chosen = {"epochs": a.shadow_epochs, "lr": a.shadow_lr, "batch_size": a.shadow_batch_size,
              "momentum": a.shadow_momentum, "weight_decay": a.shadow_weight_decay}
    return dataclasses.replace(cfg.train, **{k: v for k, v in chosen.items() if v is not None})


def fresh_model(model_name: str, pop: Population, seed: int) -> nn.Module:
    """A model initialised from `seed` on the population's device, without touching torch's global RNG
    (shadows are built inside other code, e.g. an actor, whose own randomness must not shift)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_name, pop.in_shape, pop.num_classes)
    return model.to(pop.device)


def train_shadow(pop: Population, member_ids: np.ndarray, model_name: str, train_cfg: TrainConfig,
                 seed: int) -> nn.Module:
    """Plain in-memory SGD on the population points `member_ids`, exactly as the project trains (same step, same
    schedule, per-sample flips from the seeded plan when pop.flip); initialised and shuffled from `seed`."""
    member_ids = pop.check_points(member_ids)
    if len(member_ids) == 0:
        raise RayforgeError("a shadow model needs at least one member")
    model = fresh_model(model_name, pop, seed)
    velocity = zero_velocity(model)
    hyper = SGDHyper(momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)
    plan = make_plan(len(member_ids), train_cfg, seed, pop.flip)
    for batch, flips, lr in zip(plan.batches, plan.flips, plan.lrs):
        x, y = pop.data.batch(member_ids[batch], flips)
        train_step(model, velocity, x, y, float(lr), hyper)
    model.eval()
    return model


def balanced_in_mask(k: int, n: int, seed: int) -> np.ndarray:
    """(K, N) bool: per point, a random K/2 of the K shadows have it IN."""
    if k < 2 or k % 2:
        raise RayforgeError(f"the number of shadow models must be even and >= 2, got {k}")
    rng = np.random.default_rng([seed, 0x5AD0])
    # argsort of iid uniforms along the shadow axis is a uniform random permutation per point.
    rank = rng.random((k, n)).argsort(axis=0).argsort(axis=0)
    return rank < k // 2


def shadow_seed(seed: int, k: int) -> int:
    """Independent training seed for shadow k (init and batch order)."""
    return int(np.random.default_rng([seed, 0x5AD1, k]).integers(2**31 - 1))


class ShadowSet:
    """K shadow models (as CPU state dicts), their IN/OUT assignment and their cached logits on the population, per
    view (`Query`): plain and mirrored always, others computed on first request."""

    def __init__(self, pop: Population, model_name: str, in_mask: np.ndarray, states: list[dict[str, torch.Tensor]],
                 logits: dict[Query, np.ndarray] | None = None):
        in_mask = np.array(in_mask, dtype=bool)  # own copies: they are frozen below, the caller's stay writable
        if in_mask.ndim != 2 or in_mask.shape[1] != len(pop) or in_mask.shape[0] != len(states):
            raise RayforgeError(f"in_mask must be (K={len(states)}, N={len(pop)}), got {in_mask.shape}")
        self.pop = pop
        self.model_name = model_name
        self.in_mask = in_mask
        self.in_mask.flags.writeable = False  # attacks share it; nobody may edit it
        self.states = states
        self._logits: dict[Query, np.ndarray] = {}
        for query, arr in (logits or {}).items():
            self._store(query, arr)
        self.ensure((PLAIN, MIRROR))

    @property
    def k(self) -> int:
        return len(self.states)

    def _store(self, query: Query, arr: np.ndarray) -> None:
        arr = np.array(arr, dtype=np.float32)
        if arr.shape != (self.k, len(self.pop), self.pop.num_classes) or not np.all(np.isfinite(arr)):
            raise RayforgeError(f"shadow logits must be finite ({self.k}, {len(self.pop)}, {self.pop.num_classes}), "
                                f"got {arr.shape} for view {query.key}")
        arr.flags.writeable = False
        self._logits[query] = arr

    def ensure(self, queries) -> None:
        """Compute (once) every shadow's logits for the views in `queries` that are not cached yet."""
        missing = sorted(set(queries) - set(self._logits))
        if not missing:
            return
        per_shadow = []
        for j in range(self.k):
            model = self.model(j)
            per_shadow.append([model_logits(model, self.pop, query=q) for q in missing])
        for i, query in enumerate(missing):
            self._store(query, np.stack([rows[i] for rows in per_shadow]))

    def model(self, k: int) -> nn.Module:
        """Shadow k as a module on the population's device, in eval mode."""
        model = fresh_model(self.model_name, self.pop, 0)
        load_state(self.states[k], model, None)
        return model.eval()

    def logits(self, k: int, query: Query = PLAIN) -> np.ndarray:
        """Read-only float32 (N, C) logits of shadow k on every population point under view `query`."""
        return self.all_logits(query)[k]

    def all_logits(self, query: Query = PLAIN) -> np.ndarray:
        """Read-only float32 (K, N, C)."""
        self.ensure((query,))
        return self._logits[query]

    def cached_logits(self) -> dict[str, np.ndarray]:
        """Every view's logits computed so far, keyed by `Query.key` (what `ShadowSet(..., logits)` takes back via
        `Query.from_key`)."""
        return {q.key: arr for q, arr in self._logits.items()}

    def without(self, k: int) -> "ShadowSet":
        """The other K-1 shadows (sharing states and cached logits): the shadow set of the exchangeable control,
        where shadow k plays the target."""
        keep = np.arange(self.k) != k
        return ShadowSet(self.pop, self.model_name, self.in_mask[keep], [s for j, s in enumerate(self.states) if j != k],
                         {q: arr[keep] for q, arr in self._logits.items()})

    # ---- persistence ------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for j, state in enumerate(self.states):
            save_tensors(directory / f"shadow-{j:02d}.safetensors", state)
        save_tensors(directory / "logits.safetensors",
                     {q.key: torch.from_numpy(arr.copy()) for q, arr in self._logits.items()})
        # Written last: its presence marks a complete set.
        atomic_write_json(directory / "shadows.json", {
            "format": SHADOWS_FORMAT,
            "model": self.model_name,
            "population": self.pop.fingerprint(),
            "k": self.k,
            "n": len(self.pop),
            "in_mask": ["".join("1" if b else "0" for b in row) for row in self.in_mask],
        })

    @classmethod
    def load(cls, directory: str | Path, pop: Population) -> "ShadowSet":
        """Shadows saved by `save`, checked against `pop` (same content, flip flag and normalisation)."""
        directory = Path(directory)
        meta_path = directory / "shadows.json"
        if not meta_path.is_file():
            raise MalformedArtifact(f"{directory}: no shadows.json (not a saved shadow set, or incomplete)")
        try:
            meta = json.loads(meta_path.read_text())
            k, n, rows = int(meta["k"]), int(meta["n"]), meta["in_mask"]
            model_name, fingerprint = str(meta["model"]), str(meta["population"])
            ok = meta.get("format") == SHADOWS_FORMAT and len(rows) == k and all(
                isinstance(r, str) and len(r) == n and set(r) <= {"0", "1"} for r in rows)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise MalformedArtifact(f"{meta_path}: unreadable shadow metadata ({exc})") from None
        if not ok:
            raise MalformedArtifact(f"{meta_path}: wrong format or in_mask shape (expected {SHADOWS_FORMAT})")
        if fingerprint != pop.fingerprint():
            raise RayforgeError(f"{directory}: these shadows were trained on a different population "
                                f"(content, flip flag or normalisation differ)")
        in_mask = np.array([[c == "1" for c in r] for r in rows], dtype=bool).reshape(k, n)
        template = fresh_model(model_name, pop, 0)
        states = []
        for j in range(k):
            path = directory / f"shadow-{j:02d}.safetensors"
            state = read_tensors(path)
            check_state(state, template, str(path), need_velocity=False)
            states.append(state)
        raw = read_tensors(directory / "logits.safetensors")
        try:
            logits = {Query.from_key(key): tensor.numpy() for key, tensor in raw.items()}
        except ValueError as exc:
            raise MalformedArtifact(f"{directory}/logits.safetensors: {exc}") from None
        if not {PLAIN, MIRROR} <= set(logits):
            raise MalformedArtifact(f"{directory}/logits.safetensors: expected the views {PLAIN.key} and {MIRROR.key}")
        try:
            return cls(pop, model_name, in_mask, states, logits)
        except RayforgeError as exc:
            raise MalformedArtifact(f"{directory}: {exc}") from None


