"""Algorithm 1 (Thudi et al.'s forging, the paper's baseline): a forged log for ONE point x*.

    for t = 1..τ:  D_sub ⊂ D \\ {x*};  μ minibatches from D_sub;  keep the one whose gradient at θ^(t) is closest
                   to the original minibatch's gradient.

Forging all n points this way costs n·μ·τ gradients against Algorithm 2's κ·μ·τ; `benchmarks/forge_cost.py`
measures that speed-up on the same points. Flips and the modified SGD are handled as in Algorithm 3.
"""

from __future__ import annotations

import numpy as np
import torch

from rayforge.forge.algorithm2 import best_of_candidates, draw_candidates
from rayforge.forge.engine import FORGED_SCHEMA
from rayforge.forge.fastgrad import make_gradient_evaluator
from rayforge.forge.gradients import flatten
from rayforge.forge.twins import Twins
from rayforge.errors import RayforgeError
from rayforge.train.run import TrainingRun, hyper_of, set_determinism
from rayforge.train.sgd import loss_and_grads, sgd_update

NAIVE_STREAM = 0xA161


def forge_point_naive(run: TrainingRun, point: int, mu: int, seed: int, steps: range | None = None,
                      chunk: int = 8, threads: int = 1, data=None, grad_method: str = "auto") -> dict:
    """Forged minibatches for `point` at each step of `steps` (default: all), as columns of the forged schema
    (part is 0) plus the number of gradient evaluations spent. `data` may pass preloaded training tensors."""
    n = int(run.info["n"])
    if not 0 <= point < n:
        raise RayforgeError(f"point {point} is outside the training set [0, {n})")
    steps = steps or range(run.total_steps)
    start = max(c for c in run.checkpoints if c <= steps.start)
    set_determinism(threads)
    torch.set_num_threads(threads)
    device = run.device()
    data = data or run.tensor_data(run.load_dataset(), device)
    model, velocity = run.model_at(start, device)
    hyper = hyper_of(run.cfg)
    grads = make_gradient_evaluator(model, chunk, grad_method)
    excluded = np.zeros(n, dtype=bool)
    excluded[point] = True
    allowed = Twins(run.load_dataset().train, run.cfg.data.flip).allowed(np.flatnonzero(~excluded), excluded)  # D \ {x*}
    cols = {name: [] for name in FORGED_SCHEMA.names}
    for t in range(start, steps.stop):
        x, y = data.batch(run.steps.batch[t], run.steps.flip[t])
        _, g = loss_and_grads(model, x, y)
        if t >= steps.start:
            target = flatten(g)
            params = dict(model.named_parameters())
            rng = np.random.default_rng([seed, NAIVE_STREAM, point, t])
            idx, flips = draw_candidates(rng, allowed, mu, len(run.steps.batch[t]), run.cfg.data.flip)
            [forged] = best_of_candidates(grads, params, data, target, [idx], [flips])
            with torch.no_grad():
                full = target + hyper.weight_decay * flatten(params.values()) if hyper.weight_decay else target
            for name, value in (("step", t), ("part", 0), ("batch", forged.batch), ("flip", forged.flip),
                                ("grad_error", forged.grad_error),
                                ("grad_norm", float(torch.linalg.vector_norm(full)))):
                cols[name].append(value)
        sgd_update(model, g, velocity, float(run.steps.lr[t]), hyper)
    return {"columns": cols, "grad_evals": grads.evaluations + (steps.stop - start)}

