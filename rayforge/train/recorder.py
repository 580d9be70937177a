"""`Recorder`: write a rayforge training log (the Proof-of-Learning) from your own PyTorch training loop.

    rec = Recorder("runs/own", model="lenet5", data={"dataset": "mnist", "subset": 1000},
                   optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
                   scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=30),
                   epochs=3, batch_size=100, seed=0)
    with rec:
        for epoch in range(3):
            order = rng.permutation(rec.n)
            for start in range(0, rec.n, 100):
                idx = order[start:start + 100]
                x, y = rec.batch(idx)                       # the exact tensors a replay will use
                rec.optimizer.zero_grad()
                F.cross_entropy(rec.model(x), y).backward()
                rec.step(idx)                               # after backward(), before optimizer.step()
                rec.optimizer.step()
                rec.scheduler.step()

The recorder builds the model (from the registry or `module:callable`, seeded like `rayforge train`, so
checkpoint 0 is the initialisation a verifier expects), the optimizer and scheduler from the factories you pass,
and the data (normalised exactly as every later stage sees it). `step(indices, flips)` logs the batch, its flips
and the learning rate the coming `optimizer.step()` uses, and writes the checkpoints. It checks, so that the log
replays bit for bit (`rayforge replay`):
  * every update: the parameters after `optimizer.step()` equal plain SGD (`rayforge.train.sgd`: momentum,
    weight decay, dampening 0, no Nesterov) applied to the gradient it saw;
  * every `check_every` steps: that gradient is rayforge's mean cross-entropy gradient of the logged batch;
  * batch sizes (each epoch of ceil(n / batch_size) batches, the last one smaller), unique indices, flips only
    when `data.flip`, and a constant or cosine (CosineAnnealingLR over all steps, eta_min 0) learning rate,
    because that is what a PoR's verifier declares and checks.
The log is written into a temporary sibling of the run directory and renamed into place when the context exits
cleanly (or on `close()`); an exception leaves nothing behind. Like `rayforge train`, the recorder fixes torch's
thread count (the log records it) and turns on deterministic algorithms for the process.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rayforge.config import Config, DataConfig, config_from_dict, dump_config, validate
from rayforge.data import build_dataset, dataset_info
from rayforge.errors import RayforgeError
from rayforge.io import (atomic_write_bytes, atomic_write_json, check_fresh_dir, save_tensors, staged_dir,
                         write_parquet)
from rayforge.train.batches import TensorData, accuracy
from rayforge.train.log import CKPT_FORMAT, ckpt_name, state_tensors, steps_table
from rayforge.train.run import new_model, resolve_device, set_determinism
from rayforge.train.schedule import checkpoint_steps, learning_rates, steps_per_epoch
from rayforge.train.sgd import SGDHyper, loss_and_grads, sgd_update

LR_RTOL = 1e-12  # the verifier's tolerance for a cosine schedule (rayforge.por.verify)


class Recorder:
    """Records a training log from a hand-written loop; see the module docstring for the loop it expects."""

    def __init__(self, run_dir: str | Path, model: str, data: DataConfig | dict,
                 optimizer: Callable[..., torch.optim.Optimizer], *, epochs: int, batch_size: int,
                 scheduler: Callable[[torch.optim.Optimizer], object] | None = None, seed: int = 0,
                 checkpoint_every: int | None = None, threads: int | None = None, device: str = "cpu",
                 name: str | None = None, check_every: int = 1):
        self.run_dir = Path(run_dir)
        check_fresh_dir(self.run_dir)
        data = dataclasses.asdict(data) if isinstance(data, DataConfig) else dict(data)
        self.cfg = config_from_dict({"name": name or self.run_dir.name, "seed": seed, "data": data,
                                     "model": {"name": model},
                                     "train": {"epochs": epochs, "batch_size": batch_size, "device": device,
                                               "checkpoint_every": checkpoint_every,
                                               "threads": threads or torch.get_num_threads()}})
        set_determinism(self.cfg.train.threads)
        self.device = resolve_device(device)
        self.dataset = build_dataset(self.cfg.data, seed)
        self.info = dataset_info(self.dataset)
        self.n = len(self.dataset.train)
        self.data = TensorData(self.dataset.train, self.dataset.mean, self.dataset.std, self.device)
        self.steps_per_epoch = steps_per_epoch(self.n, batch_size)
        self.total_steps = epochs * self.steps_per_epoch
        self._checkpoints = set(checkpoint_steps(self.total_steps, checkpoint_every or self.steps_per_epoch))
        self.check_every = max(0, int(check_every))
        self.model = new_model(self.cfg, self.info["shape"], self.device, self.dataset.num_classes)
        self.optimizer = optimizer(self.model.parameters())
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        self.hyper = self._check_optimizer()
        self._velocity = {k: torch.zeros_like(p) for k, p in self.model.named_parameters()}
        self._batches, self._flips, self._lrs = [], [], []
        self._expected = None  # parameters the pending optimizer.step() must produce
        self._buffers = self._snapshot_buffers()  # buffers as they are before the next step's forward
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(staged_dir(self.run_dir))
        (self._tmp / "trajectory").mkdir()
        self._start = time.perf_counter()
        self._closed = False

    # ------------------------------------------------------------------------------------------ the loop's side

    def batch(self, indices, flips=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training tensors (normalised, flipped where `flips` says) of `indices`: exactly what a replay uses."""
        idx, fl = self._check_batch(indices, flips, len(self._batches))
        return self.data.batch(idx, fl)

    def step(self, indices, flips=None) -> None:
        """Log one step: call it after `loss.backward()` and before `optimizer.step()`. A failed check ends the
        recording (nothing is left behind)."""
        try:
            self._step(indices, flips)
        except RayforgeError as exc:
            if not self._closed:
                self._abort(exc)
            raise

    def _step(self, indices, flips) -> None:
        t = len(self._batches)
        if self._closed or t >= self.total_steps:
            raise RayforgeError(f"Recorder: step {t} is past the declared {self.total_steps} steps "
                                f"({self.cfg.train.epochs} epochs of {self.steps_per_epoch})")
        idx, fl = self._check_batch(indices, flips, t)
        self._check_update(t)
        params = dict(self.model.named_parameters())
        grads = [p.grad for p in params.values()]
        if any(g is None for g in grads):
            raise RayforgeError(f"Recorder: step {t} has parameters without a gradient; call step() after "
                                f"loss.backward() and before optimizer.step()")
        lr = self._check_group(t)
        if self.check_every and t % self.check_every == 0:
            self._check_gradient(t, idx, fl, grads)
        if t in self._checkpoints:
            self._save(t)
        self._batches.append(idx.astype(np.int32))
        self._flips.append(fl)
        self._lrs.append(lr)
        with torch.no_grad():  # what plain SGD makes of this gradient, to compare with optimizer.step()'s result
            expected = copy.deepcopy(self.model)
            sgd_update(expected, [g.detach().clone() for g in grads], self._velocity, lr, self.hyper)
        self._expected = {k: p.detach() for k, p in expected.named_parameters()}
        self._buffers = self._snapshot_buffers()

    def close(self) -> dict:
        """Check the last update, write the final checkpoint, the step table, config and dataset record, and move
        the log into place. Returns the training summary. On any error nothing is left behind."""
        if self._closed:
            raise RayforgeError("Recorder: already closed")
        try:
            summary = self._finish()
        except BaseException as exc:
            self._abort(exc)
            raise
        self._closed = True
        self._stack.close()  # renames the staged directory into place
        return summary

    def _finish(self) -> dict:
        t = len(self._batches)
        if t != self.total_steps:
            raise RayforgeError(f"Recorder: {t} steps recorded, the declared training has {self.total_steps} "
                                f"({self.cfg.train.epochs} epochs of {self.steps_per_epoch} batches)")
        self._check_update(t)
        self._save(t)
        write_parquet(self._tmp / "trajectory" / "steps.parquet", steps_table(self._batches, self._flips, self._lrs))
        atomic_write_bytes(self._tmp / "config.yaml", dump_config(self._final_config()).encode())
        atomic_write_json(self._tmp / "dataset.json", self.info)
        wall = time.perf_counter() - self._start
        test = TensorData(self.dataset.test, self.dataset.mean, self.dataset.std, self.device)
        summary = {"steps": t, "train_wall_s": wall, "seconds_per_step": wall / t,
                   "train_accuracy": accuracy(self.model, self.data), "test_accuracy": accuracy(self.model, test),
                   "device": str(self.device), "recorded": True}
        atomic_write_json(self._tmp / "train_summary.json", summary)
        return summary

    def _abort(self, exc: BaseException) -> None:
        self._closed = True
        self._stack.__exit__(type(exc), exc, exc.__traceback__)  # removes the staged directory

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self._abort(exc)
        return False

    # ------------------------------------------------------------------------------------------ checks

    def _check_optimizer(self) -> SGDHyper:
        opt = self.optimizer
        if type(opt) is not torch.optim.SGD:
            raise RayforgeError(f"Recorder: the optimizer must be torch.optim.SGD, got {type(opt).__name__}")
        params = list(self.model.parameters())
        if len(opt.param_groups) != 1 or [id(p) for p in opt.param_groups[0]["params"]] != [id(p) for p in params]:
            raise RayforgeError("Recorder: the optimizer must have one parameter group holding the model's "
                                "parameters in order (optimizer=functools.partial(torch.optim.SGD, ...))")
        g = opt.param_groups[0]
        bad = [k for k, v in (("dampening", 0), ("nesterov", False), ("maximize", False)) if g.get(k, v) != v]
        if bad:
            raise RayforgeError(f"Recorder: SGD option(s) {', '.join(bad)} differ from plain SGD, which a PoR replays")
        self._lr0 = float(g["lr"])
        hyper = SGDHyper(momentum=float(g["momentum"]), weight_decay=float(g["weight_decay"]))
        validate(dataclasses.replace(self.cfg, train=dataclasses.replace(
            self.cfg.train, lr=self._lr0, momentum=hyper.momentum, weight_decay=hyper.weight_decay)))
        return hyper

    def _check_group(self, t: int) -> float:
        g = self.optimizer.param_groups[0]
        if float(g["momentum"]) != self.hyper.momentum or float(g["weight_decay"]) != self.hyper.weight_decay:
            raise RayforgeError(f"Recorder: step {t}: momentum or weight decay changed during training")
        lr = float(g["lr"])
        if not np.isfinite(lr) or lr <= 0:
            raise RayforgeError(f"Recorder: step {t}: learning rate {lr!r} must be finite and > 0")
        schedule = self._schedule(t, lr)
        expected = learning_rates(dataclasses.replace(self.cfg.train, lr=self._lr0, lr_schedule=schedule),
                                  self.total_steps)[t]
        if not np.isclose(lr, expected, rtol=LR_RTOL if schedule == "cosine" else 0.0, atol=0.0):
            raise RayforgeError(f"Recorder: step {t}: learning rate {lr!r} follows neither a constant schedule nor "
                                f"cosine annealing over {self.total_steps} steps from {self._lr0!r} "
                                f"(expected {expected!r}); a PoR's verifier checks one of those")
        return lr

    def _schedule(self, t: int, lr: float) -> str:
        """constant or cosine, decided at step 1 (step 0 uses the initial lr under both)."""
        if t == 0:
            return "constant"
        if t == 1:
            self._kind = "constant" if lr == self._lr0 else "cosine"
        return self._kind

    def _check_batch(self, indices, flips, t: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise RayforgeError(f"Recorder: step {t}: indices must be a 1-D array of integers")
        idx = idx.astype(np.int64)
        size = min(self.cfg.train.batch_size, self.n - (t % self.steps_per_epoch) * self.cfg.train.batch_size)
        if len(idx) != size:
            raise RayforgeError(f"Recorder: step {t}: a batch of {len(idx)} points; batch {t % self.steps_per_epoch} "
                                f"of an epoch must hold {size} (batch_size {self.cfg.train.batch_size}, n {self.n})")
        if idx.min() < 0 or idx.max() >= self.n or len(np.unique(idx)) != len(idx):
            raise RayforgeError(f"Recorder: step {t}: indices must be distinct training points in [0, {self.n})")
        fl = np.zeros(len(idx), bool) if flips is None else np.asarray(flips, dtype=bool)
        if fl.shape != idx.shape:
            raise RayforgeError(f"Recorder: step {t}: {fl.shape} flip flags for {len(idx)} indices")
        if fl.any() and not self.cfg.data.flip:
            raise RayforgeError(f"Recorder: step {t}: flipped samples, but data.flip is false")
        return idx, fl

    def _check_update(self, t: int) -> None:
        if self._expected is None:
            return
        diff = max(float((p.detach() - self._expected[k]).abs().max()) for k, p in self.model.named_parameters())
        if diff != 0.0:
            raise RayforgeError(f"Recorder: the update of step {t - 1} is not plain SGD on the logged gradient "
                                f"(max |difference| {diff:.3g}); call step() once per step, after backward() and "
                                f"before optimizer.step(), and change the parameters only through optimizer.step()")

    def _check_gradient(self, t: int, idx: np.ndarray, fl: np.ndarray, grads) -> None:
        reference = copy.deepcopy(self.model)
        with torch.no_grad():
            for b, saved in zip(reference.buffers(), self._buffers.values()):
                b.copy_(saved)
        x, y = self.data.batch(idx, fl)
        _, ours = loss_and_grads(reference, x, y)
        diff = max(float((a - b).abs().max()) for a, b in zip(ours, grads))
        if diff != 0.0:
            raise RayforgeError(f"Recorder: step {t}: the gradient is not the mean cross-entropy of the logged batch "
                                f"(max |difference| {diff:.3g}); compute the loss as F.cross_entropy(model(x), y) "
                                f"on x, y = recorder.batch(indices, flips), in training mode")

    # ------------------------------------------------------------------------------------------ writing

    def _snapshot_buffers(self) -> dict[str, torch.Tensor]:
        return {k: b.detach().clone() for k, b in self.model.named_buffers()}

    def _save(self, t: int) -> None:
        """The state before step t: parameters now, buffers as they were before step t's forward, velocity."""
        state = state_tensors(self.model, self._velocity if self.hyper.momentum else None)
        state.update({f"buffer/{k}": v.to("cpu").contiguous().clone() for k, v in self._buffers.items()})
        save_tensors(self._tmp / "trajectory" / ckpt_name(t), state, tag=f"{CKPT_FORMAT};step={t}")

    def _final_config(self) -> Config:
        schedule = getattr(self, "_kind", "constant")
        train = dataclasses.replace(self.cfg.train, lr=self._lr0, momentum=self.hyper.momentum,
                                    weight_decay=self.hyper.weight_decay, lr_schedule=schedule)
        return dataclasses.replace(self.cfg, train=train)
