"""Verify a Proof-of-Repudiation as a third party: the artifact is hostile until every check has passed.

What is checked (every failure is a named `Reason`; all of them are collected, nothing stops at the first):

  files                 POR_DIR holds exactly por.json, steps.parquet and ckpt-<step>.safetensors for exactly the
                        listed checkpoint steps. Anything else is reported and never opened; checkpoints are read
                        only through safetensors (never pickle / torch.load).
  dataset               the training set rebuilt from the PoR's data config and seed (files from `data_root` or
                        $RAYFORGE_DATA, never a path from the artifact) has the claimed SHA-256 and size; the point has
                        the claimed content hash.
  exclusion             no batch holds the point or another excluded group member (by index), nor a point whose
                        content equals the point's (a duplicate at another index; with flips also its mirror image).
  log                   every index is in range; the step count, every batch size and every learning rate are what
                        the declared training implies (the lr compared exactly with rayforge.train.schedule); no flips
                        when the declared training has none; checkpoint 0 is the model's seeded initialisation.
  replay (PoL, Def. 2)  for each selected segment c_i -> c_{i+1}: replaying its steps from the stored c_i with
                        rayforge.train.sgd lands within `tol` (ℓ2 over the parameters) of the stored c_{i+1}; the
                        velocity and BatchNorm statistics must agree too (see `velocity_tol`).
  claims / deployed     d_theta agrees with epsilon; with `model_path`, the deployed model hashes to deployed_sha256
                        and lies within epsilon + tol of the PoR's final checkpoint.

A malformed por.json or steps.parquet raises MalformedArtifact (exit 2); a PoR that parses but fails a check gives
a report with valid=False (exit 1).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rayforge.config import TrainConfig
from rayforge.data import arrays_sha256, build_dataset, point_sha256
from rayforge.errors import MalformedArtifact, RayforgeError
from rayforge.models import build_model
from rayforge.por.artifact import MANIFEST, STEPS_FILE, Manifest, l2_distance, model_sha256, params_of, \
    read_manifest
from rayforge.train.batches import TensorData
from rayforge.train.log import CKPT_RE, check_state, ckpt_name, load_state, read_checkpoint, read_steps, \
    state_tensors
from rayforge.train.replay import replay_steps
from rayforge.train.run import NUM_CLASSES, set_determinism
from rayforge.train.schedule import learning_rates
from rayforge.train.sgd import SGDHyper, zero_velocity

# Default replay tolerance: ℓ2 distance over the parameters between a replayed segment and the stored checkpoint.
# Measured on this machine (2 CPU cores, torch 2.14.1 CPU, MNIST from /work/shared/data, LeNet5), logs written by
# `rayforge train configs/quickstart.yaml --out RUN [--set ...]`, every segment replayed from its stored start
# checkpoint with `replay_steps` under `set_determinism(THREADS)` and compared with its stored end checkpoint (max
# over segments; |θ| ≈ 9-11). `verify_por(POR, threads=T)` reports the same figures per segment for a PoR; on the
# PoR of runs/quickstart (trained with 1 thread), point 123, replayed with 2 threads: 2.4e-7..4.5e-7.
#   same process as training, same threads (2)                       0.0 (bit-exact)
#   second process, same threads (1->1, 2->2; also momentum runs)    0.0 (bit-exact)
#   quickstart, 10-step segments, lr 0.1, trained 2 threads, replay 1     5.5e-7
#   quickstart, trained 1 thread, replay 2                                5.3e-7
#   n=20000, one 200-step segment, lr 0.1, 2 -> 1 threads                 2.9e-6   (the worst LeNet5 figure)
#   n=60000 (the paper's MNIST setting), one 600-step segment, lr 0.01    9.4e-7
#   momentum 0.9 + wd 5e-4 + cosine + flips, lr 0.01: 10-step segments    1.0e-7 (velocity 1.6e-6)
#                                                      one 200-step seg.  1.0e-6 (velocity 2.0e-6)
# DEFAULT_TOL is ~35x the worst of these, so another thread count passes while any deliberate change that
# matters (a moved weight, a swapped batch: 1e-2 and up) fails. The verifier replays with the PoR's own thread
# count by default, which is bit-exact on the owner's kind of machine. Not covered: BatchNorm nets early in
# training are chaotic across thread counts (resnet_mini on CIFAR-10, momentum 0.9, first 5 steps, 2 -> 1 threads:
# 1.4e-2, later segments 1e-6..1e-3); other CPUs and GPU replays of CPU logs were not measured. Pass a larger
# `tol` there.
DEFAULT_TOL = 1e-4

MAX_LISTED = 5  # steps named per reason


@dataclass(frozen=True)
class Reason:
    """One failed check: a stable `code` (for programs) and a one-line `detail` (for people)."""

    code: str
    detail: str

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


@dataclass
class SegmentCheck:
    """One checkpoint segment c_i -> c_{i+1}; distances are set when it was replayed."""

    start: int
    stop: int
    update_norm: float | None = None  # ‖θ_{c_{i+1}} − θ_{c_i}‖₂ of the stored checkpoints (the top-Q criterion)
    distance: float | None = None  # ℓ2 over parameters: our replay vs the stored c_{i+1}
    velocity_distance: float | None = None
    buffer_distance: float | None = None
    seconds: float | None = None
    ok: bool | None = None
    skipped: str | None = None


@dataclass
class VerifyReport:
    por_dir: str
    valid: bool
    reasons: list[Reason]
    notes: list[str]
    point: int
    excluded: list[int]
    selection: str  # as asked: all | topq:Q | random:N
    seed: int | None  # random:N only: rerun with this seed to check the same segments
    tol: float
    velocity_tol: float | None
    threads: int | None
    device: str
    segments_total: int
    segments: list[SegmentCheck]  # the selected ones, in step order
    epsilon: float
    d_theta: float
    deployed_distance: float | None
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def reason_codes(self) -> list[str]:
        return [r.code for r in self.reasons]

    @property
    def max_distance(self) -> float | None:
        done = [s.distance for s in self.segments if s.distance is not None]
        return max(done, key=lambda d: (math.isnan(d), d)) if done else None  # NaN (a diverged replay) ranks worst

    def to_json(self) -> dict:
        """A JSON-ready dict (strict JSON: non-finite distances, e.g. of a diverging replay, become "nan"/"inf")."""
        out = dataclasses.asdict(self)
        out["reasons"] = [{"code": r.code, "detail": r.detail} for r in self.reasons]
        out["max_distance"] = self.max_distance
        return _finite_json(out)


def _finite_json(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_json(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- selection

def parse_selection(spec: str) -> tuple[str, int | None]:
    """'all' -> ('all', None); 'topq:Q' -> ('topq', Q); 'random:N' -> ('random', N)."""
    if spec == "all":
        return "all", None
    kind, _, count = str(spec).partition(":")
    if kind in ("topq", "random") and count.isdigit() and int(count) >= 1:
        return kind, int(count)
    raise RayforgeError(f"--steps must be all, topq:Q or random:N with a positive integer, got '{spec}'")


def select_segments(segments: list[SegmentCheck], kind: str, count: int | None, steps_per_epoch: int,
                    seed: int | None) -> list[SegmentCheck]:
    """The segments to replay. topq:Q is the PoL paper's heuristic: within every epoch (a segment belongs to the
    epoch its start step is in) the Q segments with the largest stored update; random:N draws N distinct segments
    from `seed`. Segments whose update is unknown (unreadable checkpoints) rank first: they fail anyway."""
    if kind == "all":
        return list(segments)
    if kind == "random":
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(segments), size=min(count, len(segments)), replace=False)
        return [segments[i] for i in sorted(int(i) for i in chosen)]
    by_epoch: dict[int, list[SegmentCheck]] = {}
    for s in segments:
        by_epoch.setdefault(s.start // steps_per_epoch, []).append(s)
    chosen = []
    for group in by_epoch.values():
        ranked = sorted(group, key=lambda s: (s.update_norm is not None, -(s.update_norm or 0.0)))
        chosen.extend(ranked[:count])
    return sorted(chosen, key=lambda s: s.start)


# ---------------------------------------------------------------------------------------------- helpers

def _listed(values) -> str:
    values = list(values)
    head = ", ".join(str(v) for v in values[:MAX_LISTED])
    return head + (f" (+{len(values) - MAX_LISTED} more)" if len(values) > MAX_LISTED else "")


def _check_files(por_dir: Path, checkpoints: list[int], reasons: list[Reason]) -> set[int]:
    """The listed checkpoint steps whose file is present as a regular file; reasons for anything else."""
    expected = {ckpt_name(c): c for c in checkpoints}
    present, unexpected, not_regular = set(), [], []
    for entry in sorted(por_dir.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name in (MANIFEST, STEPS_FILE):
            continue  # read (and checked to be regular files) separately
        if name in expected:
            if entry.is_symlink() or not entry.is_file():
                not_regular.append(name)
            else:
                present.add(expected[name])
            continue
        looks = "ckpt" in name.lower() or CKPT_RE.match(name) is not None
        unexpected.append(f"{name!r}{' (looks like a checkpoint; not loaded)' if looks else ''}")
    if unexpected:
        reasons.append(Reason("unexpected_file", f"files that are not part of a PoR: {_listed(unexpected)}"))
    if not_regular:
        reasons.append(Reason("bad_checkpoint", f"not regular files: {_listed(not_regular)}"))
    names = {e.name for e in por_dir.iterdir()}
    missing = [c for c in checkpoints if ckpt_name(c) not in names]
    if missing:
        reasons.append(Reason("missing_checkpoint", f"listed checkpoints without a file: steps {_listed(missing)}"))
    return present


def _fresh_model(m: Manifest, device: torch.device, seed: int | None = None) -> nn.Module:
    """The declared architecture; with `seed`, initialised as training does (`new_model`), without touching the
    caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(m.seed if seed is None else seed)
        try:
            model = build_model(m.training.model, m.training.in_shape, NUM_CLASSES)
        except RayforgeError as exc:
            raise MalformedArtifact(f"{MANIFEST}: 'training' does not describe a buildable model ({exc})") from None
    return model.to(device)


def _split_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def _steps_with(flat: np.ndarray, step_of: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(steps, indices) of the log entries whose index is in `indices`."""
    mask = np.isin(flat, indices)
    return step_of[mask], flat[mask]


def _content_twins(train, point: int, mirrored: bool) -> np.ndarray:
    """Indices other than `point` holding the same content (image and label), and with `mirrored` also those
    holding its mirror image (a flip flag turns one into the other). Equal content is equal point_sha256."""
    images = train.images.reshape(len(train), -1)
    ref = train.images[point]
    same_label = train.labels == train.labels[point]
    twins = same_label & (images == ref.reshape(-1)).all(axis=1)
    if mirrored:
        twins |= same_label & (images == ref[..., ::-1].reshape(-1)).all(axis=1)
    twins[point] = False
    return np.flatnonzero(twins).astype(np.int64)


def _read_deployed(path: Path, template: nn.Module) -> dict[str, torch.Tensor]:
    """A deployed model's parameters from safetensors: keys param/* (+ buffer/*) as `write_deployed_model` writes,
    or a plain state_dict (parameter and buffer names). Must match the declared model's parameters exactly."""
    tensors = read_checkpoint(path)  # safetensors only; MalformedArtifact otherwise
    params = {k: v for k, v in tensors.items() if k.startswith("param/")}
    if params:
        params = params_of(tensors)
        allowed = {f"param/{k}" for k, _ in template.named_parameters()} | {f"buffer/{k}" for k, _ in
                                                                            template.named_buffers()}
    else:
        names = {k for k, _ in template.named_parameters()}
        params = {k: v for k, v in tensors.items() if k in names}
        allowed = names | {k for k, _ in template.named_buffers()}
    expected = dict(template.named_parameters())
    extra = sorted(set(tensors) - allowed)
    if set(params) != set(expected) or extra:
        raise MalformedArtifact(f"{path}: tensors do not match the declared model (missing "
                                f"{sorted(set(expected) - set(params))[:3]}, unexpected {extra[:3]})")
    for k, ref in expected.items():
        if params[k].shape != ref.shape or params[k].dtype != ref.dtype:
            raise MalformedArtifact(f"{path}: '{k}' has shape {tuple(params[k].shape)} {params[k].dtype}, "
                                    f"expected {tuple(ref.shape)} {ref.dtype}")
    return params


# ---------------------------------------------------------------------------------------------- the verifier

def verify_por(por_dir: str | Path, data_root: str | Path | None = None, model_path: str | Path | None = None,
               steps: str = "all", tol: float = DEFAULT_TOL, seed: int | None = None, threads: int | None = None,
               device: str | torch.device = "cpu") -> VerifyReport:
    """Verify the PoR in `por_dir`; see the module docstring for every check.

    data_root: where the dataset's files are (else $RAYFORGE_DATA, else the download cache); model_path: the
    deployed model (safetensors) the PoR is about; steps: all | topq:Q | random:N (segments to replay); tol: ℓ2
    tolerance per replayed segment; seed: for random:N (drawn and reported when None);
    threads: torch threads for the replay (default: the PoR's, which reproduces the owner's bits on one machine).
    """
    previous_threads = torch.get_num_threads()
    try:
        return _verify_por(por_dir, data_root, model_path, steps, tol, seed, threads, device)
    finally:
        torch.set_num_threads(previous_threads)  # the replay sets the PoR's thread count; leave the caller's as it was


def _verify_por(por_dir, data_root, model_path, steps, tol, seed, threads, device) -> VerifyReport:
    t_start = time.perf_counter()
    por_dir = Path(por_dir)
    if not por_dir.is_dir():
        raise RayforgeError(f"no PoR directory '{por_dir}'")
    kind, count = parse_selection(steps)
    tol = float(tol)
    if not (math.isfinite(tol) and tol >= 0):
        raise RayforgeError(f"--tol must be a finite number >= 0, got {tol}")
    if kind == "random" and seed is None:
        seed = secrets.randbelow(1 << 31)
    device = torch.device(device)

    m = read_manifest(por_dir)
    steps_path = por_dir / STEPS_FILE
    if steps_path.is_symlink():
        raise MalformedArtifact(f"{steps_path}: not a regular file")
    log = read_steps(steps_path)  # schema, nulls, contiguous steps, batch/flip lengths (indices: checked below)

    reasons: list[Reason] = []
    notes: list[str] = []
    tr = m.training
    hyper = SGDHyper(momentum=tr.momentum, weight_decay=tr.weight_decay)
    momentum = bool(tr.momentum)
    # A velocity error e moves the parameters of the following steps by at most lr·e·(1 + m + m² + ...) = lr·e/(1-m),
    # so this bound keeps a stored velocity from injecting more than `tol` into the parameters.
    velocity_tol = tol * (1.0 - tr.momentum) / tr.lr if momentum else None
    threads = threads or tr.threads
    set_determinism(threads)
    timing = {}

    present = _check_files(por_dir, m.checkpoints, reasons)

    # ------------------------------------------------------------------ dataset
    t0 = time.perf_counter()
    data_cfg = dataclasses.replace(m.data, data_root=None if data_root is None else str(data_root))
    ds = build_dataset(data_cfg, m.seed)  # RayforgeError when the files are not found: nothing to verify against
    train = ds.train
    n_found = len(train)
    dataset_ok = n_found == m.n and arrays_sha256(train) == m.train_sha256
    if not dataset_ok:
        reasons.append(Reason("dataset_mismatch", f"the training set found ({n_found} points, SHA-256 "
                                                  f"{arrays_sha256(train)[:12]}...) is not the PoR's ({m.n} points, "
                                                  f"{m.train_sha256[:12]}...)"))
    if list(train.images.shape[1:]) != list(tr.in_shape):
        reasons.append(Reason("dataset_mismatch", f"training inputs are {list(train.images.shape[1:])}, the PoR "
                                                  f"declares in_shape {list(tr.in_shape)}"))
        dataset_ok = False
    point_ok = m.point < n_found and point_sha256(train, m.point) == m.point_sha256
    if not point_ok:
        reasons.append(Reason("point_hash_mismatch", f"point {m.point} of the training set does not have the "
                                                     f"claimed content hash {m.point_sha256[:12]}..."))
    timing["dataset_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ the log against the declared training
    t0 = time.perf_counter()
    total = m.total_steps
    spe = m.steps_per_epoch
    if len(log) != total:
        reasons.append(Reason("step_count", f"the step table has {len(log)} steps; {tr.epochs} epochs of "
                                            f"{spe} batches (n={m.n}, batch_size={tr.batch_size}) are {total}"))
    if m.checkpoints[-1] != total or m.checkpoints[-1] != len(log):
        reasons.append(Reason("checkpoints", f"the last checkpoint is step {m.checkpoints[-1]}; it must be the "
                                             f"final step ({total} declared, {len(log)} in the table)"))
    lens = np.fromiter((len(b) for b in log.batch), dtype=np.int64, count=len(log))
    flat = np.concatenate(log.batch) if len(log) else np.zeros(0, np.int64)
    flat_flip = np.concatenate(log.flip) if len(log) else np.zeros(0, bool)
    step_of = np.repeat(np.arange(len(log)), lens)
    bad_index = (flat < 0) | (flat >= m.n)
    bad_index_steps = set(np.unique(step_of[bad_index]).tolist())
    if bad_index_steps:
        reasons.append(Reason("index_out_of_range", f"indices outside [0, {m.n}) at steps "
                                                    f"{_listed(sorted(bad_index_steps))}"))
    t_idx = np.arange(len(log))
    expected_size = np.minimum(tr.batch_size, m.n - (t_idx % spe) * tr.batch_size)
    wrong_size = np.flatnonzero(lens != expected_size)
    if len(wrong_size):
        reasons.append(Reason("batch_size", f"batches of the wrong size (the declared training gives "
                                            f"min(batch_size, what is left of the epoch)) at steps "
                                            f"{_listed(wrong_size.tolist())}"))
    expected_lr = learning_rates(TrainConfig(lr=tr.lr, lr_schedule=tr.lr_schedule), total)
    k = min(total, len(log))
    # A constant schedule is compared exactly. A cosine one to a relative 1e-12: np.cos may differ by an ulp on
    # another platform, and a genuine PoR must verify there too (P5).
    rtol = 1e-12 if tr.lr_schedule == "cosine" else 0.0
    wrong_lr = np.flatnonzero(~np.isclose(log.lr[:k], expected_lr[:k], rtol=rtol, atol=0.0))
    if len(wrong_lr):
        t = int(wrong_lr[0])
        reasons.append(Reason("lr_schedule", f"learning rates differ from the declared {tr.lr_schedule} schedule "
                                             f"(lr={tr.lr}) at steps {_listed(wrong_lr.tolist())}; step {t}: "
                                             f"{log.lr[t]!r} instead of {expected_lr[t]!r}"))
    if not tr.flip and flat_flip.any():
        reasons.append(Reason("flip", f"flipped samples at steps {_listed(np.unique(step_of[flat_flip]).tolist())} "
                                      f"though the declared training uses no flips"))

    # exclusion: the point and its group by index, and the point's content anywhere else
    hit_steps, _ = _steps_with(flat, step_of, np.asarray([m.point]))
    if len(hit_steps):
        reasons.append(Reason("point_in_batch", f"point {m.point} is in the batches of steps "
                                                f"{_listed(np.unique(hit_steps).tolist())}"))
    others = m.excluded[m.excluded != m.point]
    hit_steps, hit_idx = _steps_with(flat, step_of, others)
    if len(hit_steps):
        reasons.append(Reason("excluded_in_batch", f"excluded group members {_listed(np.unique(hit_idx).tolist())} "
                                                   f"are in the batches of steps "
                                                   f"{_listed(np.unique(hit_steps).tolist())}"))
    if m.point < n_found:
        twins = _content_twins(train, m.point, mirrored=tr.flip)
        hit_steps, hit_idx = _steps_with(flat, step_of, twins)
        if len(hit_steps):
            reasons.append(Reason("duplicate_in_batch",
                                  f"indices {_listed(np.unique(hit_idx).tolist())} hold the point's content "
                                  f"(same image and label{', or its mirror image' if tr.flip else ''}) and are in "
                                  f"the batches of steps {_listed(np.unique(hit_steps).tolist())}"))
        if len(twins):
            notes.append(f"the training set holds the point's content also at indices {_listed(twins.tolist())}")

    # ------------------------------------------------------------------ checkpoints: readable, θ₀, update sizes
    template = _fresh_model(m, torch.device("cpu"))
    valid_ckpt: set[int] = set()
    prev_params, prev_step = None, None
    update_norm: dict[tuple[int, int], float] = {}
    final_params = None
    for c in m.checkpoints:
        if c not in present:
            prev_params = None
            continue
        path = por_dir / ckpt_name(c)
        try:
            tensors = read_checkpoint(path)
            check_state(tensors, template, f"checkpoint {c}", need_velocity=momentum)
        except MalformedArtifact as exc:
            reasons.append(Reason("bad_checkpoint", f"step {c}: {exc}"))
            prev_params = None
            continue
        valid_ckpt.add(c)
        params = params_of(tensors)
        if prev_params is not None:
            update_norm[(prev_step, c)] = l2_distance(params, prev_params)
        prev_params, prev_step = params, c
        if c == 0:
            init = _fresh_model(m, torch.device("cpu"), seed=m.seed)
            expected = state_tensors(init, zero_velocity(init) if momentum else None)
            if any(not torch.equal(tensors[k], v) for k, v in expected.items()):
                reasons.append(Reason("init", f"checkpoint 0 is not the {tr.model} initialisation from seed "
                                              f"{m.seed} (with zero velocity)"))
        if c == m.checkpoints[-1]:
            final_params = params
    timing["checks_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ replay (the PoL check)
    t0 = time.perf_counter()
    segments = [SegmentCheck(a, b, update_norm.get((a, b))) for a, b in zip(m.checkpoints, m.checkpoints[1:])]
    selected = select_segments(segments, kind, count, spe, seed)
    data = TensorData(train, ds.mean, ds.std, device) if dataset_ok else None
    model = _fresh_model(m, device)
    velocity = zero_velocity(model)
    failed = []
    for s in selected:
        if not dataset_ok:
            s.skipped = "the dataset differs"
        elif s.start not in valid_ckpt or s.stop not in valid_ckpt:
            s.skipped = "a checkpoint is missing or unreadable"
        elif s.stop > len(log):
            s.skipped = "the step table ends before this segment does"
        elif any(t in bad_index_steps for t in range(s.start, s.stop)):
            s.skipped = "a batch holds an index out of range"
        if s.skipped:
            continue
        ts = time.perf_counter()
        start_state = read_checkpoint(por_dir / ckpt_name(s.start))
        load_state(start_state, model, velocity if momentum else None)
        replay_steps(model, velocity, data, log, s.start, s.stop, hyper)
        ours = state_tensors(model, velocity if momentum else None)
        stored = read_checkpoint(por_dir / ckpt_name(s.stop))
        s.distance = l2_distance(_split_state(ours, "param/"), stored)
        float_buffers = {k: v for k, v in _split_state(ours, "buffer/").items() if v.is_floating_point()}
        s.buffer_distance = l2_distance(float_buffers, stored) if float_buffers else None
        exact_buffers = all(torch.equal(v, stored[k]) for k, v in _split_state(ours, "buffer/").items()
                            if not v.is_floating_point())
        s.velocity_distance = l2_distance(_split_state(ours, "velocity/"), stored) if momentum else None
        s.ok = bool(s.distance <= tol
                    and (s.velocity_distance is None or s.velocity_distance <= velocity_tol)
                    and (s.buffer_distance is None or s.buffer_distance <= tol) and exact_buffers)
        s.seconds = time.perf_counter() - ts
        if not s.ok:
            failed.append(s)
    for s in failed:
        parts = [f"params {s.distance:.3g} (tol {tol:g})"]
        if s.velocity_distance is not None:
            parts.append(f"velocity {s.velocity_distance:.3g} (tol {velocity_tol:.3g})")
        if s.buffer_distance is not None:
            parts.append(f"buffers {s.buffer_distance:.3g}")
        reasons.append(Reason("replay_mismatch", f"steps {s.start}..{s.stop}: the replay ends {', '.join(parts)} "
                                                 f"(ℓ2) away from checkpoint {s.stop}"))
    timing["replay_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ claims and the deployed model
    dim = sum(p.numel() for p in template.parameters())
    implied = m.epsilon ** 2 / dim
    if abs(m.d_theta - implied) > 1e-9 * max(m.d_theta, implied) + 1e-300:
        reasons.append(Reason("claims_inconsistent", f"d_theta={m.d_theta!r} but epsilon²/dim(θ)={implied!r}"))
    deployed_distance = None
    if model_path is not None:
        try:
            deployed = _read_deployed(Path(model_path), template)
        except MalformedArtifact as exc:
            reasons.append(Reason("deployed_mismatch", str(exc)))
        else:
            if model_sha256(deployed) != m.deployed_sha256:
                reasons.append(Reason("deployed_mismatch", f"{model_path} has model_sha256 "
                                                           f"{model_sha256(deployed)[:12]}..., the PoR is about "
                                                           f"{m.deployed_sha256[:12]}..."))
            if final_params is not None:
                deployed_distance = l2_distance(final_params, deployed)
                if not deployed_distance <= m.epsilon + tol:
                    reasons.append(Reason("epsilon_exceeded", f"the PoR's final model is {deployed_distance:.6g} "
                                                              f"(ℓ2) from the deployed one; the PoR claims "
                                                              f"epsilon={m.epsilon:.6g} (+ tol {tol:g})"))
    else:
        notes.append("no deployed model given (model_path): the PoR's final model was not compared with it")
    if kind != "all":
        notes.append(f"replayed {len(selected)} of {len(segments)} segments ({steps})")

    timing["total_s"] = time.perf_counter() - t_start
    return VerifyReport(
        por_dir=str(por_dir), valid=not reasons, reasons=reasons, notes=notes, point=m.point,
        excluded=[int(i) for i in m.excluded], selection=steps, seed=seed if kind == "random" else None, tol=tol,
        velocity_tol=velocity_tol, threads=threads or torch.get_num_threads(), device=str(device),
        segments_total=len(segments), segments=selected, epsilon=m.epsilon, d_theta=m.d_theta,
        deployed_distance=deployed_distance, timing=timing)
