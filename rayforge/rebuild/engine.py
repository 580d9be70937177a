"""Phase 2 as plain functions: replay the forged log of each group and measure d_θ against the original model.

The forged trajectory equals the original one until the group's first appearance, so a rebuild starts from the
last checkpoint before it. Two replays:
  * sequential: one model at a time through `rayforge.train.sgd` — bit-identical to a plain replay of the forged
    log (what `rayforge verify` does), so it is what the PoR export uses;
  * batched: several groups' models side by side as one wide model (grouped convolutions, batched matrix
    products, BatchNorm over K·C channels: `rayforge.rebuild.stacked`), stepped by the same SGD update. Same
    arithmetic in another kernel order: equal to the sequential replay up to float rounding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from rayforge.rebuild.forged_log import ForgedLogs, GroupLog
from rayforge.rebuild.stacked import NotStackable, WideModel, check, wide_inputs, wide_loss
from rayforge.train.replay import replay_steps
from rayforge.train.run import TrainingRun, hyper_of, use_threads
from rayforge.train.sgd import sgd_update

# The wide model's activation layout, measured on CPU (benchmarks/rebuild_throughput.py): channels-last
# convolutions are faster for the small channel counts of stacked LeNet5s.
WIDE_MEMORY_FORMAT = torch.channels_last

DISTANCES_SCHEMA = pa.schema([
    ("group", pa.int64()),
    ("members", pa.list_(pa.int32())),
    ("d_theta", pa.float64()),
    ("first_step", pa.int64()),
    ("forged_steps", pa.int64()),
])


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
    steps: int  # SGD steps replayed for this model


# The replay a worker runs when asked for "auto", per device type. CPU: measured by
# benchmarks/rebuild_throughput.py (README, "Measured figures"): the wide model gains 1.01x (ResNet-mini, BatchNorm)
# and 1.02x (LeNet5, b=100) to 1.2-1.4x (LeNet5, b=32, K=8) per worker, because on CPU the kernels, not launches, are
# the cost (`--profile`): stacked convolutions take 0.72-0.78x the time per model step of separate ones, tanh the
# same time (~18% of a batched step); too little to give up the sequential replay's bit-identity with `verify`.
# CUDA: the wide model, whose one launch per layer serves K models (benchmarks/gpu.py measures it where a GPU is).
DEFAULT_METHOD = {"cpu": "sequential", "cuda": "batched"}


def resolve_method(method: str, device: torch.device) -> str:
    return DEFAULT_METHOD.get(device.type, "sequential") if method == "auto" else method


def rebuild_unit(ctx: "RebuildContext", groups: list[int], method: str) -> list[RebuildResult]:
    """The forged models of `groups`, replayed by `method` (auto | sequential | batched)."""
    if resolve_method(method, ctx.device) == "batched":
        return rebuild_groups_batched(ctx, groups)
    return [rebuild_group(ctx, g) for g in groups]


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
    return RebuildResult(ctx.row(glog, model), model, ctx.run.total_steps - start)


def rebuild_groups_batched(ctx: RebuildContext, groups: list[int]) -> list[RebuildResult]:
    """Rebuild several groups at once as one wide model (`rayforge.rebuild.stacked`); sequentially when the model
    cannot be stacked."""
    glogs = [ctx.logs.group_log(g) for g in groups]
    start = min(ctx.start_of(g) for g in glogs)
    template, velocity0 = ctx.model_at(start)
    logs = [g.steps(ctx.run.steps) for g in glogs]
    k = len(groups)

    def batches(t):
        return np.stack([lg.batch[t] for lg in logs]), np.stack([lg.flip[t] for lg in logs])

    try:
        wide = WideModel([template] * k, WIDE_MEMORY_FORMAT)
        check([template] * k, wide, ctx.data, *batches(start))
    except NotStackable:
        return [rebuild_group(ctx, g) for g in groups]
    velocity = dict(WideModel([_with_params(template, velocity0)] * k).named_parameters())  # laid out alike
    params = [p for _, p in wide.named_parameters()]
    wide.train()
    for t in range(start, ctx.run.total_steps):
        x, ys = wide_inputs(ctx.data, *batches(t), wide.memory_format)
        grads = torch.autograd.grad(wide_loss(wide(x), ys), params)
        sgd_update(wide, grads, velocity, float(ctx.run.steps.lr[t]), ctx.hyper)
    models = [copy.deepcopy(template) for _ in groups]
    wide.unstack_into(models)
    return [RebuildResult(ctx.row(glog, model), model, ctx.run.total_steps - start)
            for glog, model in zip(glogs, models)]


def _with_params(model: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` whose parameters hold `values` (e.g. momentum buffers, to stack them alike)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(values[name])
    return out


def distances_table(rows: list[dict]) -> pa.Table:
    return pa.table({
        "group": pa.array([r["group"] for r in rows], pa.int64()),
        "members": pa.array([r["members"] for r in rows], pa.list_(pa.int32())),
        "d_theta": pa.array([r["d_theta"] for r in rows], pa.float64()),
        "first_step": pa.array([r["first_step"] for r in rows], pa.int64()),
        "forged_steps": pa.array([r["forged_steps"] for r in rows], pa.int64()),
    }, schema=DISTANCES_SCHEMA)
