"""The PoR from public data (Section VI, "Zero-knowledge access to PoRs", item 3): a PoR that never shows D.

Every one of the τ original minibatches B_t is replaced by one forged from a public dataset D_p (drawn from the
same distribution as D), keeping the gradient at θ_t of the original trajectory close to the logged one, g_t. The
forged log is replayed from θ₀ on D_p (`rayforge.por.export.write_por`); its manifest names D_p (size, SHA-256, the
normalisation training used) and no config, hash, size or index of D.

Strategies, per step (`grad_error` = ‖∇L(B̂_t) − g_t‖ is always the exact minibatch gradient's, from the
candidate-gradient evaluator of phase 1):

  paper    the paper's: the best of μ candidate minibatches of b points drawn uniformly from D_p, with uniform
           flips when training used flips (Algorithm 2 lines 9-13 with D_sub = D_p: `rayforge.forge.algorithm2`).
  swap     a seeded pool of `pool_size` D_p points (both orientations with flips) and their per-sample gradients; b
           of them picked greedily to cancel b·g_t, the original batch's summed gradient (`rayforge.forge.swap`'s
           greedy residual matching, with every member of B_t to be replaced).
  hybrid   (default) the better of the two.

Schedule: τ steps and the declared epochs, as in the original log, but every batch holds `batch_size` points of
D_p (D_p is sampled, not partitioned, so a short last batch of D's epochs becomes a full one; a mean gradient is
matched whatever the size). τ / epochs and b still say roughly how large D is: the paper's "knowledge about the
size of the dataset" applies to this PoR too.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from rayforge.data import ImageArrays, arrays_sha256
from rayforge.data.public import load_public
from rayforge.errors import RayforgeError
from rayforge.forge.algorithm2 import ForgedBatch, best_of_candidates, draw_candidates
from rayforge.forge.fastgrad import make_gradient_evaluator
from rayforge.forge.gradients import flatten
from rayforge.forge.swap import greedy_rows, per_sample, with_flips
from rayforge.io import check_fresh_dir
from rayforge.por.export import TOPQ_WINDOWS, write_por
from rayforge.progress import progress_bar
from rayforge.train.batches import TensorData
from rayforge.train.log import Steps
from rayforge.train.replay import walk_trajectory
from rayforge.train.run import TrainingRun, set_determinism

STRATEGIES = ("paper", "swap", "hybrid")
CANDIDATE_STREAM = 0x9B1C
POOL_STREAM = 0x9B1D


def check_public_input(run: TrainingRun, public: ImageArrays, strategy: str, mu: int, pool_size: int) -> None:
    """One-line errors for a D_p the run's model cannot train on, or options that cannot forge a batch from it."""
    shape, b = tuple(int(d) for d in run.info["shape"]), run.cfg.train.batch_size
    if public.images.shape[1:] != shape:
        c, h, w = public.images.shape[1:]
        raise RayforgeError(f"the public dataset's images are {w}x{h} with {c} channel(s); the model takes "
                            f"{shape[2]}x{shape[1]} with {shape[0]}")
    if len(public) and int(public.labels.max()) >= run.num_classes:
        raise RayforgeError(f"the public dataset has {int(public.labels.max()) + 1} classes; the model knows "
                            f"{run.num_classes}")
    if len(public) < b:
        raise RayforgeError(f"the public dataset has {len(public)} points, fewer than a batch of {b}")
    if strategy not in STRATEGIES:
        raise RayforgeError(f"public PoR: unknown strategy '{strategy}' (known: {', '.join(STRATEGIES)})")
    for name, value, low in (("mu", mu, 1), ("pool", pool_size, b)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RayforgeError(f"--{name} must be an integer >= {low}, got {value!r}")


class PublicForger:
    """Forges every step's batch from D_p at θ_t (paper: best of μ; swap: greedy residual matching)."""

    def __init__(self, public: TensorData, seed: int, batch_size: int, flip: bool, strategy: str, mu: int,
                 pool_size: int, chunk: int, grad_method: str):
        self.public, self.seed, self.b, self.flip = public, seed, batch_size, flip
        self.strategy, self.mu, self.pool_size = strategy, mu, pool_size
        self.chunk, self.grad_method = chunk, grad_method
        self.grads, self.hook_model, self.cache = None, None, {}

    def forge(self, t: int, model: torch.nn.Module, target: torch.Tensor) -> ForgedBatch:
        if self.grads is None:  # parameters are passed functionally: one copy serves every θ
            self.grads = make_gradient_evaluator(model, self.chunk, self.grad_method)
            self.hook_model = copy.deepcopy(model)
        params = dict(model.named_parameters())
        found = []
        if self.strategy in ("paper", "hybrid"):
            found.append(self.paper(t, params, target))
        if self.strategy in ("swap", "hybrid"):
            found.append(self.swap(t, params, target))
        return min(found, key=lambda f: f.grad_error)  # hybrid: the paper's on a tie

    def paper(self, t: int, params, target: torch.Tensor) -> ForgedBatch:
        rng = np.random.default_rng([self.seed, CANDIDATE_STREAM, t])
        idx, flips = draw_candidates(rng, np.arange(len(self.public)), self.mu, self.b, self.flip)
        [best] = best_of_candidates(self.grads, params, self.public, target, [idx], [flips])
        return best

    def swap(self, t: int, params, target: torch.Tensor) -> ForgedBatch:
        rng = np.random.default_rng([self.seed, POOL_STREAM, t])
        pool = np.sort(rng.choice(len(self.public), size=min(self.pool_size, len(self.public)), replace=False))
        pool_idx, pool_flips = with_flips(pool, self.flip)
        x, y = self.public.batch(pool_idx, pool_flips)
        pool_grads = per_sample(self.hook_model, params, x, y, self.cache)
        picks = greedy_rows(pool_grads, pool_idx, self.b * target, self.b)
        idx, flips = pool_idx[picks][None].astype(np.int64), pool_flips[picks][None]
        [best] = best_of_candidates(self.grads, params, self.public, target, [idx], [flips])
        return best


def public_forged_log(run: TrainingRun, data: TensorData, forger: PublicForger, device: torch.device,
                      progress: bool = True) -> tuple[Steps, np.ndarray]:
    """(the forged log, every step's gradient error relative to ‖g_t‖): walks the original trajectory on D
    (`data`)."""
    batches, flips, relative = [], [], []
    walk = walk_trajectory(run, data, 0, run.total_steps, device)
    for t, model, g in progress_bar(walk, desc="public batches", total=run.total_steps, unit="step",
                                    disable=not progress):
        target = flatten(g)
        forged = forger.forge(t, model, target)
        batches.append(np.asarray(forged.batch, np.int64))
        flips.append(np.asarray(forged.flip, bool))
        relative.append(forged.grad_error / max(float(torch.linalg.vector_norm(target)), 1e-30))
    return Steps(batches, flips, run.steps.lr), np.asarray(relative)


def public_claim(run: TrainingRun, public: ImageArrays, mean, std) -> dict:
    """The kind-specific keys of a public PoR: D_p and the normalisation, the model's seed; nothing of D."""
    return {"kind": "public", "seed": int(run.cfg.seed),
            "public": {"n": len(public), "sha256": arrays_sha256(public), "mean": [float(m) for m in mean],
                       "std": [float(s) for s in std], "steps": run.total_steps,
                       "num_classes": run.num_classes}}


def export_public_por(run: TrainingRun, public_dir: str | Path, out_dir: str | Path, strategy: str = "hybrid",
                      mu: int | None = None, pool_size: int | None = None, device: torch.device | None = None,
                      progress: bool = True, summary: dict | None = None,
                      topq_windows: int = TOPQ_WINDOWS) -> dict:
    """Write the public-data PoR of RUN's model, every batch from D_p in `public_dir` (`<dir>/train/<class>/*`),
    into `out_dir` (absent or empty); return por.json. `summary`, when given, receives the per-step relative
    gradient errors ("relative_errors"). `topq_windows`: see `rayforge.por.export`."""
    out_dir = Path(out_dir)
    check_fresh_dir(out_dir)
    mu = run.cfg.forge.mu if mu is None else mu
    pool_size = run.cfg.forge.pool_size if pool_size is None else pool_size
    public = load_public(public_dir)
    check_public_input(run, public, strategy, mu, pool_size)
    previous_threads = torch.get_num_threads()
    try:
        set_determinism(run.cfg.train.threads)
        device = device or run.device()
        ds = run.load_dataset()
        public_data = TensorData(public, ds.mean, ds.std, device)  # D_p enters the model as training data did
        forger = PublicForger(public_data, run.cfg.seed, run.cfg.train.batch_size, run.cfg.data.flip, strategy, mu,
                              pool_size, run.cfg.forge.chunk, run.cfg.forge.grad_method)
        forged, relative = public_forged_log(run, run.tensor_data(ds, device), forger, device, progress)
        if summary is not None:
            summary["relative_errors"] = relative
        return write_por(run, forged, 0, out_dir, public_claim(run, public, ds.mean, ds.std), public_data, device,
                         topq_windows=topq_windows)
    finally:
        torch.set_num_threads(previous_threads)
