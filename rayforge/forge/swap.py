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
MORE_STREAM = 0x5A4C
SHORTLIST = 4  # greedy variants re-ranked exactly, BatchNorm models only
EXCHANGE_ROUNDS = 2  # exchanges allowed per removed point (each takes the single best exchange)
EXCHANGE_KEPT = True  # exchanges may also trade kept batch points


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
    ids, pid = np.unique(points, return_inverse=True)
    twins = len(ids) < len(points)  # a point in both orientations: a pick may trade for its own mirror image
    used = np.zeros(len(ids), bool)
    used[pid[sel]] = True
    rows = gram[sel]  # g_i·g_j for every pick i, kept up to date row by row
    for _ in range(rounds):
        left = norms[sel] + 2 * dots[sel]  # ‖g_i‖² + 2 r·g_i
        right = norms - 2 * dots  # ‖g_j‖² − 2 r·g_j
        cost = rows * -2.0
        cost += left[:, None]
        cost += np.where(used[pid], np.inf, right)[None, :]
        if twins:
            mirror = (pid[None, :] == pid[sel][:, None]) & (np.arange(len(points))[None, :] != sel[:, None])
            cost[mirror] = (left[:, None] + right[None, :] - 2 * rows)[mirror]
        i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
        gain = float(cost[i, j])
        if not gain < -1e-12 * max(r_sq, 1e-300):  # no exchange improves (beyond rounding): a local optimum
            break
        r_sq += gain
        dots += gram[:, sel[i]] - gram[:, j]
        used[pid[sel[i]]], used[pid[j]] = False, True
        sel[i], rows[i] = j, gram[j]
    picks = [int(j) for j in sel]
    return picks, r_sq


def match(gram: np.ndarray, removed: np.ndarray, kept: np.ndarray, cand: np.ndarray, points: np.ndarray,
          first: int | None = None) -> np.ndarray:
    """The sample rows of the forged batch. `gram` (N, N) is over all sample rows (the batch's, then the pool's),
    `points` the point of every row; `removed`/`kept` split the batch's rows, `cand` are the allowed pool rows.
    Greedy picks among `cand` replace `removed`; then exchanges swap any member, kept or picked, for an unused
    candidate (a kept point may leave for a better fit), at most EXCHANGE_ROUNDS per removed point."""
    pool_gram, dots, r_sq = gram[np.ix_(cand, cand)], gram[np.ix_(cand, removed)].sum(1), \
        float(gram[np.ix_(removed, removed)].sum())
    picks, _ = greedy_picks(pool_gram, dots, r_sq, points[cand], len(removed), first)
    if not EXCHANGE_KEPT:
        picks, _ = exchange_picks(pool_gram, dots, r_sq, points[cand], picks, EXCHANGE_ROUNDS * len(removed))
        return np.concatenate([kept, cand[picks]])
    entries, batch_rows = np.concatenate([kept, cand]), np.concatenate([kept, removed])
    members = list(range(len(kept))) + [len(kept) + p for p in picks]
    members, _ = exchange_picks(gram[np.ix_(entries, entries)], gram[np.ix_(entries, batch_rows)].sum(1),
                                float(gram[np.ix_(batch_rows, batch_rows)].sum()), points[entries], members,
                                EXCHANGE_ROUNDS * len(removed))
    return entries[members]


def forged_batch(batch: np.ndarray, flips: np.ndarray, rows: np.ndarray, points: np.ndarray,
                 row_flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The batch whose members are `rows`: batch rows still in it keep their slots, new rows fill the freed slots
    in order."""
    staying = np.isin(np.arange(len(batch)), rows)
    new_rows = rows[rows >= len(batch)]
    new_batch, new_flips = batch.copy(), flips.copy()
    slots = np.flatnonzero(~staying)
    new_batch[slots], new_flips[slots] = points[new_rows], row_flips[new_rows]
    return new_batch, new_flips


def greedy_rows(grads: torch.Tensor, points: np.ndarray, residual: torch.Tensor, count: int) -> list[int]:
    """`greedy_picks` on materialised per-sample gradients (the rows of `grads`) against `residual` (float64)."""
    g, r = grads.detach().double(), residual.detach().double()
    picks, _ = greedy_picks((g @ g.T).cpu().numpy(), (g @ r).cpu().numpy(), float(r @ r), np.asarray(points), count)
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


def draw_more(ctx, step: int, round_: int, taken: np.ndarray) -> np.ndarray:
    """Another `pool_size` substitutes for the step (adaptive pool), none already taken, seeded per (step, round)."""
    rng = np.random.default_rng([ctx.seed, MORE_STREAM, step, round_])
    spare = np.setdiff1d(np.arange(len(ctx.data)), taken)
    return np.sort(rng.choice(spare, size=min(ctx.params.pool_size, len(spare)), replace=False))


# ----------------------------------------------------------------------------------------------- the strategy

def forge_parts(ctx, params: dict[str, torch.Tensor], step: int, parts: list[int], target: torch.Tensor,
                point_parts: np.ndarray, records=None) -> list[ForgedBatch]:
    """Strategy `swap` at one step, every part in `parts`. `records`: the original step's per-sample factors
    (hook path), else None (BatchNorm models). On the hook path the pool adapts to the residual: parts whose
    grad_error is still above `pool_target`·‖grad‖ get another pool of `pool_size` entries, `pool_rounds` times at
    most (each part keeps its best batch)."""
    batch = np.asarray(ctx.steps.batch[step], dtype=np.int64)
    flips = np.asarray(ctx.steps.flip[step], dtype=bool)
    b = len(batch)
    pool = draw_pool(ctx, step)
    rows = Rows(batch, flips, b).extended(*with_flips(pool[~np.isin(pool, batch)], ctx.flip))
    if records is not None:  # the batch's factors came with the training step: only the pool's are charged
        passes = [records, _records(ctx, params, rows, b)]
        forge = _factored(ctx, params, list(passes))
    else:
        forge = _materialised(ctx, params, target, per_sample(ctx.swap_model, params, *ctx.data.batch(
            rows.points, rows.flips), ctx.swap_cache))
    charged = (len(rows.points) - (b if records is not None else 0)) / b
    allowed = {k: ctx.allowed_mask(point_parts, k) for k in parts}
    out = _forge_parts(ctx, step, parts, allowed, rows, forge)
    limit = ctx.params.pool_target * float(torch.linalg.vector_norm(target))
    for round_ in range(1, ctx.params.pool_rounds + 1 if records is not None else 1):
        hard = [k for k in parts if out[k].grad_error > limit]
        if not hard:
            break
        start = len(rows.points)
        rows = rows.extended(*with_flips(draw_more(ctx, step, round_, rows.points), ctx.flip))
        passes.append(_records(ctx, params, rows, start))
        forge = _factored(ctx, params, list(passes))
        charged += (len(rows.points) - start) / b
        for k, again in _forge_parts(ctx, step, hard, allowed, rows, forge).items():
            out[k] = again if again.grad_error < out[k].grad_error else out[k]
    out = [out[k] for k in parts]
    # The shared per-sample passes, in minibatch units, are charged to the step's first part.
    if out:
        out[0] = dataclasses.replace(out[0], grad_evals=out[0].grad_evals + charged)
    return out


def _forge_parts(ctx, step: int, parts: list[int], allowed: dict, rows: "Rows", forge) -> dict[int, ForgedBatch]:
    """Every part's forged batch; `forge` takes the parts that hold members of their D_k all at once."""
    jobs = {k: _part_job(ctx, step, k, allowed[k], rows) for k in parts}
    pending = [k for k in parts if not isinstance(jobs[k], ForgedBatch)]
    return {**jobs, **dict(zip(pending, forge([jobs[k] for k in pending])))}


def _part_job(ctx, step: int, k: int, allowed: np.ndarray, rows: "Rows"):
    """B_t itself when it holds nothing of D_k, else what `forge` needs: (rows, remove, cand). `allowed`: mask
    over D of what part k may use."""
    batch, flips = rows.points[:rows.b], rows.flips[:rows.b]
    remove = ~allowed[batch]  # B_t ∩ D_k (and content twins of D_k)
    if not remove.any():
        return ForgedBatch(batch.astype(np.int32), flips.copy(), 0.0, 0)  # nothing of D_k in B_t: B_t itself
    cand = rows.b + np.flatnonzero(allowed[rows.points[rows.b:]])
    short = int(remove.sum()) - len(np.unique(rows.points[cand]))
    if short > 0:  # a small pool left too few allowed points: top it up from D \ D_k, seeded per (step, part)
        extra = top_up(ctx, step, k, np.flatnonzero(allowed), np.concatenate([batch, rows.points[cand]]), short)
        return rows.extended(*extra), remove, np.concatenate([cand, len(rows.points) + np.arange(len(extra[0]))])
    return rows, remove, cand


@dataclasses.dataclass(frozen=True)
class Rows:
    """The samples of a step's per-sample pass: the batch's b rows, then the pool's (then a part's top-up)."""

    points: np.ndarray
    flips: np.ndarray
    b: int

    def extended(self, points, flips) -> "Rows":
        return Rows(np.concatenate([self.points, points]), np.concatenate([self.flips, flips]), self.b)

    def check(self, remove: np.ndarray, cand: np.ndarray) -> None:
        count = int(remove.sum())
        if len(np.unique(self.points[cand])) < count:
            raise RayforgeError(f"swap: D \\ D_k has fewer than the {count} points needed to replace B_t ∩ D_k")

    def batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The forged batch whose members are `rows`."""
        return forged_batch(self.points[:self.b], self.flips[:self.b], rows, self.points, self.flips)


def _records(ctx, params, rows: Rows, start: int):
    """Recorded pass over rows[start:], in units of the mean loss (g/b, as the training step's)."""
    x, y = ctx.data.batch(rows.points[start:], rows.flips[start:])
    return ctx.grads.records(params, x, y, 1.0 / rows.b)


def _factored(ctx, params, passes: list):
    """Hook path: Gram by ghost products, exact grad_error from per-sample sums: ‖Σ_forged g − Σ_B g‖/b, for all
    parts of the step in one batched sum per layer."""
    samples = ctx.grads.sample_gradients(passes, params)
    gram_t = samples.gram()
    gram = gram_t.double().cpu().numpy()

    def forge(jobs: list) -> list[ForgedBatch]:
        picked = []  # (rows, members, the samples they index)
        for rows, remove, cand in jobs:
            rows.check(remove, cand)
            k_samples, k_gram = samples, gram
            if len(rows.points) > samples.n:  # a top-up: its samples too
                k_samples = ctx.grads.sample_gradients(passes + [_records(ctx, params, rows, samples.n)], params)
                k_gram = k_samples.gram().double().cpu().numpy()
            picked.append((rows, match(k_gram, np.flatnonzero(remove), np.flatnonzero(~remove), cand, rows.points),
                           k_samples))
        errors = _change_norms(picked, gram_t.device, gram_t.dtype)
        return [ForgedBatch(*_as_batch(rows, members), err, 0) for (rows, members, _), err in zip(picked, errors)]

    return forge


def _change_norms(picked: list, device, dtype) -> list[float]:
    """‖Σ_came g − Σ_left g‖ of each forged batch (the rows that came in minus the batch rows that left), one
    `combinations` call per set of samples (the step's, or a part's own after a top-up)."""
    errors: list[float | None] = [None] * len(picked)
    by_samples: dict[int, list[int]] = {}
    for i, (_, _, k_samples) in enumerate(picked):
        by_samples.setdefault(id(k_samples), []).append(i)
    for members in by_samples.values():
        changes = []
        for i in members:
            rows, kept, _ = picked[i]
            came = kept[kept >= rows.b]  # the forged batch differs from B_t by these rows only
            left = np.setdiff1d(np.arange(rows.b), kept)
            changes.append((np.concatenate([came, left]), np.concatenate([np.ones(len(came)), -np.ones(len(left))])))
        width = max(len(r) for r, _ in changes)
        idx = np.zeros((len(changes), width), np.int64)
        w = np.zeros((len(changes), width))
        for j, (r, wt) in enumerate(changes):
            idx[j, :len(r)], w[j, :len(r)] = r, wt
        diff = picked[members[0]][2].combinations(torch.as_tensor(idx, device=device),
                                                   torch.as_tensor(w, dtype=dtype, device=device))
        for i, e in zip(members, torch.linalg.vector_norm(diff, dim=1).tolist()):
            errors[i] = e
    return errors


def _as_batch(rows: "Rows", members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    new_batch, new_flips = rows.batch(members)
    return new_batch.astype(np.int32), new_flips


def _materialised(ctx, params, target, grads):
    """BatchNorm models: eval-mode per-sample gradients (which do not add up to the batch gradient), so SHORTLIST
    variants (different first picks) are re-ranked by their exact batch gradients."""
    gram = (grads @ grads.T).double().cpu().numpy()  # one matrix product per step serves every part's picks

    def forge(jobs: list) -> list[ForgedBatch]:
        return [forge_one(*job) for job in jobs]

    def forge_one(rows: Rows, remove: np.ndarray, cand: np.ndarray) -> ForgedBatch:
        rows.check(remove, cand)
        k_gram = gram
        if len(rows.points) > len(grads):  # a top-up: its per-sample gradients too
            extra = per_sample(ctx.swap_model, params, *ctx.data.batch(rows.points[len(grads):],
                                                                       rows.flips[len(grads):]), ctx.swap_cache)
            full = torch.cat([grads, extra])
            k_gram = (full @ full.T).double().cpu().numpy()
        removed, kept = np.flatnonzero(remove), np.flatnonzero(~remove)
        first_cost = np.diagonal(k_gram)[cand] - 2 * k_gram[np.ix_(cand, removed)].sum(1)
        starts = [int(j) for j in np.argsort(first_cost, kind="stable")[:SHORTLIST]]
        variants = [rows.batch(match(k_gram, removed, kept, cand, rows.points, first)) for first in starts]
        idx = np.stack([v[0] for v in variants]).astype(np.int64)
        fl = np.stack([v[1] for v in variants])
        dist = ctx.grads.distances(params, ctx.data, idx, fl, target)
        best = int(torch.argmin(dist))
        return ForgedBatch(idx[best].astype(np.int32), fl[best].copy(), float(dist[best]), len(variants))

    return forge


def forge_parts_hybrid(ctx, params, step: int, parts: list[int], target, point_parts,
                       records=None) -> list[ForgedBatch]:
    """Strategy `hybrid`: per part, the better of the paper's best-of-μ and the swap batch."""
    paper = algorithm2.forge_parts(ctx, params, step, parts, target, point_parts)
    swap = forge_parts(ctx, params, step, parts, target, point_parts, records)
    return [dataclasses.replace(s if s.grad_error <= p.grad_error else p, grad_evals=p.grad_evals + s.grad_evals)
            for p, s in zip(paper, swap)]
