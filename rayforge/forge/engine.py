"""Phase 1 as plain functions: units of work, one forging unit, and the output table.

A unit is (step window [start, stop), parts): a window of the original trajectory (never across a checkpoint) and
the parts forged in it. Its worker restores θ at `start` (a checkpoint, or a state the trajectory was stepped to by
`original_states`), steps the original trajectory itself and, at every step, forges each part's minibatch. Every
random choice is seeded by (seed, step, part) and every window continues the same replay bit for bit, so a unit's
rows are the same whoever computes them, in whatever order, and however the log is cut into windows.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rayforge.config import Config
from rayforge.errors import MalformedArtifact, RayforgeError
from rayforge.forge import algorithm2, swap
from rayforge.forge.fastgrad import GroupedGradients, make_gradient_evaluator
from rayforge.forge.gradients import flatten
from rayforge.forge.splits import Splits, check_split_params, sample_points
from rayforge.forge.twins import Twins
from rayforge.io import read_table_if_valid, write_parquet
from rayforge.train.replay import replay_steps
from rayforge.train.run import TrainingRun, hyper_of, use_threads
from rayforge.train.sgd import loss_and_grads, sgd_update

FORGED_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("part", pa.int32()),
    ("batch", pa.list_(pa.int32())),
    ("flip", pa.list_(pa.bool_())),
    ("grad_error", pa.float64()),
    ("grad_norm", pa.float64()),
])

# strategy name -> fn(ctx, params, step, parts, target_grad, point_parts, records) -> [ForgedBatch per part];
# records: the original step's per-sample factors (hook path) for the strategies in REUSE_STEP, else None
STRATEGIES: dict[str, Callable] = {"paper": algorithm2.forge_parts, "swap": swap.forge_parts,
                                   "hybrid": swap.forge_parts_hybrid}
REUSE_STEP = {"swap", "hybrid"}


@dataclass(frozen=True)
class ForgeParams:
    """Everything that determines the output bytes (chunk and threads change float rounding, so they count)."""

    strategy: str
    kappa: int
    mu: int
    lam: int
    dsub_size: int | None
    seed: int
    chunk: int
    threads: int
    points: int | None = None  # sampling approximation: forge only what these many sampled points' groups need
    grad_method: str = "auto"  # candidate gradients: hooks (no BatchNorm), vmap or loop; see fastgrad.py
    parts_per_unit: int | None = None  # parts forged together per unit of work (default all κ: shared samples)
    pool_size: int = 256  # swap/hybrid: substitutes drawn per step (per-sample gradients, both flips if used)
    pool_target: float = 0.0  # swap/hybrid (hook path): parts above this grad_error/grad_norm get more pool ...
    pool_rounds: int = 0  # ... this many times at most (another pool_size each); see rayforge.forge.swap
    window: int | None = None  # steps per unit of work (default: `auto_window`; 0 = whole checkpoint segments);
    # no effect on the output bytes

    @classmethod
    def from_config(cls, cfg: Config, **overrides) -> "ForgeParams":
        f = cfg.forge
        values = dict(strategy=f.strategy, kappa=f.kappa, mu=f.mu, lam=f.lam, dsub_size=f.dsub_size, seed=cfg.seed,
                      chunk=f.chunk, threads=cfg.train.threads, points=f.points, grad_method=f.grad_method,
                      pool_size=f.pool_size, pool_target=f.pool_target, pool_rounds=f.pool_rounds,
                      parts_per_unit=f.parts_per_unit, window=f.window)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def validate(self, n: int, batch_size: int) -> None:
        if self.strategy not in STRATEGIES:
            raise RayforgeError(f"forge: unknown strategy '{self.strategy}' (known: {', '.join(sorted(STRATEGIES))})")
        if self.mu < 1:
            raise RayforgeError(f"forge: mu={self.mu} must be >= 1")
        check_split_params(n, self.lam, self.kappa)
        smallest_allowed = n - -(-n // self.kappa) - self.lam  # |D \ D_k| for the largest part, conservatively
        if min(self.dsub_size or n, smallest_allowed) < batch_size:
            raise RayforgeError(f"forge: D \\ D_k (or dsub_size) must hold at least a batch of {batch_size} points")

    def to_json(self) -> dict:
        return asdict(self)


class ForgeContext:
    """What a forging worker holds once: the log, the training tensors, the splits and a gradient evaluator."""

    def __init__(self, run: TrainingRun, params: ForgeParams, device: torch.device | None = None):
        use_threads(params.threads)
        self.run, self.params, self.steps = run, params, run.steps
        self.device = device or run.device()
        dataset = run.load_dataset()
        self.data = run.tensor_data(dataset, self.device)
        self.twins = Twins(dataset.train, run.cfg.data.flip)
        self.flip, self.seed = run.cfg.data.flip, params.seed
        self.hyper = hyper_of(run.cfg)
        self.splits = Splits(len(self.data), params.lam, params.kappa, params.seed)
        self.grads = None  # the candidate-gradient evaluator, built from the first model seen
        self.reuse_step = False  # the strategy takes the training step's per-sample factors (hook path)
        self.swap_cache: dict = {}  # strategy swap: its eval-mode model copy for BatchNorm per-sample gradients
        self.strategy = STRATEGIES[params.strategy]
        self.needed = needed_parts(self.splits, run.steps, params.points)

    def allowed_points(self, point_parts: np.ndarray, part: int) -> np.ndarray:
        r"""D \ D_k, minus content twins of D_k's points: what part k's forged batch may use."""
        return np.flatnonzero(self.allowed_mask(point_parts, part))

    def allowed_mask(self, point_parts: np.ndarray, part: int) -> np.ndarray:
        """`allowed_points` as a mask over D (True: allowed)."""
        in_part = point_parts == part
        return self.twins.allowed_mask(in_part)

    def gradient_evaluator(self, model):
        if self.grads is None:  # parameters are passed functionally, so one copy serves every θ
            self.grads = make_gradient_evaluator(model, self.params.chunk, self.params.grad_method)
            self.reuse_step = self.params.strategy in REUSE_STEP and isinstance(self.grads, GroupedGradients)
            self.swap_model = copy.deepcopy(model)  # per-sample gradients (swap) hook a copy of their own
        return self.grads


def sampled_groups(splits: Splits, points: int | None) -> np.ndarray:
    """The groups phase 2 rebuilds: all, or those of the sampled points (sampling approximation)."""
    sample = sample_points(splits.n, points, splits.seed)
    return np.arange(splits.num_groups) if sample is None else np.unique(splits.group_of[sample])


def needed_parts(splits: Splits, steps, points: int | None) -> list[set[int]] | None:
    """Per step, the parts whose forged batch some sampled group uses (it has a member in B_t); None = all."""
    if points is None or points >= splits.n:
        return None
    wanted = np.zeros(splits.num_groups, dtype=bool)
    wanted[sampled_groups(splits, points)] = True
    needed = []
    for t, batch in enumerate(steps.batch):
        groups = np.unique(splits.group_of[batch])
        groups = groups[wanted[groups]]
        needed.append(set(splits.parts_of_groups(t)[groups].tolist()) if len(groups) else set())
    return needed


WINDOWS = 64  # the default cut: about this many step windows over the log, so units outnumber actors
SEGMENT_UNITS_PER_ACTOR = 4  # whole checkpoint segments are units when there are at least this many per actor


def auto_window(total_steps: int, segment_units: int | None = None, actors: int | None = None) -> int:
    """Steps per phase-1 unit; 0 = whole checkpoint segments. Windows inside a segment start from states a helper
    call walks the original log to (about one more training in all), which buys units for many actors; when the
    pool is known and the segments alone give it SEGMENT_UNITS_PER_ACTOR units per actor, nothing is re-walked."""
    if segment_units is not None and actors and segment_units >= SEGMENT_UNITS_PER_ACTOR * actors:
        return 0
    return max(1, -(-total_steps // WINDOWS))


def plan_units(checkpoints: list[int], kappa: int, needed: list[set[int]] | None = None,
               parts_per_unit: int | None = None,
               window: int | None = None) -> list[tuple[int, int, tuple[int, ...]]]:
    """(start, stop, parts) for every step window (`window` steps, the whole checkpoint segment by default; never
    across a checkpoint) and run of parts, in output order (under the sampling approximation, only parts with work
    to do)."""
    size = parts_per_unit or kappa
    units = []
    for a, b in zip(checkpoints, checkpoints[1:]):
        for w in range(a, b, window or b - a):
            stop = min(w + (window or b - a), b)
            parts = [k for k in range(kappa) if needed is None or any(k in needed[t] for t in range(w, stop))]
            units += [(w, stop, tuple(parts[i:i + size])) for i in range(0, len(parts), size)]
    return units


def _restore(ctx: ForgeContext, start: int, state: dict | None):
    """θ (model and momentum) at `start`: from `state` when the driver sent it, else from the run's checkpoint."""
    if state is None:
        return ctx.run.model_at(start, ctx.device)
    return ctx.run.model_from_state(state, ctx.device, f"state at step {start}")


def original_states(ctx: ForgeContext, start: int, at: list[int], state: dict | None = None) -> list[dict]:
    """The state (parameters, buffers, momentum) at each step of `at` (increasing, within one segment), stepping
    the original log from `start` exactly as `forge_unit` steps it, so a window started from one continues bit for
    bit. This is what lets windows inside a checkpoint segment be forged in parallel."""
    model, velocity = _restore(ctx, start, state)
    out, t = [], start
    for stop in at:
        replay_steps(model, velocity, ctx.data, ctx.steps, t, stop, ctx.hyper)
        out.append(ctx.run.state_of(model, velocity))
        t = stop
    return out


def forge_unit(ctx: ForgeContext, start: int, stop: int, parts, state: dict | None = None,
               end_state: dict | None = None) -> dict:
    """Forge `parts` (a part or several) at steps start..stop-1 from θ at `start` (`state`, else the checkpoint);
    the unit's columns, rows in (step, part) order, and its gradient-evaluation count. A window that ends on a
    checkpoint checks the replay against it (`end_state`, else read from the run)."""
    parts = [parts] if isinstance(parts, (int, np.integer)) else list(parts)
    model, velocity = _restore(ctx, start, state)
    ctx.gradient_evaluator(model)
    evals = float(stop - start)  # the replayed original steps
    wd = ctx.hyper.weight_decay
    cols = {name: [] for name in FORGED_SCHEMA.names}
    for t in range(start, stop):
        x, y = ctx.data.batch(ctx.steps.batch[t], ctx.steps.flip[t])
        todo = parts if ctx.needed is None else [k for k in parts if k in ctx.needed[t]]  # sampling: only used ones
        records = None  # grad^(t) at θ^(t) with the original flips (Alg. 3 line 5); the same bits either way
        if todo and ctx.reuse_step:
            g, records = ctx.grads.training_step(model, x, y)
        else:
            _, g = loss_and_grads(model, x, y)
        if todo:
            target = flatten(g)
            params = dict(model.named_parameters())
            with torch.no_grad():
                full = target + wd * flatten(params.values()) if wd else target
                grad_norm = float(torch.linalg.vector_norm(full))
            forged = ctx.strategy(ctx, params, t, todo, target, ctx.splits.point_parts(t), records)
            evals += sum(f.grad_evals for f in forged)
            for part, f in zip(todo, forged):
                for name, value in (("step", t), ("part", part), ("batch", f.batch), ("flip", f.flip),
                                    ("grad_error", f.grad_error), ("grad_norm", grad_norm)):
                    cols[name].append(value)
        sgd_update(model, g, velocity, float(ctx.steps.lr[t]), ctx.hyper)  # step the original trajectory
    if stop in ctx.run.checkpoints:  # windows that end a segment; others (and benchmarks' partial ones) cannot
        check_segment_replays(ctx.run, model, max(c for c in ctx.run.checkpoints if c <= start), stop, end_state)
    return {"columns": cols, "grad_evals": evals}


# Forging workers compute with the log's thread count, so on the training machine the replay is exact; another
# machine (CPU model, GPU) may round differently (measured: ~1e-7 per segment on MNIST/LeNet5); a tampered or foreign
# checkpoint is off by orders of magnitude more.
REPLAY_TOLERANCE = 1e-4


def check_segment_replays(run: TrainingRun, model, start: int, stop: int, stored: dict | None = None) -> None:
    """Our replay of [start, stop) must land on the logged checkpoint at `stop` (`stored`, else read from the run),
    or the log is not a valid PoL."""
    stored = run.checkpoint(stop) if stored is None else stored
    worst = max(float((p.detach().cpu() - stored[f"param/{k}"]).abs().max()) for k, p in model.named_parameters())
    if not worst <= REPLAY_TOLERANCE:
        raise RayforgeError(f"{run.run_dir}: the log does not replay: steps {start}..{stop} end {worst:.3g} "
                            f"(max abs) away from checkpoint {stop} (tolerance {REPLAY_TOLERANCE:g})")


def unit_table(columns: dict) -> pa.Table:
    return pa.table({
        "step": pa.array(columns["step"], pa.int64()),
        "part": pa.array(columns["part"], pa.int32()),
        "batch": pa.array([np.asarray(b, np.int32) for b in columns["batch"]], pa.list_(pa.int32())),
        "flip": pa.array([np.asarray(f, bool) for f in columns["flip"]], pa.list_(pa.bool_())),
        "grad_error": pa.array(columns["grad_error"], pa.float64()),
        "grad_norm": pa.array(columns["grad_norm"], pa.float64()),
    }, schema=FORGED_SCHEMA)


# ---------------------------------------------------------------------------------------------- output on disk

def forge_dir(run_dir: Path, strategy: str) -> Path:
    return Path(run_dir) / "forge" / strategy


def unit_path(out: Path, unit: tuple) -> Path:
    return out / "units" / f"seg-{unit[0]:08d}-{unit[1]:08d}-part-{unit[2][0]:04d}.parquet"


def prepare_output(out: Path, params, hint: str = "choose a different strategy directory") -> None:
    """Create the output dir, or check an existing one (a resume) was made with the same parameters (any object
    with `to_json()`; `hint` ends the error)."""
    (out / "units").mkdir(parents=True, exist_ok=True)
    path = out / "params.json"
    if path.exists():
        try:
            # read back as the same parameter class, so fields added since take their defaults
            previous = type(params)(**json.loads(path.read_text())).to_json()
        except (json.JSONDecodeError, TypeError):
            raise MalformedArtifact(f"{path}: unreadable") from None
        if previous != params.to_json():
            raise RayforgeError(f"{out} holds progress made with other parameters {previous}; "
                                f"remove it or {hint}")
    else:
        from rayforge.io import atomic_write_json

        atomic_write_json(path, params.to_json())


def read_unit(path: Path) -> pa.Table | None:
    """A finished unit's table, or None when absent or unreadable (then the unit is simply redone)."""
    return read_table_if_valid(path, FORGED_SCHEMA)


def merge_units(out: Path, units: list[tuple[int, int, int]]) -> pa.Table:
    """All unit tables -> forged.parquet sorted by (step, part); written atomically."""
    tables = [read_unit(unit_path(out, unit)) for unit in units]
    if any(t is None for t in tables):
        raise RayforgeError(f"{out}: cannot merge, some units are missing")
    # One chunk per column and the schema's own field names (units read back from Parquet name list items
    # "element"): the file's bytes then depend on the rows only, not on how units cut the log.
    table = pa.concat_tables(tables).sort_by([("step", "ascending"), ("part", "ascending")])
    table = table.cast(FORGED_SCHEMA).combine_chunks()
    write_parquet(out / "forged.parquet", table)
    return table


def forge_local(run: TrainingRun, params: ForgeParams, device: torch.device | None = None) -> pa.Table:
    """All of phase 1 with the plain functions, in this process (no Ray), written where `rayforge forge` writes
    it; the merged table."""
    ctx = ForgeContext(run, params, device)
    out = forge_dir(run.run_dir, params.strategy)
    prepare_output(out, params)
    units = plan_units(run.checkpoints, params.kappa, ctx.needed, params.parts_per_unit)
    for unit in units:
        write_parquet(unit_path(out, unit), unit_table(forge_unit(ctx, *unit)["columns"]))
    return merge_units(out, units)


def read_forged(path: Path, kappa: int | None = None, n_points: int | None = None) -> pa.Table:
    """Read and validate a forged table (schema, sorted unique (step, part), indices in range)."""
    path = Path(path)
    if not path.is_file():
        raise MalformedArtifact(f"missing forged table {path}; run `rayforge forge` first")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise MalformedArtifact(f"{path}: unreadable Parquet ({exc})") from None
    if table.schema.remove_metadata() != FORGED_SCHEMA:
        raise MalformedArtifact(f"{path}: wrong schema")
    key = table.column("step").to_numpy() * (1 << 20) + table.column("part").to_numpy()
    if np.any(np.diff(key) <= 0):
        raise MalformedArtifact(f"{path}: rows must be sorted by (step, part) without duplicates")
    if kappa is not None and len(table) and table.column("part").to_numpy().max() >= kappa:
        raise MalformedArtifact(f"{path}: part index >= kappa={kappa}")
    return table
