"""Replay the log between two checkpoints and compare with the stored one (what a PoL verifier does)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rayforge.errors import RayforgeError
from rayforge.train.batches import TensorData
from rayforge.train.log import Steps, check_state, ckpt_name, read_checkpoint, state_tensors
from rayforge.train.run import TrainingRun, hyper_of, set_determinism
from rayforge.train.sgd import SGDHyper, loss_and_grads, sgd_update, train_step


def walk_trajectory(run: TrainingRun, data: TensorData, start: int, stop: int, device: torch.device):
    """Walk the original log from checkpoint `start` to step `stop`: yield (t, model, grads) with the model at θ_t
    and `grads` its logged minibatch gradient there; step t's update is applied once the consumer resumes.
    After the last step the model holds θ_stop (checked against the log by the caller where it matters)."""
    model, velocity = run.model_at(start, device)
    hyper = hyper_of(run.cfg)
    for t in range(start, stop):
        x, y = data.batch(run.steps.batch[t], run.steps.flip[t])
        _, grads = loss_and_grads(model, x, y)
        yield t, model, grads
        sgd_update(model, grads, velocity, float(run.steps.lr[t]), hyper)


def replay_steps(model: nn.Module, velocity: dict[str, torch.Tensor], data: TensorData, steps: Steps,
                 start: int, stop: int, hyper: SGDHyper) -> None:
    """Apply logged steps start..stop-1 in place."""
    for t in range(start, stop):
        x, y = data.batch(steps.batch[t], steps.flip[t])
        train_step(model, velocity, x, y, float(steps.lr[t]), hyper)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over all tensors both states hold (parameters, buffers, velocity)."""
    worst = 0.0
    for key, ta in a.items():
        diff = (ta.double() - b[key].double()).abs().max() if ta.numel() else torch.tensor(0.0)
        worst = max(worst, float(diff))
    return worst


@dataclass(frozen=True)
class ReplayResult:
    start: int
    stop: int
    max_abs_diff: float

    @property
    def exact(self) -> bool:
        return self.max_abs_diff == 0.0


def replay(run: TrainingRun, start: int, stop: int, threads: int | None = None) -> ReplayResult:
    if not (start < stop):
        raise RayforgeError(f"--from ({start}) must be before --to ({stop})")
    for s in (start, stop):
        if s not in run.checkpoints:
            raise RayforgeError(f"no checkpoint at step {s}; checkpoints are at {run.checkpoints}")
    set_determinism(threads or run.cfg.train.threads)
    device = run.device()
    data = run.tensor_data(run.load_dataset(), device)
    model, velocity = run.model_at(start, device)
    replay_steps(model, velocity, data, run.steps, start, stop, hyper_of(run.cfg))
    path = run.traj_dir / ckpt_name(stop)
    stored = read_checkpoint(path)
    check_state(stored, model, str(path), need_velocity=bool(run.cfg.train.momentum))
    ours = state_tensors(model, velocity if run.cfg.train.momentum else None)
    return ReplayResult(start, stop, max_abs_diff(ours, stored))
