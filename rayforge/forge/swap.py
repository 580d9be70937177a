"""Strategy `swap` (beyond the paper): keep the original batch and replace only its members of D_k.

For part k at step t the forged batch starts as B_t with its flips; the members of B_t in D_k (the "removed", R)
must go. With per-sample gradients g_i (the batch gradient is their mean), the gradient error of swapping R for
picks S is ‖Σ_S g_j − Σ_R g_i‖ / b, so we greedily pick, from a seeded pool of allowed points (and, when training
used flips, both orientations of each), the one that best reduces the residual r = Σ_R g_i − Σ_picks g_j:

    repeat |R| times:  j* = argmin_j ‖r − g_j‖²  over unused pool entries;  r ← r − g_j*

The pool is drawn once per step (shared by all parts: one per-sample gradient pass) and filtered per part to
D \\ D_k minus the batch. `grad_error` is then recomputed exactly as a batch gradient. For BatchNorm models the
per-sample gradients (taken in eval mode) do not add up to the batch gradient, so `SHORTLIST` greedy variants
(different first picks) are re-ranked by their exact batch gradients.

`hybrid` takes, per part, the better of the paper's μ candidates and the swap batch.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from rayforge.errors import RayforgeError
from rayforge.forge import algorithm2
from rayforge.forge.algorithm2 import ForgedBatch
from rayforge.forge.fastgrad import hooks_supported, per_sample_gradients

POOL_STREAM = 0x5A4B
SHORTLIST = 4  # greedy variants re-ranked exactly, BatchNorm models only


def per_sample(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               cache: dict) -> torch.Tensor:
    """(N, dim) per-sample gradients: exact through hooks where supported, else (BatchNorm) in eval mode."""
    if hooks_supported(model):
        return per_sample_gradients(model, params, x, y)
    if "eval_copy" not in cache:
        cache["eval_copy"] = copy.deepcopy(model).eval()
    eval_model = cache["eval_copy"]
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(eval_model, (p, buffers), (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))({k: v.detach() for k, v in params.items()}, x, y)
    return torch.cat([v.reshape(len(y), -1) for v in g.values()], dim=1)


def greedy_picks(pool_grads: torch.Tensor, pool_points: np.ndarray, residual: torch.Tensor, count: int,
                 first: int | None = None, gram: torch.Tensor | None = None) -> list[int]:
    """Rows of the pool chosen greedily to cancel `residual`; a point is used once (either orientation).
    `first` forces the first pick (shortlist variants); `gram` (pool_grads @ pool_gradsᵀ, shared by the parts of a
    step) saves a matrix-vector product per pick."""
    norms = gram.diagonal().clone() if gram is not None else (pool_grads * pool_grads).sum(1)
    dots = pool_grads @ residual
    available = torch.ones(len(pool_points), dtype=torch.bool)
    r_sq = float(residual @ residual)
    picks = []
    for i in range(min(count, len(np.unique(pool_points)))):
        # ‖r − g_j‖² = ‖r‖² − 2 r·g_j + ‖g_j‖²
        cost = torch.where(available, r_sq - 2 * dots + norms, torch.full_like(norms, float("inf")))
        j = first if (i == 0 and first is not None) else int(torch.argmin(cost))
        picks.append(j)
        g = None if gram is not None else pool_grads[j]
        r_sq = r_sq - 2 * float(dots[j]) + float(norms[j])
        dots -= gram[:, j] if gram is not None else pool_grads @ g
        available &= torch.as_tensor(pool_points != pool_points[j])
    return picks


def both_orientations(points: np.ndarray, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(indices, flip flags) of a pool: each point once, or, when training used flips, plain then mirrored."""
    if not flip:
        return points, np.zeros(len(points), bool)
    return np.concatenate([points, points]), np.concatenate([np.zeros(len(points), bool), np.ones(len(points), bool)])


def draw_pool(ctx, step: int) -> np.ndarray:
    """The step's pool of candidate substitutes, shared by all parts (seeded by (seed, step))."""
    rng = np.random.default_rng([ctx.seed, POOL_STREAM, step])
    size = min(ctx.params.pool_size, len(ctx.data))
    return np.sort(rng.choice(len(ctx.data), size=size, replace=False))


def swap_batch(ctx, model, params, target: torch.Tensor, batch: np.ndarray, flips: np.ndarray,
               remove: np.ndarray, pool: np.ndarray, pool_flips: np.ndarray, pool_grads: torch.Tensor,
               removed_grads: torch.Tensor, gram: torch.Tensor | None = None) -> ForgedBatch:
    """Replace batch[remove] by greedy picks from the pool; exact grad_error of the result."""
    if not remove.any():
        return ForgedBatch(batch.astype(np.int32), flips.copy(), 0.0, 0)  # nothing of D_k in B_t: B_t itself
    count = int(remove.sum())
    if len(np.unique(pool)) < count:
        raise RayforgeError(f"swap: D \\ D_k has fewer than the {count} points needed to replace B_t ∩ D_k")
    residual = removed_grads.sum(0)
    starts = [None]
    if not hooks_supported(model) and len(pool) > 1:  # BatchNorm: a short list of variants, re-ranked exactly
        first_cost = (pool_grads * pool_grads).sum(1) - 2 * (pool_grads @ residual)
        starts = [int(j) for j in torch.argsort(first_cost)[:SHORTLIST]]
    variants = []
    for first in starts:
        picks = greedy_picks(pool_grads, pool, residual, count, first, gram)
        new_batch, new_flips = batch.copy(), flips.copy()
        slots = np.flatnonzero(remove)[:len(picks)]
        new_batch[slots], new_flips[slots] = pool[picks], pool_flips[picks]
        variants.append((new_batch, new_flips))
    idx = np.stack([v[0] for v in variants]).astype(np.int64)
    fl = np.stack([v[1] for v in variants])
    dist = ctx.grads.distances(params, ctx.data, idx, fl, target)
    best = int(torch.argmin(dist))
    return ForgedBatch(idx[best].astype(np.int32), fl[best].copy(), float(dist[best]), len(variants))


def forge_parts(ctx, params: dict[str, torch.Tensor], step: int, parts: list[int], target: torch.Tensor,
                point_parts: np.ndarray) -> list[ForgedBatch]:
    """Strategy `swap` at one step, every part in `parts`."""
    model = ctx.swap_model
    batch = np.asarray(ctx.steps.batch[step], dtype=np.int64)
    flips = np.asarray(ctx.steps.flip[step], dtype=bool)
    pool = draw_pool(ctx, step)
    pool = pool[~np.isin(pool, batch)]
    pool_idx = np.concatenate([pool, pool]) if ctx.flip else pool
    pool_flips = np.concatenate([np.zeros(len(pool), bool), np.ones(len(pool), bool)]) if ctx.flip \
        else np.zeros(len(pool), bool)
    x, y = ctx.data.batch(np.concatenate([batch, pool_idx]), np.concatenate([flips, pool_flips]))
    cache = ctx.swap_cache
    grads = per_sample(model, params, x, y, cache)
    batch_grads, pool_grads = grads[:len(batch)], grads[len(batch):]
    gram = pool_grads @ pool_grads.T  # one matrix product per step serves every part's greedy picks
    out = []
    for k in parts:
        allowed = ctx.allowed_points(point_parts, k)
        remove = ~np.isin(batch, allowed)  # B_t ∩ D_k (and content twins of D_k)
        ok = np.isin(pool_idx, allowed)
        keep = torch.as_tensor(ok)
        k_idx, k_flips, k_grads, k_gram = pool_idx[ok], pool_flips[ok], pool_grads[keep], gram[keep][:, keep]
        short = int(remove.sum()) - len(np.unique(k_idx))
        if short > 0:  # a small pool left too few allowed points: top it up from D \ D_k, seeded per (step, part)
            spare = np.setdiff1d(allowed, np.concatenate([batch, k_idx]))
            extra = np.sort(np.random.default_rng([ctx.seed, POOL_STREAM, step, k]).choice(
                spare, size=min(short, len(spare)), replace=False))
            e_idx = np.concatenate([extra, extra]) if ctx.flip else extra
            e_flips = np.concatenate([np.zeros(len(extra), bool), np.ones(len(extra), bool)]) if ctx.flip \
                else np.zeros(len(extra), bool)
            ex, ey = ctx.data.batch(e_idx, e_flips)
            k_idx, k_flips = np.concatenate([k_idx, e_idx]), np.concatenate([k_flips, e_flips])
            k_grads = torch.cat([k_grads, per_sample(model, params, ex, ey, cache)])
            k_gram = None  # rare: the greedy computes its products directly
        out.append(swap_batch(ctx, model, params, target, batch, flips, remove, k_idx, k_flips, k_grads,
                              batch_grads[torch.as_tensor(remove)], k_gram))
    # The shared per-sample pass, in minibatch units, is charged to the step's first part.
    if out:
        out[0] = dataclasses.replace(out[0], grad_evals=out[0].grad_evals + len(y) / len(batch))
    return out


def forge_parts_hybrid(ctx, params, step: int, parts: list[int], target, point_parts) -> list[ForgedBatch]:
    """Strategy `hybrid`: per part, the better of the paper's best-of-μ and the swap batch."""
    paper = algorithm2.forge_parts(ctx, params, step, parts, target, point_parts)
    swap = forge_parts(ctx, params, step, parts, target, point_parts)
    return [dataclasses.replace(s if s.grad_error <= p.grad_error else p, grad_evals=p.grad_evals + s.grad_evals)
            for p, s in zip(paper, swap)]
