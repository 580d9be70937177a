"""Phase 2 as plain functions: replay the forged log of each group and measure d_θ against the original model.

The forged trajectory equals the original one until the group's first appearance, so a rebuild starts from the
last checkpoint before it. Two replays:
  * sequential: one model at a time through `rayforge.train.sgd` — bit-identical to a plain replay of the forged
    log (what `rayforge verify` does), so it is what the PoR export uses;
  * batched: several groups' models stacked and stepped together with torch.func (vmap over models), for models
    without BatchNorm (in-place running-statistics updates cannot be vmapped; those fall back to sequential).
    Same arithmetic in another kernel order: equal to the sequential replay up to float rounding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from rayforge.rebuild.forged_log import ForgedLogs, GroupLog
from rayforge.train.replay import replay_steps
from rayforge.train.run import TrainingRun, hyper_of, use_threads

DISTANCES_SCHEMA = pa.schema([
    ("group", pa.int64()),
    ("members", pa.list_(pa.int32())),
    ("d_theta", pa.float64()),
    ("first_step", pa.int64()),
    ("forged_steps", pa.int64()),
])


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def d_theta(params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The paper's metric: ‖θ* − θ'‖²₂ / dim(θ), parameters only (no BatchNorm statistics, no optimizer state)."""
    sq, dim = 0.0, 0
    for name, p in params.items():
        diff = p.detach().double().cpu() - reference[name].double()
        sq += float((diff * diff).sum())
        dim += p.numel()
    return sq / dim


@dataclass
class RebuildResult:
    row: dict
    model: nn.Module


def start_checkpoint(checkpoints: list[int], first_step: int) -> int:
    """Where a group's rebuild starts: the last checkpoint at or before its first forged step."""
    return max(c for c in checkpoints if c <= first_step)


class RebuildContext:
    """What a rebuild worker holds once: the log, the forged table, the training tensors and θ*. In a Ray worker
    the driver sends the forged logs and θ*'s checkpoint (`logs`, `final_state`) and, per unit, the checkpoints
    its groups start from (`states`); in-process they are read from the run."""

    def __init__(self, run: TrainingRun, strategy: str, threads: int | None = None, device: torch.device | None = None,
                 logs: ForgedLogs | None = None, final_state: dict | None = None):
        self.threads = use_threads(threads or run.threads)
        self.run = run
        self.device = device or run.device()
        self.logs = logs or ForgedLogs(run, strategy)
        self.data = run.tensor_data(run.load_dataset(), self.device)
        self.hyper = hyper_of(run.cfg)
        final = run.checkpoint(run.total_steps) if final_state is None else final_state
        final, _ = run.model_from_state(final, torch.device("cpu"), "the final checkpoint")
        self.theta_star = {k: v.detach().clone() for k, v in final.named_parameters()}
        self.states: dict[int, dict] = {}  # checkpoint tensors sent with the current unit

    def start_of(self, glog: GroupLog) -> int:
        return start_checkpoint(self.run.checkpoints, glog.first_step if glog.forged else self.run.total_steps)

    def model_at(self, step: int):
        """θ (model and momentum) at checkpoint `step`: as sent by the driver, else read from the run."""
        if step in self.states:
            return self.run.model_from_state(self.states[step], self.device, f"checkpoint {step}")
        return self.run.model_at(step, self.device)

    def row(self, glog: GroupLog, model: nn.Module) -> dict:
        return {"group": glog.group, "members": glog.members.astype(np.int32),
                "d_theta": d_theta(dict(model.named_parameters()), self.theta_star),
                "first_step": glog.first_step, "forged_steps": len(glog.forged)}


def rebuild_group(ctx: RebuildContext, group: int) -> RebuildResult:
    """Sequential rebuild of one group's forged model."""
    glog = ctx.logs.group_log(group)
    start = ctx.start_of(glog)
    model, velocity = ctx.model_at(start)
    replay_steps(model, velocity, ctx.data, glog.steps(ctx.run.steps), start, ctx.run.total_steps, ctx.hyper)
    return RebuildResult(ctx.row(glog, model), model)


def rebuild_groups_batched(ctx: RebuildContext, groups: list[int]) -> list[RebuildResult]:
    """Rebuild several groups at once with stacked parameters (models without BatchNorm)."""
    glogs = [ctx.logs.group_log(g) for g in groups]
    start = min(ctx.start_of(g) for g in glogs)
    template, velocity0 = ctx.model_at(start)
    if has_batchnorm(template) or len(groups) == 1:
        return [rebuild_group(ctx, g) for g in groups]
    names = [n for n, _ in template.named_parameters()]
    params = {n: p.detach().unsqueeze(0).repeat(len(groups), *[1] * p.dim()) for n, p in template.named_parameters()}
    velocity = {n: v.unsqueeze(0).repeat(len(groups), *[1] * v.dim()) for n, v in velocity0.items()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(template, p, (x,)), y)

    batched_grad = vmap(grad(loss), in_dims=(0, 0, 0))
    logs = [g.steps(ctx.run.steps) for g in glogs]
    hyper = ctx.hyper
    for t in range(start, ctx.run.total_steps):
        idx = np.stack([lg.batch[t] for lg in logs])
        flips = np.stack([lg.flip[t] for lg in logs])
        xs, ys = ctx.data.stacked(idx, flips)
        grads = batched_grad(params, xs, ys)
        lr = float(ctx.run.steps.lr[t])
        with torch.no_grad():  # the same update as rayforge.train.sgd.sgd_update, on stacked tensors
            for n in names:
                d = grads[n].add(params[n], alpha=hyper.weight_decay) if hyper.weight_decay else grads[n]
                if hyper.momentum:
                    velocity[n].mul_(hyper.momentum).add_(d)
                    d = velocity[n]
                params[n] = params[n].add(d, alpha=-lr)
    results = []
    for i, glog in enumerate(glogs):
        model = copy.deepcopy(template)  # buffers as at `start`: BatchNorm-free, so nothing else to carry
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n][i])
        results.append(RebuildResult(ctx.row(glog, model), model))
    return results


def distances_table(rows: list[dict]) -> pa.Table:
    return pa.table({
        "group": pa.array([r["group"] for r in rows], pa.int64()),
        "members": pa.array([r["members"] for r in rows], pa.list_(pa.int32())),
        "d_theta": pa.array([r["d_theta"] for r in rows], pa.float64()),
        "first_step": pa.array([r["first_step"] for r in rows], pa.int64()),
        "forged_steps": pa.array([r["forged_steps"] for r in rows], pa.int64()),
    }, schema=DISTANCES_SCHEMA)
