"""Verify a Proof-of-Repudiation as a third party: the artifact is hostile until every check has passed.

One function per check, each returning its reasons (every failure is a named `Reason`; all are collected, nothing
stops at the first):

  files        POR_DIR holds exactly por.json, steps.parquet, ckpt-<step>.safetensors for exactly the listed
               checkpoint steps and, for kind include, xstar.safetensors. Anything else is reported and never
               opened; tensors are read only through safetensors (never pickle / torch.load).
  dataset      the training set rebuilt from the PoR's data config and seed (files from `data_root` only when it
               is given, else $RAYFORGE_DATA or the download cache; never a path from the artifact) has the claimed
               SHA-256 and size; for kind exclude the point has the claimed content hash.
  log          every index is in range (D's n points; D ∪ {x*}'s n + 1; D_p's); the step count, every batch size
               and every learning rate are what the declared training implies (the lr to float precision, see
               `check_lr`); no flips when the declared training has none.
  exclusion    (kind exclude) no batch holds the point or another excluded group member (by index), nor a point
               whose content equals the point's (a duplicate at another index; with flips also its mirror image).
  inclusion    (kind include) xstar.safetensors holds one image of the declared input shape and a label the model
               has, with the claimed content hash and label; x* is not already in D (no point of D has its content,
               or with flips its mirror image); index n (x*) is in the batches of exactly the claimed iterations.
  public       (kind public) the public dataset D_p, read from `data_root` (its image folder: train/<class>/*;
               required, nothing else is searched), has the claimed size and SHA-256, the declared input shape and
               labels the model has; every batch holds batch_size of its points. The manifest has no key naming D
               (its schema has none), so nothing of D is read.
  checkpoints  every listed checkpoint is readable and has the declared model's tensors; checkpoint 0 is the model's
               seeded initialisation; the update norm ‖θ_{c_{i+1}} − θ_{c_i}‖ of every segment is measured.
  replay       (PoL, Def. 2) each selected segment c_i -> c_{i+1}, replayed from the stored c_i with
               rayforge.train.sgd, lands within `tol` (ℓ2 over the parameters) of the stored c_{i+1}, and within
               `tol_rel` x its update norm when that is given; velocity and BatchNorm statistics must agree too.
               Every segment's deviation (ℓ2, max |Δ|, ℓ2 / update norm) is reported, pass or fail.
  claims       d_theta agrees with epsilon; with the deployed model, its hash is deployed_sha256 and the measured
               ℓ2 distance from the PoR's final checkpoint is at most the claimed epsilon (no slack: both are
               computed by the same deterministic `l2_distance`).

Each kind is checked by its own rules only; a PoR of one kind relabelled as another fails its schema or these
checks. A malformed por.json or steps.parquet raises MalformedArtifact, and an input the verifier cannot use (no PoR
directory, an unreadable --model or --data-root, a dataset not found, a bad option) raises UnusableInput: both
exit 2, before any replay. A PoR that parses but fails a check gives a report with valid=False (exit 1).
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from rayforge.config import TrainConfig
from rayforge.data import Dataset, ImageArrays, arrays_sha256, build_dataset, point_sha256, same_content
from rayforge.errors import MalformedArtifact, RayforgeError, UnusableInput
from rayforge.io import read_tensors
from rayforge.models import build_model, is_code_reference
from rayforge.models.registry import UntrustedModelCode
from rayforge.por.artifact import MANIFEST, STEPS_FILE, XSTAR_FILE, Manifest, l2_distance, model_sha256, \
    params_of, read_manifest
from rayforge.train.batches import TensorData
from rayforge.train.log import CKPT_RE, Steps, check_state, ckpt_name, load_state, read_checkpoint, read_steps, \
    state_tensors
from rayforge.train.replay import max_abs_diff, replay_steps
from rayforge.train.run import NUM_CLASSES, set_determinism
from rayforge.train.schedule import learning_rates
from rayforge.train.sgd import SGDHyper, zero_velocity

# Default replay tolerance: ℓ2 distance over the parameters between a replayed segment and the stored checkpoint.
# Measured on 2 CPU cores (torch 2.14.1 CPU, MNIST, LeNet5), logs written by
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
# DEFAULT_TOL is ~35x the worst of these, so another thread count passes while a moved weight or a swapped batch
# at lr 0.1 (1e-2 and up) fails. It cannot rule out every log-only edit: see the README ("What a segment tolerance
# rules out") for the ε = 0 construction and `tol_rel`. Not covered: BatchNorm nets early in training are chaotic
# across thread counts (resnet_mini on CIFAR-10, momentum 0.9, first 5 steps, 2 -> 1 threads: 1.4e-2, later
# segments 1e-6..1e-3); other CPUs and GPU replays of CPU logs were not measured. Pass a larger `tol` there.
DEFAULT_TOL = 1e-4

MAX_LISTED = 5  # steps named per reason
# A cosine schedule is compared to a relative 1e-12 (np.cos may differ by an ulp on another platform, and a genuine
# PoR must verify there too); a constant one exactly.
COSINE_RTOL = 1e-12
UNCHECKED_WITHOUT_MODEL = ["epsilon", "d_theta", "deployed model"]


@dataclass(frozen=True)
class Reason:
    """One failed check: a stable `code` (for programs) and a one-line `detail` (for people)."""

    code: str
    detail: str

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


@dataclass
class SegmentCheck:
    """One checkpoint segment c_i -> c_{i+1}; the deviations are set when it was replayed."""

    start: int
    stop: int
    update_norm: float | None = None  # ‖θ_{c_{i+1}} − θ_{c_i}‖₂ of the stored checkpoints (the top-Q criterion)
    distance: float | None = None  # ℓ2 over parameters: our replay vs the stored c_{i+1}
    max_abs: float | None = None  # largest |Δ| of one parameter: our replay vs the stored c_{i+1}
    relative: float | None = None  # distance / update_norm
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
    unchecked: list[str]  # claims not checked: without a deployed model, UNCHECKED_WITHOUT_MODEL
    kind: str  # exclude | include | public
    point: int | None  # exclude: the point; include: x*'s index n; public: None
    excluded: list[int]  # exclude: the group; else empty
    selection: str  # as asked: all | topq:Q | random:N
    seed: int | None  # random:N only: rerun with this seed to check the same segments
    tol: float
    tol_rel: float | None
    velocity_tol: float | None
    threads: int | None  # used for the replay
    trained_threads: int | None  # the PoR's training.threads
    device: str
    segments_total: int
    segments: list[SegmentCheck]  # the selected ones, in step order
    epsilon: float  # claimed
    d_theta: float  # claimed
    epsilon_measured: float | None  # ℓ2 between the PoR's final checkpoint and the deployed model
    d_theta_measured: float | None
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def reason_codes(self) -> list[str]:
        return [r.code for r in self.reasons]

    def _worst(self, attr: str) -> float | None:
        done = [getattr(s, attr) for s in self.segments if getattr(s, attr) is not None]
        return max(done, key=lambda d: (math.isnan(d), d)) if done else None  # NaN (a diverged replay) ranks worst

    @property
    def max_distance(self) -> float | None:
        return self._worst("distance")

    @property
    def max_relative(self) -> float | None:
        return self._worst("relative")

    def to_json(self) -> dict:
        """A JSON-ready dict (strict JSON: non-finite distances, e.g. of a diverging replay, become "nan"/"inf")."""
        out = dataclasses.asdict(self)
        out["reasons"] = [{"code": r.code, "detail": r.detail} for r in self.reasons]
        out["max_distance"] = self.max_distance
        out["max_relative"] = self.max_relative
        return _finite_json(out)

    def to_text(self) -> list[str]:
        """The report for people: what was not checked first, every segment's deviation, the claims (claimed vs
        measured), notes, reasons, and the verdict last."""
        lines = []
        if self.unchecked:
            lines.append(f"NOT CHECKED (no --model): {', '.join(self.unchecked)}; only the log and its replay were "
                         f"verified")
        lines += [_segment_text(s) for s in self.segments]
        if self.epsilon_measured is not None:
            lines.append(f"epsilon: claimed {self.epsilon:.9g}, measured {self.epsilon_measured:.9g}; d_theta: "
                         f"claimed {self.d_theta:.6g}, measured {self.d_theta_measured:.6g}")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"invalid: {r}" for r in self.reasons]
        worst, relative = self.max_distance, self.max_relative
        lines.append(f"{'VALID' if self.valid else 'INVALID'} ({self.kind} PoR): "
                     f"{sum(s.distance is not None for s in self.segments)} "
                     f"of {self.segments_total} segment(s) replayed with {self.threads} thread(s)"
                     + (f", worst l2 {worst:.3g} (tol {self.tol:g})" if worst is not None else "")
                     + (f", worst l2/update {relative:.3g}" if relative is not None else "")
                     + (f" (tol-rel {self.tol_rel:g})" if relative is not None and self.tol_rel is not None else "")
                     + (f", seed {self.seed}" if self.seed is not None else ""))
        return lines


def _segment_text(s: SegmentCheck) -> str:
    where = f"steps {s.start}..{s.stop}:"
    if s.distance is None:
        return f"{where} not replayed ({s.skipped})"
    text = (f"{where} l2 {s.distance:.3g}, max|d| {s.max_abs:.3g}, l2/update {s.relative:.3g} "
            f"(update {s.update_norm:.3g})")
    if s.velocity_distance is not None:
        text += f", velocity l2 {s.velocity_distance:.3g}"
    return f"{text}: {'ok' if s.ok else 'MISMATCH'}"


def _finite_json(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_json(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- the verifier's inputs

@dataclass(frozen=True)
class Request:
    """What the verifier was asked, checked before the artifact is opened."""

    por_dir: Path
    kind: str  # all | topq | random
    count: int | None
    seed: int | None
    tol: float
    tol_rel: float | None
    threads: int | None
    device: torch.device
    data_root: Path | None
    model_path: str | None
    deployed: dict[str, torch.Tensor] | None  # the --model file's tensors, read before any replay
    trust_model_code: bool = False  # build a `module:callable` model (imports and runs that code)


def parse_selection(spec: str) -> tuple[str, int | None]:
    """'all' -> ('all', None); 'topq:Q' -> ('topq', Q); 'random:N' -> ('random', N)."""
    if spec == "all":
        return "all", None
    kind, _, count = str(spec).partition(":")
    if kind in ("topq", "random") and count.isdigit() and int(count) >= 1:
        return kind, int(count)
    raise UnusableInput(f"--steps must be all, topq:Q or random:N with a positive integer, got '{spec}'")


def _tolerance(value, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise UnusableInput(f"{name} must be a finite number >= 0, got {value}")
    return value


def _readable_dir(path, name: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
        raise UnusableInput(f"{name} '{path}' is not a readable directory")
    return path


def make_request(por_dir, data_root=None, model_path=None, steps: str = "all", tol: float = DEFAULT_TOL,
                 tol_rel: float | None = None, seed: int | None = None, threads: int | None = None,
                 device="cpu", trust_model_code: bool = False) -> Request:
    """Check every argument, and read the deployed model: an unusable one fails here, before any replay."""
    por_dir = Path(por_dir)
    if not por_dir.is_dir():
        raise UnusableInput(f"no PoR directory '{por_dir}'")
    kind, count = parse_selection(steps)
    if threads is not None and (type(threads) is not int or threads < 1):
        raise UnusableInput(f"--threads must be an integer >= 1, got {threads!r}")
    if seed is not None and (type(seed) is not int or seed < 0):
        raise UnusableInput(f"--seed must be an integer >= 0, got {seed!r}")
    if kind == "random" and seed is None:
        seed = secrets.randbelow(1 << 31)
    return Request(
        por_dir=por_dir, kind=kind, count=count, seed=seed, tol=_tolerance(tol, "--tol"),
        tol_rel=None if tol_rel is None else _tolerance(tol_rel, "--tol-rel"), threads=threads,
        device=torch.device(device), data_root=None if data_root is None else _readable_dir(data_root, "--data-root"),
        model_path=None if model_path is None else str(model_path),
        deployed=None if model_path is None else read_tensors(model_path, "deployed model (--model)"),
        trust_model_code=bool(trust_model_code))


# ---------------------------------------------------------------------------------------------- helpers

def _listed(values) -> str:
    values = list(values)
    head = ", ".join(str(v) for v in values[:MAX_LISTED])
    return head + (f" (+{len(values) - MAX_LISTED} more)" if len(values) > MAX_LISTED else "")


def _fresh_model(m: Manifest, device: torch.device, seed: int | None = None,
                 num_classes: int = NUM_CLASSES) -> nn.Module:
    """The declared architecture for `num_classes` classes (the rebuilt dataset's); with `seed`, initialised as
    training does (`new_model`), without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(m.seed if seed is None else seed)
        try:
            model = build_model(m.training.model, m.training.in_shape, num_classes)
        except RayforgeError as exc:
            raise MalformedArtifact(f"{MANIFEST}: 'training' does not describe a buildable model ({exc})") from None
    return model.to(device)


def _split_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class FlatLog:
    """The step table as flat arrays: every logged index, its flip flag, the step it belongs to; batch sizes."""

    index: np.ndarray
    flip: np.ndarray
    step: np.ndarray
    sizes: np.ndarray

    @classmethod
    def of(cls, log: Steps) -> "FlatLog":
        sizes = np.fromiter((len(b) for b in log.batch), dtype=np.int64, count=len(log))
        return cls(np.concatenate(log.batch), np.concatenate(log.flip), np.repeat(np.arange(len(log)), sizes), sizes)

    def steps_with(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(steps, indices) of the log entries whose index is in `indices`."""
        mask = np.isin(self.index, indices)
        return self.step[mask], self.index[mask]


# ---------------------------------------------------------------------------------------------- the checks

def check_files(por_dir: Path, m: Manifest) -> tuple[set[int], list[Reason]]:
    """The listed checkpoint steps whose file is present as a regular file; reasons for anything else."""
    expected = {ckpt_name(c): c for c in m.checkpoints}
    own = {MANIFEST, STEPS_FILE} | ({XSTAR_FILE} if m.kind == "include" else set())
    present, unexpected, not_regular = set(), [], []
    for entry in sorted(por_dir.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name in own:
            continue  # read (and checked to be regular files) separately
        if name in expected and (entry.is_symlink() or not entry.is_file()):
            not_regular.append(name)
        elif name in expected:
            present.add(expected[name])
        else:
            looks = "ckpt" in name.lower() or CKPT_RE.match(name) is not None
            unexpected.append(f"{name!r}{' (looks like a checkpoint; not loaded)' if looks else ''}")
    reasons = []
    if unexpected:
        reasons.append(Reason("unexpected_file", f"files that are not part of a PoR: {_listed(unexpected)}"))
    if not_regular:
        reasons.append(Reason("bad_checkpoint", f"not regular files: {_listed(not_regular)}"))
    names = {e.name for e in por_dir.iterdir()}
    missing = [c for c in m.checkpoints if ckpt_name(c) not in names]
    if missing:
        reasons.append(Reason("missing_checkpoint", f"listed checkpoints without a file: steps {_listed(missing)}"))
    return present, reasons


def _same_data(m: Manifest, train: ImageArrays, n: int, sha256: str, what: str,
               num_classes: int) -> tuple[bool, list[Reason]]:
    """(whether `train` is the claimed dataset, reasons): size, content hash, input shape, labels the model has."""
    digest, reasons = arrays_sha256(train), []
    ok = len(train) == n and digest == sha256
    if not ok:
        reasons.append(Reason("dataset_mismatch", f"the {what} found ({len(train)} points, SHA-256 {digest[:12]}...) "
                                                  f"is not the PoR's ({n} points, {sha256[:12]}...)"))
    if list(train.images.shape[1:]) != list(m.training.in_shape):
        reasons.append(Reason("dataset_mismatch", f"{what} inputs are {list(train.images.shape[1:])}, the PoR "
                                                  f"declares in_shape {list(m.training.in_shape)}"))
        ok = False
    if len(train) and not 0 <= int(train.labels.min()) <= int(train.labels.max()) < num_classes:
        reasons.append(Reason("dataset_mismatch", f"{what} labels lie outside the model's classes "
                                                  f"0..{num_classes - 1}"))
        ok = False
    return ok, reasons


def check_dataset(m: Manifest, ds: Dataset | Source) -> tuple[bool, list[Reason]]:
    """(whether the training set is the PoR's D, reasons): size, content hash, input shape, labels; for kind
    exclude also the point's hash."""
    train = ds.train
    ok, reasons = _same_data(m, train, m.n, m.train_sha256, "training set", ds.num_classes)
    if m.kind != "exclude":
        return ok, reasons
    if not (m.point < len(train) and point_sha256(train, m.point) == m.point_sha256):
        reasons.append(Reason("point_hash_mismatch", f"point {m.point} of the training set does not have the "
                                                     f"claimed content hash {m.point_sha256[:12]}..."))
    return ok, reasons


def check_lr(m: Manifest, log: Steps) -> list[Reason]:
    """Every logged learning rate is the one the declared lr and schedule imply, to float precision.

    This is all a verifier can check about the lr: the owner's real lr is not in the artifact, so a PoR whose
    manifest and log both declare another lr is judged by its replay, where an lr off by a relative δ shows as a
    segment deviation of about δ x the update norm (`SegmentCheck.relative` ≈ δ; `tol_rel` bounds it)."""
    tr = m.training
    expected = learning_rates(TrainConfig(lr=tr.lr, lr_schedule=tr.lr_schedule), m.total_steps)
    k = min(m.total_steps, len(log))
    rtol = COSINE_RTOL if tr.lr_schedule == "cosine" else 0.0
    wrong = np.flatnonzero(~np.isclose(log.lr[:k], expected[:k], rtol=rtol, atol=0.0))
    if not len(wrong):
        return []
    t = int(wrong[0])
    return [Reason("lr_schedule", f"learning rates differ from the declared {tr.lr_schedule} schedule (lr={tr.lr}) "
                                  f"at steps {_listed(wrong.tolist())}; step {t}: {log.lr[t]!r} instead of "
                                  f"{expected[t]!r}")]


def check_log(m: Manifest, log: Steps, flat: FlatLog) -> tuple[set[int], list[Reason]]:
    """(steps holding an index out of range, reasons): the log against the declared training."""
    tr, total, spe, reasons = m.training, m.total_steps, m.steps_per_epoch, []
    if len(log) != total:
        why = "declared" if m.public is not None else f"n={m.n}, batch_size={tr.batch_size}"
        reasons.append(Reason("step_count", f"the step table has {len(log)} steps; {tr.epochs} epochs of "
                                            f"{spe} batches ({why}) are {total}"))
    if m.checkpoints[-1] != total or m.checkpoints[-1] != len(log):
        reasons.append(Reason("checkpoints", f"the last checkpoint is step {m.checkpoints[-1]}; it must be the "
                                             f"final step ({total} declared, {len(log)} in the table)"))
    limit = m.index_limit
    bad_index_steps = set(np.unique(flat.step[(flat.index < 0) | (flat.index >= limit)]).tolist())
    if bad_index_steps:
        reasons.append(Reason("index_out_of_range", f"indices outside [0, {limit}) at steps "
                                                    f"{_listed(sorted(bad_index_steps))}"))
    wrong_size = np.flatnonzero(flat.sizes != m.batch_sizes(len(log)))
    if len(wrong_size):
        rule = "batch_size" if m.public is not None else "min(batch_size, what is left of the epoch)"
        reasons.append(Reason("batch_size", f"batches of the wrong size (the declared training gives {rule}) at "
                                            f"steps {_listed(wrong_size.tolist())}"))
    reasons += check_lr(m, log)
    if not tr.flip and flat.flip.any():
        reasons.append(Reason("flip", f"flipped samples at steps {_listed(np.unique(flat.step[flat.flip]).tolist())} "
                                      f"though the declared training uses no flips"))
    return bad_index_steps, reasons


def _content_twins(train: ImageArrays, point: int, mirrored: bool) -> np.ndarray:
    """Indices other than `point` holding the point's content (see `same_content`)."""
    twins = same_content(train, train.images[point], int(train.labels[point]), mirrored)
    twins[point] = False
    return np.flatnonzero(twins).astype(np.int64)


def check_exclusion(m: Manifest, flat: FlatLog, train) -> tuple[list[str], list[Reason]]:
    """(notes, reasons): the point and its group by index, and the point's content at any other index."""
    reasons, notes = [], []
    hit_steps, _ = flat.steps_with(np.asarray([m.point]))
    if len(hit_steps):
        reasons.append(Reason("point_in_batch", f"point {m.point} is in the batches of steps "
                                                f"{_listed(np.unique(hit_steps).tolist())}"))
    hit_steps, hit_idx = flat.steps_with(m.excluded[m.excluded != m.point])
    if len(hit_steps):
        reasons.append(Reason("excluded_in_batch", f"excluded group members {_listed(np.unique(hit_idx).tolist())} "
                                                   f"are in the batches of steps "
                                                   f"{_listed(np.unique(hit_steps).tolist())}"))
    if m.point >= len(train):
        return notes, reasons
    twins = _content_twins(train, m.point, mirrored=m.training.flip)
    hit_steps, hit_idx = flat.steps_with(twins)
    if len(hit_steps):
        reasons.append(Reason("duplicate_in_batch",
                              f"indices {_listed(np.unique(hit_idx).tolist())} hold the point's content (same image "
                              f"and label{', or its mirror image' if m.training.flip else ''}) and are in the "
                              f"batches of steps {_listed(np.unique(hit_steps).tolist())}"))
    if len(twins):
        notes.append(f"the training set holds the point's content also at indices {_listed(twins.tolist())}")
    return notes, reasons


def read_xstar(por_dir: Path, m: Manifest) -> tuple[ImageArrays | None, list[Reason]]:
    """x* as the PoR carries it (one point, from safetensors only), or None and why it cannot be used."""
    path, shape = por_dir / XSTAR_FILE, tuple(m.training.in_shape)
    if path.is_symlink() or not path.is_file():
        return None, [Reason("xstar_file", f"no {XSTAR_FILE} (or not a regular file): x*'s pixels are missing")]
    try:
        tensors = read_tensors(path, f"x* ({XSTAR_FILE})")
    except MalformedArtifact as exc:
        return None, [Reason("xstar_file", str(exc))]
    image, label = tensors.get("image"), tensors.get("label")
    if set(tensors) != {"image", "label"} or image.dtype != torch.uint8 or tuple(image.shape) != shape or \
            label.dtype != torch.int64 or tuple(label.shape) != (1,):
        return None, [Reason("xstar_file", f"{XSTAR_FILE} must hold exactly 'image' (uint8 {list(shape)}) and "
                                           f"'label' (int64 [1])")]
    return ImageArrays(image.numpy()[None].copy(), label.numpy().copy()), []


def check_inclusion(m: Manifest, flat: FlatLog, train: ImageArrays, xstar: ImageArrays | None,
                    num_classes: int) -> tuple[bool, list[Reason]]:
    """(whether x* can join D for the replay, reasons): x* in exactly the claimed iterations, its carried pixels
    and label matching the claims, a label the model has, and not already in D by content."""
    inc, reasons = m.include, []
    held = np.unique(flat.steps_with(np.asarray([inc.index]))[0])
    if not np.array_equal(held, inc.steps):
        missing, unclaimed = np.setdiff1d(inc.steps, held).tolist(), np.setdiff1d(held, inc.steps).tolist()
        reasons.append(Reason("include_steps", f"x* (index {inc.index}) must be in the batches of exactly the "
                                               f"claimed iterations; missing from steps {_listed(missing) or 'none'}, "
                                               f"in unclaimed steps {_listed(unclaimed) or 'none'}"))
    if xstar is None:
        return False, reasons
    label, digest = int(xstar.labels[0]), point_sha256(xstar, 0)
    if label != inc.label:
        reasons.append(Reason("xstar_mismatch", f"x* carries label {label}; the PoR claims {inc.label}"))
    if digest != inc.sha256:
        reasons.append(Reason("xstar_mismatch", f"x*'s carried image and label hash to {digest[:12]}...; the PoR "
                                                f"claims {inc.sha256[:12]}..."))
    if not 0 <= label < num_classes:
        reasons.append(Reason("xstar_mismatch", f"x*'s label {label} is not a class of the model "
                                                f"(0..{num_classes - 1})"))
        return False, reasons
    twins = np.flatnonzero(same_content(train, xstar.images[0], label, mirrored=m.training.flip))
    if len(twins):
        reasons.append(Reason("xstar_in_dataset", f"x* is already in D (its image and label"
                                                  f"{', or its mirror image,' if m.training.flip else ''} at indices "
                                                  f"{_listed(twins.tolist())}): D ∪ {{x*}} adds nothing"))
    return True, reasons


def check_public(m: Manifest, public: ImageArrays) -> tuple[bool, list[Reason]]:
    """(whether the public dataset found is the PoR's D_p, reasons): size, content hash, input shape, labels."""
    return _same_data(m, public, m.public.n, m.public.sha256, "public dataset", m.public.num_classes)


@dataclass
class Checkpoints:
    """What the checkpoint check learnt: readable steps, every segment's update norm, the final parameters."""

    valid: set[int] = field(default_factory=set)
    update_norm: dict[tuple[int, int], float] = field(default_factory=dict)
    final: dict[str, torch.Tensor] | None = None


def _is_initialisation(m: Manifest, tensors: dict[str, torch.Tensor], num_classes: int = NUM_CLASSES) -> bool:
    init = _fresh_model(m, torch.device("cpu"), seed=m.seed, num_classes=num_classes)
    expected = state_tensors(init, zero_velocity(init) if m.training.momentum else None)
    return all(torch.equal(tensors[k], v) for k, v in expected.items())


def _read_checkpoint(por_dir: Path, c: int, template: nn.Module, momentum: bool) -> tuple[dict | None, list[Reason]]:
    try:
        tensors = read_checkpoint(por_dir / ckpt_name(c))
        check_state(tensors, template, f"checkpoint {c}", need_velocity=momentum)
    except MalformedArtifact as exc:
        return None, [Reason("bad_checkpoint", f"step {c}: {exc}")]
    return tensors, []


def check_checkpoints(por_dir: Path, m: Manifest, present: set[int], template: nn.Module,
                      num_classes: int = NUM_CLASSES) -> tuple[Checkpoints, list[Reason]]:
    """Every present checkpoint has exactly the declared model's tensors; checkpoint 0 is the seeded
    initialisation; the update norm of every segment whose two ends are readable. (Missing ones: `check_files`.)"""
    out, reasons, prev = Checkpoints(), [], None
    for c in m.checkpoints:
        tensors, found = _read_checkpoint(por_dir, c, template, bool(m.training.momentum)) if c in present \
            else (None, [])
        reasons += found
        if tensors is None:
            prev = None
            continue
        out.valid.add(c)
        params = params_of(tensors)
        if prev is not None:
            out.update_norm[(prev[0], c)] = l2_distance(params, prev[1])
        prev = (c, params)
        if c == 0 and not _is_initialisation(m, tensors, num_classes):
            reasons.append(Reason("init", f"checkpoint 0 is not the {m.training.model} initialisation from seed "
                                          f"{m.seed} (with zero velocity)"))
        if c == m.checkpoints[-1]:
            out.final = params
    return out, reasons


# ---------------------------------------------------------------------------------------------- replay

def select_segments(segments: list[SegmentCheck], kind: str, count: int | None, steps_per_epoch: int,
                    seed: int | None) -> list[SegmentCheck]:
    """The segments to replay. topq:Q is the PoL paper's heuristic: within every epoch (a segment belongs to the
    epoch its start step is in) the Q segments with the largest stored update per step, ‖θ_stop − θ_start‖ /
    (stop − start); random:N draws N distinct segments from `seed`. Segments whose update is unknown (unreadable
    checkpoints) rank first: they fail anyway.

    Per step, not per segment (a departure from PoL, whose checkpoints are equally spaced): a PoR export adds
    one-step windows around each epoch's largest updates (`rayforge.por.export`), and a whole segment's update
    would always outrank them. Per step, a k-step segment's rate is at most its largest single step (triangle
    inequality), so an honest export's windows rank first and topq:Q replays Q single steps per epoch; on a PoR
    with equally spaced checkpoints the ranking is PoL's (only a shorter last segment moves)."""
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
        ranked = sorted(group, key=lambda s: (s.update_norm is not None, -(s.update_norm or 0.0) / (s.stop - s.start)))
        chosen.extend(ranked[:count])
    return sorted(chosen, key=lambda s: s.start)


@dataclass
class Replayer:
    """Replays segments of a PoR's log from its stored checkpoints and measures how far each lands."""

    por_dir: Path
    log: Steps
    data: TensorData
    model: nn.Module
    hyper: SGDHyper

    def replay(self, s: SegmentCheck) -> None:
        """Set s.distance, s.max_abs, s.relative, s.velocity_distance, s.buffer_distance and s.seconds."""
        t0 = time.perf_counter()
        momentum = bool(self.hyper.momentum)
        velocity = zero_velocity(self.model)
        load_state(read_checkpoint(self.por_dir / ckpt_name(s.start)), self.model, velocity if momentum else None)
        replay_steps(self.model, velocity, self.data, self.log, s.start, s.stop, self.hyper)
        ours = state_tensors(self.model, velocity if momentum else None)
        stored = read_checkpoint(self.por_dir / ckpt_name(s.stop))
        params = _split_state(ours, "param/")
        s.distance = l2_distance(params, stored)
        s.max_abs = max_abs_diff(params, stored)
        s.relative = s.distance / s.update_norm if s.update_norm else (0.0 if s.distance == 0 else math.inf)
        float_buffers = {k: v for k, v in _split_state(ours, "buffer/").items() if v.is_floating_point()}
        s.buffer_distance = l2_distance(float_buffers, stored) if float_buffers else None
        s.velocity_distance = l2_distance(_split_state(ours, "velocity/"), stored) if momentum else None
        exact_buffers = all(torch.equal(v, stored[k]) for k, v in _split_state(ours, "buffer/").items()
                            if not v.is_floating_point())
        s.ok = exact_buffers  # the tolerances are applied by `judge`
        s.seconds = time.perf_counter() - t0


def velocity_tolerance(m: Manifest, tol: float) -> float | None:
    """A velocity error e moves the parameters of the following steps by at most lr·e·(1 + m + m² + ...) =
    lr·e/(1-m), so this bound keeps a stored velocity from injecting more than `tol` into the parameters."""
    return tol * (1.0 - m.training.momentum) / m.training.lr if m.training.momentum else None


def judge(s: SegmentCheck, tol: float, tol_rel: float | None, velocity_tol: float | None) -> Reason | None:
    """Apply the tolerances to a replayed segment: every bound given must hold. The mismatch, if any."""
    bounds = [(s.distance, tol, f"params {s.distance:.3g} (tol {tol:g})")]
    if tol_rel is not None:
        bounds.append((s.relative, tol_rel, f"{s.relative:.3g} of the update norm {s.update_norm:.3g} "
                                            f"(tol-rel {tol_rel:g})"))
    if s.velocity_distance is not None:
        bounds.append((s.velocity_distance, velocity_tol, f"velocity {s.velocity_distance:.3g} "
                                                          f"(tol {velocity_tol:.3g})"))
    if s.buffer_distance is not None:
        bounds.append((s.buffer_distance, tol, f"buffers {s.buffer_distance:.3g}"))
    s.ok = bool(s.ok and all(value <= bound for value, bound, _ in bounds))
    if s.ok:
        return None
    return Reason("replay_mismatch", f"steps {s.start}..{s.stop}: the replay ends "
                                     f"{', '.join(text for _, _, text in bounds)} (ℓ2) away from checkpoint {s.stop}")


def _why_skipped(s: SegmentCheck, dataset_ok: bool, ckpts: Checkpoints, n_steps: int,
                 bad_index_steps: set[int]) -> str | None:
    if not dataset_ok:
        return "the dataset differs"
    if s.start not in ckpts.valid or s.stop not in ckpts.valid:
        return "a checkpoint is missing or unreadable"
    if s.stop > n_steps:
        return "the step table ends before this segment does"
    if any(t in bad_index_steps for t in range(s.start, s.stop)):
        return "a batch holds an index out of range"
    return None


def check_replay(req: Request, m: Manifest, selected: list[SegmentCheck], replayer: Replayer | None,
                 ckpts: Checkpoints, n_steps: int, bad_index_steps: set[int]) -> list[Reason]:
    """Replay every selected segment that can be (`replayer` is None when the dataset differs) and judge it."""
    reasons, velocity_tol = [], velocity_tolerance(m, req.tol)
    for s in selected:
        s.skipped = _why_skipped(s, replayer is not None, ckpts, n_steps, bad_index_steps)
        if s.skipped:
            continue
        replayer.replay(s)
        mismatch = judge(s, req.tol, req.tol_rel, velocity_tol)
        if mismatch:
            reasons.append(mismatch)
    return reasons


# ---------------------------------------------------------------------------------------------- claims

def _deployed_params(tensors: dict[str, torch.Tensor], template: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """A deployed model's parameters: keys param/* (+ buffer/*) as `write_deployed_model` writes, or a plain
    state_dict (parameter and buffer names). Must match the declared model's parameters exactly."""
    buffers = {k for k, _ in template.named_buffers()}
    expected = dict(template.named_parameters())
    if any(k.startswith("param/") for k in tensors):
        params = params_of(tensors)
        allowed = {f"param/{k}" for k in expected} | {f"buffer/{k}" for k in buffers}
    else:
        params = {k: v for k, v in tensors.items() if k in expected}
        allowed = set(expected) | buffers
    extra = sorted(set(tensors) - allowed)
    if set(params) != set(expected) or extra:
        raise MalformedArtifact(f"{where}: tensors do not match the declared model (missing "
                                f"{sorted(set(expected) - set(params))[:3]}, unexpected {extra[:3]})")
    for k, ref in expected.items():
        if params[k].shape != ref.shape or params[k].dtype != ref.dtype:
            raise MalformedArtifact(f"{where}: '{k}' has shape {tuple(params[k].shape)} {params[k].dtype}, "
                                    f"expected {tuple(ref.shape)} {ref.dtype}")
    return params


def check_claims(m: Manifest, template: nn.Module, final: dict[str, torch.Tensor] | None,
                 deployed: dict[str, torch.Tensor] | None, where: str | None) -> tuple[float | None, list[Reason]]:
    """(the measured ε, reasons): d_theta agrees with epsilon; the deployed model (when given) hashes to
    deployed_sha256 and lies at most the claimed epsilon from the PoR's final checkpoint."""
    dim = sum(p.numel() for p in template.parameters())
    implied = m.epsilon ** 2 / dim
    reasons = []
    if abs(m.d_theta - implied) > 1e-9 * max(m.d_theta, implied) + 1e-300:
        reasons.append(Reason("claims_inconsistent", f"d_theta={m.d_theta!r} but epsilon²/dim(θ)={implied!r}"))
    if deployed is None:
        return None, reasons
    try:
        params = _deployed_params(deployed, template, where)
    except MalformedArtifact as exc:
        return None, reasons + [Reason("deployed_mismatch", str(exc))]
    digest = model_sha256(params)
    if digest != m.deployed_sha256:
        reasons.append(Reason("deployed_mismatch", f"{where} has model_sha256 {digest[:12]}..., the PoR is about "
                                                   f"{m.deployed_sha256[:12]}..."))
    if final is None:
        return None, reasons
    measured = l2_distance(final, params)
    if not measured <= m.epsilon:
        reasons.append(Reason("epsilon_exceeded", f"the PoR's final model is {measured!r} (ℓ2) from the deployed "
                                                  f"one; the PoR claims epsilon={m.epsilon!r}"))
    return measured, reasons


# ---------------------------------------------------------------------------------------------- the verifier

def verify_por(por_dir: str | Path, data_root: str | Path | None = None, model_path: str | Path | None = None,
               steps: str = "all", tol: float = DEFAULT_TOL, seed: int | None = None, threads: int | None = None,
               device: str | torch.device = "cpu", tol_rel: float | None = None,
               warn: Callable[[str], None] | None = None, trust_model_code: bool = False) -> VerifyReport:
    """Verify the PoR in `por_dir`; see the module docstring for every check.

    data_root: where the dataset's files are (only there when given; else $RAYFORGE_DATA, else the download cache);
    model_path: the deployed model (safetensors) the PoR is about; steps: all | topq:Q | random:N (segments to
    replay); tol: ℓ2 tolerance per replayed segment; tol_rel: also bound each segment's ℓ2 deviation by this
    fraction of its update norm; seed: for random:N (drawn and reported when None); threads: torch threads for the
    replay (default: the PoR's, capped at the local cores); warn: receives one-line warnings (default:
    `warnings.warn`); trust_model_code: a PoR whose model is `module:callable` (the owner's own architecture) is
    only verified when this is set, since building it imports and runs that module. Errors a verifier's input
    causes are UnusableInput or MalformedArtifact (exit 2).
    """
    previous_threads = torch.get_num_threads()
    try:
        req = make_request(por_dir, data_root, model_path, steps, tol, tol_rel, seed, threads, device,
                           trust_model_code)
        return _verify(req, warn or (lambda message: warnings.warn(message, stacklevel=4)))
    except RayforgeError as exc:
        if exc.exit_code == 2:
            raise
        raise UnusableInput(str(exc)) from None  # never exit 1 ("refuted") for an input the verifier cannot use
    finally:
        torch.set_num_threads(previous_threads)  # the replay sets its thread count; leave the caller's as it was


def local_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def replay_threads(trained: int | None, asked: int | None) -> tuple[int | None, str | None]:
    """Threads for the replay: `asked` when given, else the PoR's training.threads capped at the local cores (a PoR
    may name far more threads than the verifier has; oversubscribing them only slows the replay down, e.g. 256
    threads on 2 cores took a 4 s verification to 207 s). Also a one-line warning when that differs from the PoR's
    count: float rounding may then differ from the owner's, within the tolerance."""
    threads = asked or (min(trained, local_cores()) if trained else None)
    if trained is None or threads == trained:
        return threads, None
    why = "as --threads asks" if asked else f"capped at the {local_cores()} local cores"
    return threads, (f"replaying with {threads} threads ({why}); the PoR was trained with {trained}, so float "
                     f"rounding may differ from the owner's (within the tolerance)")


def _read_log(por_dir: Path) -> Steps:
    path = por_dir / STEPS_FILE
    if path.is_symlink():
        raise MalformedArtifact(f"{path}: not a regular file")
    return read_steps(path)  # schema, nulls, contiguous steps, batch/flip lengths (indices: checked by check_log)


def _load_dataset(m: Manifest, data_root: Path | None) -> Dataset:
    """The PoR's training set D, from the verifier's data root (never the artifact's) or the default places."""
    data_cfg = dataclasses.replace(m.data, data_root=None if data_root is None else str(data_root))
    return build_dataset(data_cfg, m.seed, fallback=data_root is None)


@dataclass(frozen=True)
class Source:
    """What the verifier rebuilt for the PoR's kind (never from a path in the artifact): D (kinds exclude and
    include) or D_p (kind public), and the normalisation its pixels enter the model with."""

    train: ImageArrays
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int  # the model's: D's classes, or as a public PoR declares them


def load_source(m: Manifest, data_root: Path | None) -> Source:
    if m.public is None:
        ds = _load_dataset(m, data_root)
        return Source(ds.train, ds.mean, ds.std, ds.num_classes)
    if data_root is None:
        raise UnusableInput("a public-data PoR is checked against the public dataset: pass --data-root DIR, its "
                            "image folder (DIR/train/<class>/*)")
    from rayforge.data.public import load_public

    return Source(load_public(data_root), m.public.mean, m.public.std, m.public.num_classes)


def exclude_checks(por_dir: Path, m: Manifest, flat: FlatLog, src: Source):
    """D, the point's hash, and the exclusion."""
    ok, reasons = check_dataset(m, src)
    notes, found = check_exclusion(m, flat, src.train)
    return notes, src.train if ok else None, reasons + found


def include_checks(por_dir: Path, m: Manifest, flat: FlatLog, src: Source):
    """D, x*, and the inclusion; the replay runs on D ∪ {x*}."""
    ok, reasons = check_dataset(m, src)
    xstar, found = read_xstar(por_dir, m)
    usable, found_inclusion = check_inclusion(m, flat, src.train, xstar, src.num_classes)
    points = ImageArrays(np.concatenate([src.train.images, xstar.images]),
                         np.concatenate([src.train.labels, xstar.labels])) if ok and usable else None
    return [], points, reasons + found + found_inclusion


def public_checks(por_dir: Path, m: Manifest, flat: FlatLog, src: Source):
    """D_p; the replay runs on it."""
    ok, reasons = check_public(m, src.train)
    return [], src.train if ok else None, reasons


# kind -> fn(por_dir, manifest, flat log, source) -> (notes, the points the log's indices name or None when the
# replay cannot use them, reasons)
KIND_CHECKS = {"exclude": exclude_checks, "include": include_checks, "public": public_checks}


@dataclass
class Findings:
    """What the checks before the replay found."""

    reasons: list[Reason]
    notes: list[str]
    points: ImageArrays | None  # what the log's indices name (D, D ∪ {x*} or D_p); None: the replay cannot run
    bad_index_steps: set[int]
    ckpts: Checkpoints


def check_before_replay(req: Request, m: Manifest, log: Steps, src: Source, template: nn.Module) -> Findings:
    """Files, the kind's data checks, log and checkpoints: every check that replays nothing."""
    flat = FlatLog.of(log)
    present, reasons = check_files(req.por_dir, m)
    notes, points, found = KIND_CHECKS[m.kind](req.por_dir, m, flat, src)
    bad_index_steps, found_log = check_log(m, log, flat)
    ckpts, found_ckpts = check_checkpoints(req.por_dir, m, present, template, src.num_classes)
    return Findings(reasons + found + found_log + found_ckpts, notes, points, bad_index_steps, ckpts)


def replay_selected(req: Request, m: Manifest, log: Steps, src: Source, found: Findings) -> tuple[
        list[SegmentCheck], list[SegmentCheck], list[Reason]]:
    """(all segments, the selected ones, replay reasons)."""
    segments = [SegmentCheck(a, b, found.ckpts.update_norm.get((a, b)))
                for a, b in zip(m.checkpoints, m.checkpoints[1:])]
    selected = select_segments(segments, req.kind, req.count, m.steps_per_epoch, req.seed)
    replayer = Replayer(req.por_dir, log, TensorData(found.points, src.mean, src.std, req.device),
                        _fresh_model(m, req.device, num_classes=src.num_classes),
                        SGDHyper(m.training.momentum, m.training.weight_decay)) \
        if found.points is not None else None
    return segments, selected, check_replay(req, m, selected, replayer, found.ckpts, len(log), found.bad_index_steps)


def _check_model_code(m: Manifest, trusted: bool) -> list[str]:
    """A `module:callable` model is the owner's code: refuse it unless trusted; the note saying it ran."""
    if not is_code_reference(m.training.model):
        return []
    if not trusted:
        raise UntrustedModelCode(f"the PoR's model '{m.training.model}' is code to import and run; verify it only "
                                 f"with --trust-model-code (trust_model_code=True), with that module on the path")
    return [f"built the model by importing and running '{m.training.model}' (trusted model code)"]


def _verify(req: Request, warn: Callable[[str], None]) -> VerifyReport:
    t0 = time.perf_counter()
    m, log = read_manifest(req.por_dir), _read_log(req.por_dir)
    trusted_note = _check_model_code(m, req.trust_model_code)
    threads, warning = replay_threads(m.training.threads, req.threads)
    if warning:
        warn(warning)
    set_determinism(threads)
    src = load_source(m, req.data_root)
    template = _fresh_model(m, torch.device("cpu"), num_classes=src.num_classes)
    timing = {"dataset_s": time.perf_counter() - t0}
    found = check_before_replay(req, m, log, src, template)
    found.notes += trusted_note
    timing["checks_s"] = time.perf_counter() - t0 - timing["dataset_s"]
    segments, selected, replay_reasons = replay_selected(req, m, log, src, found)
    timing["replay_s"] = time.perf_counter() - t0 - timing["dataset_s"] - timing["checks_s"]
    measured, claim_reasons = check_claims(m, template, found.ckpts.final, req.deployed, req.model_path)
    reasons = found.reasons + replay_reasons + claim_reasons
    if req.kind != "all":
        found.notes.append(f"replayed {len(selected)} of {len(segments)} segments ({req.kind}:{req.count})")
    dim = sum(p.numel() for p in template.parameters())
    timing["total_s"] = time.perf_counter() - t0
    return VerifyReport(
        por_dir=str(req.por_dir), valid=not reasons, reasons=reasons, notes=found.notes,
        unchecked=[] if req.deployed is not None else list(UNCHECKED_WITHOUT_MODEL), kind=m.kind,
        point=m.include.index if m.include is not None else m.point,
        excluded=[] if m.excluded is None else [int(i) for i in m.excluded],
        selection="all" if req.kind == "all" else f"{req.kind}:{req.count}",
        seed=req.seed if req.kind == "random" else None, tol=req.tol, tol_rel=req.tol_rel,
        velocity_tol=velocity_tolerance(m, req.tol), threads=threads or torch.get_num_threads(),
        trained_threads=m.training.threads, device=str(req.device), segments_total=len(segments), segments=selected,
        epsilon=m.epsilon, d_theta=m.d_theta, epsilon_measured=measured,
        d_theta_measured=None if measured is None else measured ** 2 / dim, timing=timing)
