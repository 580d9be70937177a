"""Strategy `swap` (beyond the paper): keep the original batch and replace only its members of D_k.

For part k at step t the forged batch starts as B_t with its flips; the members of B_t in D_k (the "removed", R)
must go. With per-sample gradients g_i (the batch gradient is their mean), the gradient error of swapping R for
picks S is ‖Σ_S g_j − Σ_R g_i‖ / b. From a seeded pool of allowed points (and, when training used flips, both
orientations of each) we pick greedily, then improve the picks by exchanges, all on the Gram matrix of the
per-sample gradients (r = Σ_R g_i − Σ_picks g_j):

    greedy    repeat |R| times:  j* = argmin_j ‖r − g_j‖²  over unused pool entries;  r ← r − g_j*
    exchange  while some (pick i, unused entry j) gives ‖r + g_i − g_j‖² < ‖r‖²: swap the best such pair

The pool is drawn once per step and shared by all parts (one per-sample pass and one Gram matrix per step),
filtered per part to D \\ D_k minus the batch.

Models without BatchNorm (the hook path, `rayforge.forge.fastgrad`): the batch's per-sample factors come from the
original training step itself (`GroupedGradients.training_step`, the same gradient bits), the pool's from one
forward+backward, the Gram matrix by ghost products (per-sample gradients of large layers are never formed), and
`grad_error` is exact from the per-sample sums: ‖Σ_S g_j − Σ_R g_i‖/b is the batch-gradient difference (no second
batch-gradient pass). BatchNorm models: per-sample gradients (taken in eval mode) do not add up to the batch
gradient, so `SHORTLIST` greedy variants (different first picks) are re-ranked by their exact batch gradients.

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
EXCHANGE_ROUNDS = 4  # exchange passes allowed per pick (each pass takes the single best exchange)


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


# ------------------------------------------------------------------------------------------ matching on a Gram

def greedy_picks(gram: np.ndarray, dots: np.ndarray, r_sq: float, points: np.ndarray, count: int,
                 first: int | None = None) -> tuple[list[int], float]:
    """Rows of the pool chosen greedily to cancel a residual r, from the pool's Gram matrix `gram` (P, P),
    `dots` = g_j·r (P,) and r_sq = ‖r‖² (float64 NumPy: small arrays, many steps); a point is used once (either
    orientation). `first` forces the first pick (shortlist variants). Returns the picks and ‖r − Σ picks‖²."""
    norms = np.diagonal(gram)
    cost = norms - 2 * dots  # ‖r − g_j‖² − ‖r‖²
    picks = []
    for i in range(min(count, len(np.unique(points)))):
        j = first if (i == 0 and first is not None) else int(np.argmin(cost))
        picks.append(j)
        r_sq += float(cost[j])
        cost = cost + 2 * gram[:, j]  # r ← r − g_j
        cost[points == points[j]] = np.inf
    return picks, r_sq


def exchange_picks(gram: np.ndarray, dots: np.ndarray, r_sq: float, points: np.ndarray, picks: list[int],
                   rounds: int) -> tuple[list[int], float]:
    """Local search after the greedy: repeatedly swap the (pick i, unused entry j) pair that most reduces
    ‖r + g_i − g_j‖² = ‖r‖² + ‖g_i‖² + ‖g_j‖² − 2 g_i·g_j + 2 r·g_i − 2 r·g_j (r the residual after the picks;
    `dots` and `r_sq` here are those of the ORIGINAL residual, as for `greedy_picks`). At most `rounds` swaps;
    returns the picks and ‖r − Σ picks‖²."""
    picks = list(picks)
    if not picks:
        return picks, r_sq
    norms = np.diagonal(gram)
    sel = np.asarray(picks)
    r_sq = r_sq - 2 * float(dots[sel].sum()) + float(gram[np.ix_(sel, sel)].sum())
    dots = dots - gram[:, sel].sum(1)  # g·(r − Σ picks)
    for _ in range(rounds):
        sel = np.asarray(picks)
        unused = ~np.isin(points, points[sel])  # entries whose point no pick uses
        valid = unused[None, :] | (points[None, :] == points[sel][:, None])  # or pick i's other orientation
        valid[:, sel] = False
        cost = (norms[sel, None] + 2 * dots[sel, None]) + (norms - 2 * dots)[None, :] - 2 * gram[sel]
        cost[~valid] = np.inf
        i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
        gain = float(cost[i, j])
        if not gain < -1e-12 * max(r_sq, 1e-300):  # no exchange improves (beyond rounding): a local optimum
            break
        r_sq += gain
        dots = dots + gram[:, picks[i]] - gram[:, j]
        picks[i] = int(j)
    return picks, r_sq


def match(gram: torch.Tensor, dots: torch.Tensor, r_sq: float, points: np.ndarray, count: int,
          first: int | None = None) -> list[int]:
    """Greedy picks, then exchanges (`EXCHANGE_ROUNDS` per pick at most)."""
    picks, _ = greedy_picks(gram, dots, r_sq, points, count, first)
    picks, _ = exchange_picks(gram, dots, r_sq, points, picks, EXCHANGE_ROUNDS * count)
    return picks


# ------------------------------------------------------------------------------------------------- the pool

def draw_pool(ctx, step: int) -> np.ndarray:
    """The step's pool of candidate substitutes, shared by all parts (seeded by (seed, step))."""
    rng = np.random.default_rng([ctx.seed, POOL_STREAM, step])
    size = min(ctx.params.pool_size, len(ctx.data))
    return np.sort(rng.choice(len(ctx.data), size=size, replace=False))


def with_flips(points: np.ndarray, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pool entries: each point, and with flips also its mirror image."""
    if not flip:
        return points, np.zeros(len(points), bool)
    return np.concatenate([points, points]), np.concatenate([np.zeros(len(points), bool), np.ones(len(points), bool)])


def top_up(ctx, step: int, part: int, allowed: np.ndarray, taken: np.ndarray, short: int):
    """A small pool left too few allowed points: extra entries from D \\ D_k, seeded per (step, part)."""
    spare = np.setdiff1d(allowed, taken)
    extra = np.sort(np.random.default_rng([ctx.seed, POOL_STREAM, step, part]).choice(
        spare, size=min(short, len(spare)), replace=False))
    return with_flips(extra, ctx.flip)


def _replaced(batch, flips, remove, idx, fl):
    new_batch, new_flips = batch.copy(), flips.copy()
    slots = np.flatnonzero(remove)[:len(idx)]
    new_batch[slots], new_flips[slots] = idx, fl
    return new_batch, new_flips


# ----------------------------------------------------------------------------------------------- the strategy

def forge_parts(ctx, params: dict[str, torch.Tensor], step: int, parts: list[int], target: torch.Tensor,
                point_parts: np.ndarray, records=None) -> list[ForgedBatch]:
    """Strategy `swap` at one step, every part in `parts`. `records`: the original step's per-sample factors
    (hook path), else None (BatchNorm models)."""
    batch = np.asarray(ctx.steps.batch[step], dtype=np.int64)
    flips = np.asarray(ctx.steps.flip[step], dtype=bool)
    pool = draw_pool(ctx, step)
    pool_idx, pool_flips = with_flips(pool[~np.isin(pool, batch)], ctx.flip)
    if records is not None:
        out = _forge_parts_factored(ctx, params, step, parts, point_parts, records, batch, flips, pool_idx,
                                    pool_flips)
        charged = len(pool_idx) / len(batch)  # the batch's factors came with the training step
    else:
        out = _forge_parts_materialised(ctx, params, step, parts, target, point_parts, batch, flips, pool_idx,
                                        pool_flips)
        charged = (len(batch) + len(pool_idx)) / len(batch)
    # The shared per-sample pass, in minibatch units, is charged to the step's first part.
    if out:
        out[0] = dataclasses.replace(out[0], grad_evals=out[0].grad_evals + charged)
    return out


def _forge_parts_factored(ctx, params, step, parts, point_parts, records, batch, flips, pool_idx, pool_flips):
    """Hook path: Gram by ghost products, exact grad_error from per-sample sums."""
    b = len(batch)
    x, y = ctx.data.batch(pool_idx, pool_flips)
    passes = [records, ctx.grads.records(params, x, y, 1.0 / b)]  # both in units of the mean loss: g/b
    samples = ctx.grads.sample_gradients(passes, params)
    gram = samples.gram().double().cpu().numpy()
    out = []
    for k in parts:
        allowed = ctx.allowed_points(point_parts, k)
        remove = ~np.isin(batch, allowed)  # B_t ∩ D_k (and content twins of D_k)
        if not remove.any():
            out.append(ForgedBatch(batch.astype(np.int32), flips.copy(), 0.0, 0))  # nothing of D_k in B_t
            continue
        ok = np.flatnonzero(np.isin(pool_idx, allowed))
        cand_idx, cand_flips, k_samples, k_gram, cand = pool_idx[ok], pool_flips[ok], samples, gram, ok + b
        short = int(remove.sum()) - len(np.unique(cand_idx))
        if short > 0:
            e_idx, e_flips = top_up(ctx, step, k, allowed, np.concatenate([batch, cand_idx]), short)
            ex, ey = ctx.data.batch(e_idx, e_flips)
            k_samples = ctx.grads.sample_gradients(passes + [ctx.grads.records(params, ex, ey, 1.0 / b)], params)
            k_gram = k_samples.gram().double().cpu().numpy()
            cand = np.concatenate([cand, b + len(pool_idx) + np.arange(len(e_idx))])
            cand_idx, cand_flips = np.concatenate([cand_idx, e_idx]), np.concatenate([cand_flips, e_flips])
        out.append(_swap_factored(k_samples, k_gram, batch, flips, remove, cand, cand_idx, cand_flips))
    return out


def _swap_factored(samples, gram, batch, flips, remove, cand, cand_idx, cand_flips) -> ForgedBatch:
    count = int(remove.sum())
    if len(np.unique(cand_idx)) < count:
        raise RayforgeError(f"swap: D \\ D_k has fewer than the {count} points needed to replace B_t ∩ D_k")
    removed = np.flatnonzero(remove)
    picks = match(gram[np.ix_(cand, cand)], gram[np.ix_(cand, removed)].sum(1),
                  float(gram[np.ix_(removed, removed)].sum()), cand_idx, count)
    sums = samples.sums(torch.as_tensor(np.stack([cand[picks], removed])))  # exact: Σ_S g/b and Σ_R g/b
    error = float(torch.linalg.vector_norm(sums[0] - sums[1]))
    new_batch, new_flips = _replaced(batch, flips, remove, cand_idx[picks], cand_flips[picks])
    return ForgedBatch(new_batch.astype(np.int32), new_flips, error, 0)


def _forge_parts_materialised(ctx, params, step, parts, target, point_parts, batch, flips, pool_idx, pool_flips):
    """BatchNorm models: eval-mode per-sample gradients, shortlist variants re-ranked by exact batch gradients."""
    x, y = ctx.data.batch(np.concatenate([batch, pool_idx]), np.concatenate([flips, pool_flips]))
    grads = per_sample(ctx.swap_model, params, x, y, ctx.swap_cache)
    gram = (grads @ grads.T).double().cpu().numpy()  # one matrix product per step serves every part's picks
    b, out = len(batch), []
    for k in parts:
        allowed = ctx.allowed_points(point_parts, k)
        remove = ~np.isin(batch, allowed)
        if not remove.any():
            out.append(ForgedBatch(batch.astype(np.int32), flips.copy(), 0.0, 0))
            continue
        ok = np.flatnonzero(np.isin(pool_idx, allowed))
        cand_idx, cand_flips, k_grads, cand = pool_idx[ok], pool_flips[ok], grads, ok + b
        k_gram = gram
        short = int(remove.sum()) - len(np.unique(cand_idx))
        if short > 0:
            e_idx, e_flips = top_up(ctx, step, k, allowed, np.concatenate([batch, cand_idx]), short)
            k_grads = torch.cat([grads, per_sample(ctx.swap_model, params, *ctx.data.batch(e_idx, e_flips),
                                                   ctx.swap_cache)])
            k_gram = (k_grads @ k_grads.T).double().cpu().numpy()
            cand = np.concatenate([cand, len(grads) + np.arange(len(e_idx))])
            cand_idx, cand_flips = np.concatenate([cand_idx, e_idx]), np.concatenate([cand_flips, e_flips])
        out.append(_swap_shortlisted(ctx, params, target, k_gram, batch, flips, remove, cand, cand_idx, cand_flips))
    return out


def _swap_shortlisted(ctx, params, target, gram, batch, flips, remove, cand, cand_idx, cand_flips) -> ForgedBatch:
    count = int(remove.sum())
    if len(np.unique(cand_idx)) < count:
        raise RayforgeError(f"swap: D \\ D_k has fewer than the {count} points needed to replace B_t ∩ D_k")
    removed = np.flatnonzero(remove)
    pool_gram, dots = gram[np.ix_(cand, cand)], gram[np.ix_(cand, removed)].sum(1)
    r_sq = float(gram[np.ix_(removed, removed)].sum())
    starts = [int(j) for j in np.argsort(np.diagonal(pool_gram) - 2 * dots, kind="stable")[:SHORTLIST]]
    variants = [_replaced(batch, flips, remove, cand_idx[p], cand_flips[p])
                for p in (match(pool_gram, dots, r_sq, cand_idx, count, first) for first in starts)]
    idx = np.stack([v[0] for v in variants]).astype(np.int64)
    fl = np.stack([v[1] for v in variants])
    dist = ctx.grads.distances(params, ctx.data, idx, fl, target)
    best = int(torch.argmin(dist))
    return ForgedBatch(idx[best].astype(np.int32), fl[best].copy(), float(dist[best]), len(variants))


def forge_parts_hybrid(ctx, params, step: int, parts: list[int], target, point_parts,
                       records=None) -> list[ForgedBatch]:
    """Strategy `hybrid`: per part, the better of the paper's best-of-μ and the swap batch."""
    paper = algorithm2.forge_parts(ctx, params, step, parts, target, point_parts)
    swap = forge_parts(ctx, params, step, parts, target, point_parts, records)
    return [dataclasses.replace(s if s.grad_error <= p.grad_error else p, grad_evals=p.grad_evals + s.grad_evals)
            for p, s in zip(paper, swap)]
