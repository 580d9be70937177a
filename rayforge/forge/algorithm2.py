"""Algorithm 2 (Appendix B's Algorithm 3 in full): the forged minibatch of part k at step t, strategy `paper`.

For part k at step t (Alg. 3 lines 7-14):
    line 8   D_sub ⊂ D \\ D_k^(t)                     (`dsub_size` points; default all of D \\ D_k, see below;
                                                   content twins of D_k's points count as D_k: forge/twins.py)
    line 9   μ candidate minibatches of size b from D_sub, each without repeats
    line 11  Flip(B_m) ~ Uniform({0,1}^b)              (only when the log was trained with flips)
    line 13  m* = argmin_m ‖∇(ℓ(Aug(B_m)) + wd·R(θ)) − grad^(t)‖²   at θ^(t), with the original batch's own flips
Lines 15-19 (which points use it) belong to phase 2: a group uses part k's batch at t iff a member is in B_t.

D_sub default: the paper leaves its size open. We default to all of D \\ D_k (`dsub_size: null`): every candidate
is then a uniform minibatch of the points allowed for part k, which is the most candidate diversity for the same μ
and keeps forged batches as uniform as the original sampling (Table IV). A smaller `dsub_size` draws D_sub first.

Weight decay: both gradients carry the same wd·θ term at the same θ, so it cancels in the distance; it enters
`grad_norm` = ‖grad^(t)‖ only (see rayforge.train.sgd on the form of the term).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CANDIDATE_STREAM = 0xCA4D


@dataclass(frozen=True)
class ForgedBatch:
    batch: np.ndarray  # int32 indices
    flip: np.ndarray  # bool
    grad_error: float  # ‖ĝ − g‖₂
    grad_evals: float  # minibatch gradients spent on this choice (per-sample passes count b samples as one)


def candidate_rng(seed: int, step: int, part: int) -> np.random.Generator:
    """The RNG of one (step, part): results never depend on which actor or in which order units run."""
    return np.random.default_rng([seed, CANDIDATE_STREAM, step, part])


def draw_candidates(rng: np.random.Generator, allowed: np.ndarray, mu: int, b: int, flip: bool,
                    dsub_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lines 8-11: D_sub from the allowed points, then μ minibatches of b distinct points and their flip flags."""
    dsub = allowed
    if dsub_size is not None and dsub_size < len(allowed):
        dsub = np.sort(rng.choice(allowed, size=dsub_size, replace=False))
    if len(dsub) < b:
        raise ValueError(f"D_sub has {len(dsub)} points, fewer than the batch size {b}")
    idx = np.stack([rng.choice(dsub, size=b, replace=False) for _ in range(mu)]).astype(np.int64)
    flips = rng.random((mu, b)) < 0.5 if flip else np.zeros((mu, b), dtype=bool)
    return idx, flips


def best_of_candidates(grads, params: dict[str, torch.Tensor], data, target: torch.Tensor,
                       idx: list[np.ndarray], flips: list[np.ndarray]) -> list[ForgedBatch]:
    """Line 13 for several candidate sets at one θ: in each set, the candidate whose minibatch gradient is closest
    to `target` (first one on ties). All sets go through one gradient call, so the evaluator can share the work
    of samples drawn by several sets (rayforge.forge.fastgrad)."""
    dist = grads.distances(params, data, np.concatenate(idx), np.concatenate(flips), target)
    out, start = [], 0
    for i, f in zip(idx, flips):
        d = dist[start:start + len(i)]
        best = int(torch.argmin(d))
        out.append(ForgedBatch(i[best].astype(np.int32), f[best].copy(), float(d[best]), len(i)))
        start += len(i)
    return out


def forge_parts(ctx, params: dict[str, torch.Tensor], step: int, parts: list[int], target: torch.Tensor,
                point_parts: np.ndarray, records=None) -> list[ForgedBatch]:
    """Strategy `paper` at one step: for each part k, the best of μ random candidates from D \\ D_k (`records`,
    the training step's per-sample factors, are not used)."""
    b = len(ctx.steps.batch[step])
    drawn = [draw_candidates(candidate_rng(ctx.seed, step, k), ctx.allowed_points(point_parts, k), ctx.params.mu,
                             b, ctx.flip, ctx.params.dsub_size) for k in parts]
    return best_of_candidates(ctx.grads, params, ctx.data, target, [d[0] for d in drawn], [d[1] for d in drawn])
