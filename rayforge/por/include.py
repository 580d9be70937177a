"""The PoR of a claim on non-membership (Section VI, "PoR for a claim on non-membership"): "x* was left out of D".

The PoR shows that (almost) the same model comes from D' = D ∪ {x*}. x* becomes index n of D' (after D's n points)
and, at each iteration t of a set H ⊂ [τ], the original minibatch B_t is replaced by a forged one that holds x*.
Everything else is the original log; the forged trajectory is replayed from the last checkpoint before min(H)
(`rayforge.por.export.write_por`) and exported with x*'s pixels (`xstar.safetensors`) so a verifier can rebuild D'.

The paper draws H at random and leaves the forged batch open. Here the forged batch is B_t with one member swapped
for x*: the member (and, when training used flips, x*'s orientation) whose per-sample gradient at θ_t is closest to
x*'s own — the swap machinery (`rayforge.forge.swap.greedy_rows`) in reverse, x* being the substitute and the batch
the pool. Its gradient error is the substitution residual ‖g(x*) − g(member)‖ / b (exact for models without
BatchNorm; for BatchNorm models per-sample gradients are taken in eval mode, as `swap` does, and only rank).
Which iterations (`pick`):

  random   the paper's: |H| iterations drawn uniformly from [τ] (seeded by the run's seed).
  best     (default) [τ] cut into |H| equal windows (|H| = epochs gives one window per epoch, so x* appears once per
           epoch, as a real member would) and in each the iteration with the smallest substitution residual.
           Costs one walk of the original trajectory with a per-sample gradient pass over each batch (b + 2
           samples per step).

The log keeps D's schedule (τ steps of D's batch sizes): x* takes the swapped member's slot, so that member is
trained on once fewer in that epoch. The PoL verification does not ask batches to partition an epoch (nor does the
paper's exclusion PoR, whose forged batches are sampled).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rayforge.data import ImageArrays, point_sha256, same_content
from rayforge.data.dataset import prepare_points
from rayforge.data.imagefolder import decode_image
from rayforge.errors import RayforgeError
from rayforge.forge.swap import greedy_rows, per_sample, with_flips
from rayforge.io import check_fresh_dir
from rayforge.por.artifact import XSTAR_FILE
from rayforge.por.export import TOPQ_WINDOWS, dataset_block, write_por
from rayforge.progress import progress_bar
from rayforge.train.batches import TensorData
from rayforge.train.log import Steps
from rayforge.train.replay import walk_trajectory
from rayforge.train.run import TrainingRun, set_determinism

PICKS = ("best", "random")
STEPS_STREAM = 0x1C1D


@dataclass(frozen=True)
class Admission:
    """x* admitted into B_t: it takes batch slot `slot`, with flip flag `flip`, at gradient error `residual`."""

    step: int
    slot: int
    flip: bool
    residual: float  # ‖g(x*) − g(B_t[slot])‖ / |B_t| at the original θ_t


# ---------------------------------------------------------------------------------------------- x*

def xstar_from_image(run: TrainingRun, path: str | Path, label: int) -> ImageArrays:
    """x* from an image file (PNG/JPEG), as one point of the run's input shape (MNIST digits of 28x28 are padded
    like the training set); one-line errors for a wrong size, channel count or label."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RayforgeError(f"--include: cannot read '{path}' ({exc.strerror or exc})") from None
    pixels = decode_image(data, f"--include '{path}'")
    image = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    point = ImageArrays(np.ascontiguousarray(image[None]), np.array([_label(label, run.num_classes)], np.int64))
    shape = tuple(int(d) for d in run.info["shape"])
    if point.images.shape[1:] != shape:
        point = prepare_points(run.cfg.data.dataset, point)
    if point.images.shape[1:] != shape:
        c, h, w = image.shape
        raise RayforgeError(f"--include '{path}' is {w}x{h} with {c} channel(s); the model takes {shape[2]}x{shape[1]} "
                            f"with {shape[0]}")
    return point


def xstar_from_test(ds, index: int, label: int | None = None) -> ImageArrays:
    """x* = point `index` of the run's test split (its own label; `label`, when given, must agree)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(ds.test):
        raise RayforgeError(f"--include-test must be an index into the test split [0, {len(ds.test)}), got {index!r}")
    point = ds.test.take(np.array([int(index)]))
    if label is not None and _label(label, ds.num_classes) != int(point.labels[0]):
        raise RayforgeError(f"--label {label} disagrees with test point {index}'s label {int(point.labels[0])}")
    return point


def _label(label, num_classes: int) -> int:
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < num_classes:
        raise RayforgeError(f"--label must be a class of the model, 0..{num_classes - 1}, got {label!r}")
    return int(label)


def check_not_in(train: ImageArrays, xstar: ImageArrays, flip: bool) -> None:
    """x* must not already be in D (by content; with flips also its mirror image): D ∪ {x*} would add nothing."""
    hits = np.flatnonzero(same_content(train, xstar.images[0], int(xstar.labels[0]), mirrored=flip))
    if len(hits):
        raise RayforgeError(f"x* is already in D (training point {int(hits[0])} has its image and label"
                            f"{', or its mirror image' if flip else ''}): there is no exclusion to repudiate")


# ---------------------------------------------------------------------------------------------- H

def iteration_count(total_steps: int, epochs: int, iterations: int | None = None, rate: float | None = None) -> int:
    """|H|: `iterations`, or round(rate x τ) (at least 1), or by default one per epoch."""
    if iterations is not None and rate is not None:
        raise RayforgeError("give --iterations or --rate, not both")
    if rate is not None:
        if not 0 < rate <= 1:
            raise RayforgeError(f"--rate must lie in (0, 1], got {rate!r}")
        return max(1, round(rate * total_steps))
    count = epochs if iterations is None else iterations
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 1 <= count <= total_steps:
        raise RayforgeError(f"--iterations must lie in [1, {total_steps}] (the log's steps), got {count!r}")
    return int(count)


def random_steps(total_steps: int, count: int, seed: int) -> np.ndarray:
    """The paper's H: `count` distinct iterations drawn uniformly (sorted)."""
    rng = np.random.default_rng([seed, STEPS_STREAM])
    return np.sort(rng.choice(total_steps, size=count, replace=False)).astype(np.int64)


def windows(total_steps: int, count: int) -> list[range]:
    """[0, τ) cut into `count` contiguous windows of (nearly) equal length."""
    bounds = np.round(np.linspace(0, total_steps, count + 1)).astype(np.int64)
    return [range(int(a), int(b)) for a, b in zip(bounds, bounds[1:])]


def best_steps(admissions: dict[int, Admission], total_steps: int, count: int) -> np.ndarray:
    """In each of `count` windows, the iteration with the smallest substitution residual (first one on ties)."""
    return np.array([min(w, key=lambda t: admissions[t].residual) for w in windows(total_steps, count)], np.int64)


# ---------------------------------------------------------------------------------------------- admissions

def admissions(run: TrainingRun, data: TensorData, xstar_index: int, steps, device: torch.device,
               progress: bool = True) -> dict[int, Admission]:
    """At each of `steps` (iterable of step indices), where x* (index `xstar_index` of `data`) best enters the
    original batch: walks the original trajectory (`walk_trajectory`) up to the last of them."""
    steps = sorted(set(int(t) for t in steps))
    start = max(c for c in run.checkpoints if c <= steps[0])
    wanted, out, hook_model, cache = set(steps), {}, None, {}
    x_idx, x_flips = with_flips(np.array([xstar_index]), run.cfg.data.flip)
    walk = walk_trajectory(run, data, start, steps[-1] + 1, device)
    for t, model, _ in progress_bar(walk, desc="x* admissions", total=steps[-1] + 1 - start, unit="step",
                                    disable=not progress):
        if hook_model is None:  # per-sample gradients hook a copy (parameters are passed in)
            hook_model = copy.deepcopy(model)
        if t not in wanted:
            continue
        batch, flips = np.asarray(run.steps.batch[t], np.int64), np.asarray(run.steps.flip[t], bool)
        xs, ys = data.batch(np.concatenate([x_idx, batch]), np.concatenate([x_flips, flips]))
        grads = per_sample(hook_model, dict(model.named_parameters()), xs, ys, cache)
        member_grads = grads[len(x_idx):]
        best = None
        for k in range(len(x_idx)):
            [slot] = greedy_rows(member_grads, batch, grads[k], 1)
            residual = float(torch.linalg.vector_norm(grads[k] - member_grads[slot])) / len(batch)
            if best is None or residual < best.residual:
                best = Admission(t, int(slot), bool(x_flips[k]), residual)
        out[t] = best
    return out


def with_xstar(steps: Steps, xstar_index: int, chosen: list[Admission]) -> Steps:
    """The log with x* in the chosen slots."""
    batches, flips = list(steps.batch), list(steps.flip)
    for a in chosen:
        batch, flip = batches[a.step].copy(), flips[a.step].copy()
        batch[a.slot], flip[a.slot] = xstar_index, a.flip
        batches[a.step], flips[a.step] = batch, flip
    return Steps(batches, flips, steps.lr)


# ---------------------------------------------------------------------------------------------- export

def include_claim(run: TrainingRun, xstar: ImageArrays, steps: np.ndarray) -> dict:
    """The kind-specific keys of an include PoR: D, and x* (index n, content hash, label, iterations)."""
    n = int(run.info["n"])
    return {"kind": "include", "dataset": dataset_block(run),
            "include": {"index": n, "sha256": point_sha256(xstar, 0), "label": int(xstar.labels[0]),
                        "steps": [int(t) for t in steps]}}


def xstar_tensors(xstar: ImageArrays) -> dict[str, torch.Tensor]:
    """xstar.safetensors: "image" uint8 (C, H, W), "label" int64 (1,)."""
    return {"image": torch.from_numpy(xstar.images[0].copy()), "label": torch.from_numpy(xstar.labels[:1].copy())}


def union_data(ds, xstar: ImageArrays, device: torch.device) -> TensorData:
    """D' = D ∪ {x*} as training tensors: D's points, then x* at index n."""
    union = ImageArrays(np.concatenate([ds.train.images, xstar.images]), np.concatenate([ds.train.labels,
                                                                                          xstar.labels]))
    return TensorData(union, ds.mean, ds.std, device)


def write_include_por(run: TrainingRun, out_dir: Path, xstar: ImageArrays, data: TensorData,
                      kept: list[Admission], device: torch.device, topq_windows: int = TOPQ_WINDOWS) -> dict:
    """Replay the original log with x* admitted as `kept` says (in step order) on D ∪ {x*} (`data`), and write the
    include PoR into `out_dir`; return por.json."""
    n, steps = int(run.info["n"]), np.array([a.step for a in kept], np.int64)
    return write_por(run, with_xstar(run.steps, n, kept), int(steps[0]), out_dir, include_claim(run, xstar, steps),
                     data, device, {XSTAR_FILE: xstar_tensors(xstar)}, topq_windows)


def export_include_por(run: TrainingRun, out_dir: str | Path, image: str | Path | None = None,
                       label: int | None = None, test_index: int | None = None, iterations: int | None = None,
                       rate: float | None = None, pick: str = "best", device: torch.device | None = None,
                       progress: bool = True, topq_windows: int = TOPQ_WINDOWS) -> tuple[dict, list[Admission]]:
    """Write the include PoR of x* (an image file with its `label`, or test point `test_index`) into `out_dir`
    (absent or empty); return por.json and the admissions of H. Every input is checked before anything runs.
    `topq_windows`: see `rayforge.por.export`."""
    out_dir = Path(out_dir)
    check_fresh_dir(out_dir)
    if (image is None) == (test_index is None):
        raise RayforgeError("give x* as an image file (--include) or a test-split index (--include-test), one of them")
    if pick not in PICKS:
        raise RayforgeError(f"--pick must be one of {', '.join(PICKS)}, got {pick!r}")
    if image is not None and label is None:
        raise RayforgeError("--include needs --label (x*'s class)")
    count = iteration_count(run.total_steps, run.cfg.train.epochs, iterations, rate)
    ds = run.load_dataset()
    xstar = xstar_from_image(run, image, label) if image is not None else xstar_from_test(ds, test_index, label)
    check_not_in(ds.train, xstar, run.cfg.data.flip)
    previous_threads = torch.get_num_threads()
    try:
        set_determinism(run.cfg.train.threads)
        device = device or run.device()
        data, n = union_data(ds, xstar, device), int(run.info["n"])
        if pick == "random":
            steps = random_steps(run.total_steps, count, run.cfg.seed)
            chosen = admissions(run, data, n, steps, device, progress)
        else:
            chosen = admissions(run, data, n, range(run.total_steps), device, progress)
            steps = best_steps(chosen, run.total_steps, count)
        kept = [chosen[int(t)] for t in steps]
        return write_include_por(run, out_dir, xstar, data, kept, device, topq_windows), kept
    finally:
        torch.set_num_threads(previous_threads)
