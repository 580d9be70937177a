"""A training run directory opened for reading: config, dataset record, step table and checkpoints, all validated.

Every later stage (replay, forge, rebuild, por) starts from `TrainingRun.open(run_dir)`. Ray workers never open the
run directory: the driver ships them `run.detach()` (the same record with its dataset loaded, and no file access)
and hands them checkpoints as tensors; `model_from_state` restores a model from those.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from rayforge.config import Config, config_from_dict
from rayforge.data import Dataset, arrays_sha256, build_dataset
from rayforge.errors import MalformedArtifact, RayforgeError
from rayforge.models import build_model
from rayforge.train.batches import TensorData
from rayforge.train.log import (Steps, check_state, ckpt_name, list_checkpoints, load_state, read_checkpoint,
                                read_steps, state_tensors)
from rayforge.train.sgd import SGDHyper, zero_velocity

NUM_CLASSES = 10  # logs written before dataset.json recorded "num_classes" were all 10-class


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RayforgeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def set_determinism(threads: int | None) -> None:
    """Same config and seed -> same bits on one machine: deterministic kernels, fixed thread count if asked."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)


def use_threads(threads: int | None, what: str = "the log") -> int:
    """Compute with exactly `threads` torch threads (CPU kernels round differently with other counts, so an exact
    replay needs the logged one), whatever CPUs Ray granted; refuse, with advice, when that is not possible."""
    if not threads:
        raise RayforgeError(f"{what} records no thread count (train.threads), so no replay can be exact; retrain "
                            f"with train.threads set")
    set_determinism(threads)
    if torch.get_num_threads() != threads:
        raise RayforgeError(f"this worker cannot compute with {what}'s {threads} torch threads (it runs "
                            f"{torch.get_num_threads()}); run it where torch can use {threads} threads")
    return threads


def hyper_of(cfg: Config) -> SGDHyper:
    return SGDHyper(momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)


def new_model(cfg: Config, in_shape, device: torch.device, num_classes: int = NUM_CLASSES) -> nn.Module:
    """The model of the config, initialised from the run seed (θ₀ of the log)."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model.name, tuple(in_shape), num_classes).to(device)


@dataclass
class TrainingRun:
    run_dir: Path
    cfg: Config
    info: dict
    steps: Steps
    checkpoints: list[int]
    dataset: Dataset | None = None  # loaded once (and checked) by `load_dataset`; shipped with a detached copy
    detached: bool = False  # a copy held by a Ray worker: the run directory is out of its reach

    @property
    def traj_dir(self) -> Path:
        return self.run_dir / "trajectory"

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    @classmethod
    def open(cls, run_dir: str | Path) -> "TrainingRun":
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RayforgeError(f"no run directory '{run_dir}'")
        for name in ("config.yaml", "dataset.json", "trajectory/steps.parquet"):
            if not (run_dir / name).is_file():
                raise MalformedArtifact(f"{run_dir}: incomplete training log, missing {name}")
        try:
            raw = yaml.safe_load((run_dir / "config.yaml").read_text())
            info = json.loads((run_dir / "dataset.json").read_text())
        except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MalformedArtifact(f"{run_dir}: unreadable config.yaml or dataset.json ({exc})") from None
        if not isinstance(raw, dict) or not isinstance(info, dict) or not isinstance(info.get("n"), int) or \
                not isinstance(info.get("num_classes", NUM_CLASSES), int):
            raise MalformedArtifact(f"{run_dir}: config.yaml or dataset.json has the wrong structure")
        cfg = config_from_dict(raw)
        steps = read_steps(run_dir / "trajectory" / "steps.parquet", n_points=info["n"])
        ckpts = list_checkpoints(run_dir / "trajectory")
        if not ckpts or ckpts[0] != 0 or ckpts[-1] != len(steps) or any(c > len(steps) for c in ckpts):
            raise MalformedArtifact(f"{run_dir}/trajectory: checkpoints must include step 0 and the last step "
                                    f"{len(steps)}; found {ckpts[:3]}...{ckpts[-3:]}")
        return cls(run_dir, cfg, info, steps, ckpts)

    @property
    def threads(self) -> int:
        """The torch thread count the log was trained with (resolved and recorded by the trainer)."""
        if not self.cfg.train.threads:
            raise RayforgeError(f"{self.run_dir}: the log records no thread count (train.threads), so no replay "
                                f"can be exact; retrain with train.threads set")
        return self.cfg.train.threads

    @property
    def num_classes(self) -> int:
        return int(self.info.get("num_classes", NUM_CLASSES))

    def device(self) -> torch.device:
        """Where to compute: in a Ray worker, what Ray assigned (see rayforge.ray_utils); else `train.device`."""
        from rayforge.ray_utils import worker_device

        return worker_device(self.cfg.train.device)

    def load_dataset(self) -> Dataset:
        """The run's data, rebuilt once and checked byte for byte against the log (the training tensor's hash)."""
        if self.dataset is None:
            self._driver_only("load the dataset")
            ds = build_dataset(self.cfg.data, self.cfg.seed)
            if arrays_sha256(ds.train) != self.info.get("train_sha256"):
                raise RayforgeError(f"{self.run_dir}: the dataset found now differs from the logged one "
                                    f"(SHA-256 mismatch of the training tensor)")
            self.dataset = ds
        return self.dataset

    def detach(self) -> "TrainingRun":
        """What a Ray worker receives: this record with its dataset loaded, and no access to the run directory."""
        self.load_dataset()
        return dataclasses.replace(self, detached=True)

    def _driver_only(self, action: str) -> None:
        if self.detached:
            raise RuntimeError(f"a Ray worker cannot {action}: only the driver reads the run directory")

    def tensor_data(self, ds: Dataset, device: torch.device) -> TensorData:
        return TensorData(ds.train, ds.mean, ds.std, device)

    def checkpoint(self, step: int) -> dict[str, torch.Tensor]:
        """The stored state before `step` (which must be a checkpoint), as tensors (driver only)."""
        self._driver_only("read checkpoints")
        if step not in self.checkpoints:
            raise RayforgeError(f"no checkpoint at step {step} (have {self.checkpoints})")
        return read_checkpoint(self.traj_dir / ckpt_name(step))

    def model_from_state(self, tensors: dict[str, torch.Tensor], device: torch.device,
                         where: str = "checkpoint") -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """A model and its momentum buffers restored from a checkpoint's tensors (checked against the model)."""
        model = new_model(self.cfg, self.info["shape"], device, self.num_classes)
        velocity = zero_velocity(model)
        check_state(tensors, model, where, need_velocity=bool(self.cfg.train.momentum))
        load_state(tensors, model, velocity if self.cfg.train.momentum else None)
        return model, velocity

    def model_at(self, step: int, device: torch.device) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """A model and its momentum buffers restored from the checkpoint at `step` (which must exist)."""
        return self.model_from_state(self.checkpoint(step), device, str(self.traj_dir / ckpt_name(step)))

    def state_of(self, model: nn.Module, velocity: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A model's state as a checkpoint holds it (CPU tensors; momentum buffers only when the log uses them)."""
        return state_tensors(model, velocity if self.cfg.train.momentum else None)
