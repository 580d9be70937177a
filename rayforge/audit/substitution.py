"""The mechanism of Theorem 1, measured per training point: can the rest of D stand in for the point's own gradient
at the steps where the point was trained on?

A PoR for x* must replace x* in every batch that held it (Algorithm 2 swaps whole batches, the `swap` strategy and
the minimal PoR swap members). The part of x*'s own per-sample gradient g* that no substitute reproduces is what the
forged trajectory cannot recover: Theorem 1's proof bounds it from below by |σ(wᵀx₁) − y₁|·dist(x₁, Γ) for logistic
regression, and Sections III-B/VI expect it to be large for outliers and out-of-distribution points.

At every step t of the original log (θ_t replayed from the checkpoints), for every point i of the batch B_t:

    r_{i,t} = min_j ‖g_i(θ_t) − g_j(θ_t)‖          over a pool P_t of substitutes (D minus B_t, minus content
                                                     twins of i; both orientations when training used flips)

which is the single-swap rule of `rayforge.forge.swap.greedy_picks` (the minimal PoR's substitute), evaluated for
every member at once. P_t, shared by the whole batch, holds `pool_size` points drawn per step from (seed, step) and
the `neighbours` nearest same-label points (normalised pixels) of every audited member: a per-sample gradient is
the point's residual times its features, so those are its likeliest stand-ins, and a random pool alone misses them
as n grows. A step costs one per-sample gradient pass over |B_t| + |P_t| samples (`rayforge.forge.swap.per_sample`:
exact hooks, or eval mode for BatchNorm models) and one |B_t| x |P_t| product. With pool_size >= n every other
point is a candidate, as in the theorem; a smaller pool only makes r larger (a conservative audit).

Each (step, point) row keeps ‖g_i‖, r, ⟨g_i, g_i − g_j*⟩, the substitute and the batch gradient norm; the audit
(`rayforge.audit.criterion`) aggregates them per point.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from rayforge.errors import RayforgeError
from rayforge.forge.engine import check_segment_replays
from rayforge.forge.splits import sample_points
from rayforge.forge.gradients import flatten
from rayforge.forge.swap import per_sample
from rayforge.forge.twins import content_classes
from rayforge.train.replay import walk_trajectory
from rayforge.train.run import TrainingRun, set_determinism

POOL_STREAM = 0xA0D1
DEFAULT_POOL = 128
DEFAULT_NEIGHBOURS = 3
# Rows of pixel distances computed at once while finding neighbours (bounds memory for large classes).
NEIGHBOUR_BLOCK = 1024
# Per-sample gradients held at once while scanning the pool (floats): bounds memory for large models.
POOL_BUDGET = 1 << 26

ROWS_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("point", pa.int64()),
    ("lr", pa.float64()),
    ("batch_size", pa.int32()),
    ("grad_norm", pa.float64()),  # ‖g_i(θ_t)‖, the point's own per-sample gradient
    ("residual", pa.float64()),  # min_j ‖g_i − g_j‖ over the pool
    ("dot", pa.float64()),  # ⟨g_i, g_i − g_j*⟩
    ("substitute", pa.int64()),  # j*
    ("substitute_flip", pa.bool_()),
    ("batch_grad_norm", pa.float64()),  # ‖∇ mean-CE(B_t)‖ at θ_t
])


@dataclass(frozen=True)
class SubstitutionParams:
    """Everything that determines the output bytes. `epochs`: audit that many evenly spaced epochs (the first and
    the last included), None for all; `points`: audit only the points of the sampling approximation (the same
    seeded sample as `rayforge forge --points`), None for all."""

    pool_size: int = DEFAULT_POOL
    seed: int = 0
    threads: int = 1
    epochs: int | None = None
    points: int | None = None
    neighbours: int = DEFAULT_NEIGHBOURS

    def to_json(self) -> dict:
        return asdict(self)

    def validate(self, run: TrainingRun) -> None:
        for name in ("pool_size", "epochs", "points", "neighbours"):
            value = getattr(self, name)
            low = 0 if name == "neighbours" else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise RayforgeError(f"audit: {name} must be an integer >= {low}, got {value!r}")


def audited_epochs(total: int, count: int | None) -> np.ndarray:
    """`count` evenly spaced epochs of `total` (all when None or >= total), first and last included."""
    if count is None or count >= total:
        return np.arange(total)
    return np.unique(np.round(np.linspace(0, total - 1, count)).astype(np.int64))


class SubstitutionContext:
    """What a worker holds once: the log, the training tensors, the content classes and a per-sample model copy."""

    def __init__(self, run: TrainingRun, params: SubstitutionParams, device: torch.device | None = None):
        set_determinism(params.threads)
        torch.set_num_threads(params.threads)
        self.run, self.params = run, params
        self.device = device or run.device()
        dataset = run.load_dataset()
        self.data = run.tensor_data(dataset, self.device)
        self.flip = run.cfg.data.flip
        self.classes = content_classes(dataset.train, self.flip)  # twins share a class
        self.model_copy = None  # per-sample gradients hook a copy of their own
        self.cache: dict = {}
        n, spe = len(self.data), -(-len(self.data) // run.cfg.train.batch_size)
        sample = sample_points(n, params.points, params.seed)
        self.audited = None if sample is None else np.isin(np.arange(n), sample)
        epochs = audited_epochs(-(-run.total_steps // spe), params.epochs)
        self._steps = np.isin(np.arange(run.total_steps) // spe, epochs)
        if self.audited is not None:
            self._steps &= [bool(self.audited[b].any()) for b in run.steps.batch]
        self.neighbours = nearest_neighbours(self.data, self.classes, params.neighbours,
                                             np.arange(n) if sample is None else sample)

    def audited_step(self, step: int) -> bool:
        return bool(self._steps[step])

    def pool(self, step: int, batch: np.ndarray, audited: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices, flips) of step `step`'s substitutes, none from B_t: a seeded draw of `pool_size` points, plus the
        nearest neighbours of the audited members `audited`; both orientations when training used flips."""
        rng = np.random.default_rng([self.params.seed, POOL_STREAM, step])
        rest = np.setdiff1d(np.arange(len(self.data)), batch)
        drawn = rng.choice(rest, size=min(self.params.pool_size, len(rest)), replace=False)
        near = self.neighbours[audited].ravel()
        pool = np.union1d(drawn, near[(near >= 0) & ~np.isin(near, batch)])
        if not self.flip:
            return pool, np.zeros(len(pool), bool)
        return np.concatenate([pool, pool]), np.repeat([False, True], len(pool))


def nearest_neighbours(data, classes: np.ndarray, k: int, points: np.ndarray) -> np.ndarray:
    """(n, k) int64: for each of `points`, its k nearest points of the same label in normalised pixel space, its
    content twins and itself excluded (-1 pads; rows of other points are -1). Per-sample gradients are a point's
    residual times its features, so these are the likeliest stand-ins; they join every step's random pool."""
    n = len(data)
    out = np.full((n, k), -1, dtype=np.int64)
    if k == 0:
        return out
    x = data.x.reshape(n, -1).cpu().numpy()
    labels = data.y.cpu().numpy()
    for label in np.unique(labels[points]):
        members = np.flatnonzero(labels == label)
        xm = x[members]
        sq = (xm * xm).sum(1)
        rows_all = points[labels[points] == label]
        for start in range(0, len(rows_all), NEIGHBOUR_BLOCK):
            rows = rows_all[start:start + NEIGHBOUR_BLOCK]
            d2 = (x[rows] * x[rows]).sum(1)[:, None] - 2 * x[rows] @ xm.T + sq[None, :]
            d2[classes[rows][:, None] == classes[members][None, :]] = np.inf  # itself and its twins
            order = np.argsort(d2, axis=1, kind="stable")[:, :k]
            found = np.where(np.isfinite(np.take_along_axis(d2, order, axis=1)), members[order], -1)
            out[rows, :found.shape[1]] = found
    return out


def _grads(ctx: SubstitutionContext, params, idx: np.ndarray, flips: np.ndarray) -> torch.Tensor:
    x, y = ctx.data.batch(idx, flips)
    return per_sample(ctx.model_copy, params, x, y, ctx.cache)


def step_rows(ctx: SubstitutionContext, step: int, model, batch_grads: list[torch.Tensor],
              audited: np.ndarray | None = None) -> dict:
    """The rows of the members of B_t at θ_t (the model's current parameters): all of them, or those where the
    boolean mask `audited` (over the training set) is True."""
    if ctx.model_copy is None:
        ctx.model_copy = copy.deepcopy(model)
    params = dict(model.named_parameters())
    full_batch = np.asarray(ctx.run.steps.batch[step], dtype=np.int64)
    keep = slice(None) if audited is None else audited[full_batch]
    batch = full_batch[keep]
    pool, pool_flips = ctx.pool(step, full_batch, batch)
    flips = np.asarray(ctx.run.steps.flip[step], dtype=bool)[keep]
    with torch.no_grad():
        gb = _grads(ctx, params, batch, flips)
        sq_b = (gb * gb).sum(1)
        best = torch.full((len(batch),), float("inf"), dtype=gb.dtype, device=gb.device)
        arg = torch.zeros(len(batch), dtype=torch.long, device=gb.device)
        banned = torch.as_tensor(ctx.classes[batch][:, None] == ctx.classes[pool][None, :], device=gb.device)
        chunk = max(1, POOL_BUDGET // gb.shape[1])
        for start in range(0, len(pool), chunk):
            gp = _grads(ctx, params, pool[start:start + chunk], pool_flips[start:start + chunk])
            # ‖g_i − g_j‖² = ‖g_i‖² − 2 g_i·g_j + ‖g_j‖², only to rank; the winner's residual is recomputed exactly
            d2 = sq_b[:, None] - 2 * gb @ gp.T + (gp * gp).sum(1)[None, :]
            d2 = d2.masked_fill(banned[:, start:start + chunk], float("inf"))
            low, where = d2.min(1)
            better = low < best
            best = torch.where(better, low, best)
            arg = torch.where(better, where + start, arg)
        chosen = arg.cpu().numpy()
        gj = _grads(ctx, params, pool[chosen], pool_flips[chosen])
        diff = gb - gj
        residual = torch.linalg.vector_norm(diff, dim=1)
        dot = (gb * diff).sum(1)
        batch_norm = float(torch.linalg.vector_norm(flatten(batch_grads)))
    b = len(batch)
    return {
        "step": np.full(b, step, np.int64), "point": batch, "lr": np.full(b, float(ctx.run.steps.lr[step])),
        "batch_size": np.full(b, len(full_batch), np.int32), "grad_norm": sq_b.sqrt().double().cpu().numpy(),
        "residual": residual.double().cpu().numpy(), "dot": dot.double().cpu().numpy(),
        "substitute": pool[chosen], "substitute_flip": pool_flips[chosen], "batch_grad_norm": np.full(b, batch_norm),
    }


def substitution_unit(ctx: SubstitutionContext, start: int, stop: int) -> pa.Table:
    """Rows for the audited steps and points of the checkpoint segment [start, stop), walking the original
    trajectory from its checkpoint (only up to the last audited step)."""
    todo = [t for t in range(start, stop) if ctx.audited_step(t)]
    parts = []
    if todo:
        model = None
        for t, model, grads in walk_trajectory(ctx.run, ctx.data, start, todo[-1] + 1, ctx.device):
            if t in todo:
                parts.append(step_rows(ctx, t, model, grads, ctx.audited))
        if todo[-1] + 1 == stop and stop in ctx.run.checkpoints:
            check_segment_replays(ctx.run, model, start, stop)
    return rows_table(parts)


def rows_table(parts: list[dict]) -> pa.Table:
    cols = {name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0) for name in ROWS_SCHEMA.names}
    return pa.table({name: pa.array(cols[name], type=ROWS_SCHEMA.field(name).type) for name in ROWS_SCHEMA.names},
                    schema=ROWS_SCHEMA)
