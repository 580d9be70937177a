"""A training run directory opened for reading: config, dataset record, step table and checkpoints, all validated.

Every later stage (replay, forge, rebuild, por) starts from `TrainingRun.open(run_dir)`.
"""

from __future__ import annotations

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
from rayforge.train.log import Steps, check_state, ckpt_name, list_checkpoints, load_state, read_checkpoint, read_steps
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
    def num_classes(self) -> int:
        return int(self.info.get("num_classes", NUM_CLASSES))

    def device(self) -> torch.device:
        return resolve_device(self.cfg.train.device)

    def load_dataset(self) -> Dataset:
        """Rebuild the run's training set and check it is byte-for-byte the logged one."""
        ds = build_dataset(self.cfg.data, self.cfg.seed)
        if arrays_sha256(ds.train) != self.info.get("train_sha256"):
            raise RayforgeError(f"{self.run_dir}: the dataset found now differs from the logged one "
                                f"(SHA-256 mismatch of the training tensor)")
        return ds

    def tensor_data(self, ds: Dataset, device: torch.device) -> TensorData:
        return TensorData(ds.train, ds.mean, ds.std, device)

    def model_at(self, step: int, device: torch.device) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """A model and its momentum buffers restored from the checkpoint at `step` (which must exist)."""
        if step not in self.checkpoints:
            raise RayforgeError(f"no checkpoint at step {step} (have {self.checkpoints})")
        model = new_model(self.cfg, self.info["shape"], device, self.num_classes)
        velocity = zero_velocity(model)
        path = self.traj_dir / ckpt_name(step)
        tensors = read_checkpoint(path)
        check_state(tensors, model, str(path), need_velocity=bool(self.cfg.train.momentum))
        load_state(tensors, model, velocity if self.cfg.train.momentum else None)
        return model, velocity
