"""The training log (the Proof-of-Learning) on disk: Parquet step table and safetensors checkpoints.

Layout inside a run directory:
    config.yaml, dataset.json
    trajectory/steps.parquet                step int64, batch list<int32>, flip list<bool>, lr float64
    trajectory/ckpt-<8-digit step>.safetensors   state *before* that step: param/*, buffer/*, velocity/*

Generic I/O (atomic writes, Parquet, safetensors, staged directories) lives in `rayforge.io`.
Logs come from untrusted parties: nothing here unpickles, every table is schema-checked and every checkpoint is
checked against the model's own names, shapes and dtypes before use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from rayforge.errors import MalformedArtifact
from rayforge.io import read_parquet, read_tensors, save_tensors

STEPS_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("batch", pa.list_(pa.int32())),
    ("flip", pa.list_(pa.bool_())),
    ("lr", pa.float64()),
])
CKPT_RE = re.compile(r"^ckpt-(\d{8})\.safetensors$")
CKPT_FORMAT = "rayforge-ckpt-1"


def ckpt_name(step: int) -> str:
    return f"ckpt-{step:08d}.safetensors"


# ---------------------------------------------------------------------------------------------- step table

@dataclass(frozen=True)
class Steps:
    """The step table in memory. `batch[i]`/`flip[i]` belong to step `step0 + i` (steps are contiguous)."""

    batch: list[np.ndarray]
    flip: list[np.ndarray]
    lr: np.ndarray

    def __len__(self) -> int:
        return len(self.batch)


def steps_table(batches, flips, lrs, first_step: int = 0) -> pa.Table:
    return pa.table({
        "step": pa.array(np.arange(first_step, first_step + len(batches), dtype=np.int64)),
        "batch": pa.array([np.asarray(b, dtype=np.int32) for b in batches], type=pa.list_(pa.int32())),
        "flip": pa.array([np.asarray(f, dtype=bool) for f in flips], type=pa.list_(pa.bool_())),
        "lr": pa.array(np.asarray(lrs, dtype=np.float64)),
    }, schema=STEPS_SCHEMA)


def _split_list_column(column: pa.ChunkedArray, dtype) -> list[np.ndarray]:
    arr = column.combine_chunks()
    offsets = arr.offsets.to_numpy()
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(arr))]


def read_steps(path: Path, n_points: int | None = None) -> Steps:
    """Read and validate a step table: exact schema, contiguous steps from 0, no nulls, matching batch/flip
    lengths, indices in [0, n_points), finite positive learning rates."""
    path = Path(path)
    table = read_parquet(path, "step table")
    if table.schema.remove_metadata() != STEPS_SCHEMA:
        raise MalformedArtifact(f"{path}: wrong schema {table.schema.to_string(show_schema_metadata=False)!r}, "
                                f"expected step int64, batch list<int32>, flip list<bool>, lr double")
    if table.num_rows == 0:
        raise MalformedArtifact(f"{path}: no steps")
    for name in STEPS_SCHEMA.names:
        col = table.column(name)
        if col.null_count or (name in ("batch", "flip") and pa.compute.sum(
                pa.compute.is_null(col.combine_chunks().flatten())).as_py()):
            raise MalformedArtifact(f"{path}: column '{name}' has nulls")
    step = table.column("step").to_numpy()
    if not np.array_equal(step, np.arange(len(step))):
        bad = int(np.argmax(step != np.arange(len(step))))
        raise MalformedArtifact(f"{path}: steps must run 0..{len(step) - 1} in order; row {bad} has step {step[bad]}")
    batch = _split_list_column(table.column("batch"), np.int64)
    flip = _split_list_column(table.column("flip"), bool)
    lr = table.column("lr").to_numpy()
    for i, (b, f) in enumerate(zip(batch, flip)):
        if len(b) == 0 or len(b) != len(f):
            raise MalformedArtifact(f"{path}: step {i} has {len(b)} indices and {len(f)} flip flags")
        if n_points is not None and (b.min() < 0 or b.max() >= n_points):
            raise MalformedArtifact(f"{path}: step {i} has an index outside [0, {n_points})")
        if len(np.unique(b)) != len(b):
            raise MalformedArtifact(f"{path}: step {i} repeats an index within its batch")
    if not np.all(np.isfinite(lr)) or np.any(lr <= 0):
        raise MalformedArtifact(f"{path}: learning rates must be finite and > 0")
    return Steps(batch, flip, lr)


# ---------------------------------------------------------------------------------------------- checkpoints

def state_tensors(model: nn.Module, velocity: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    out = {f"param/{k}": v.detach() for k, v in model.named_parameters()}
    out.update({f"buffer/{k}": v.detach() for k, v in model.named_buffers()})
    if velocity:
        out.update({f"velocity/{k}": v.detach() for k, v in velocity.items()})
    return {k: v.to("cpu").contiguous().clone() for k, v in out.items()}


def save_checkpoint(path: Path, model: nn.Module, velocity: dict[str, torch.Tensor] | None, step: int) -> None:
    write_checkpoint(path, state_tensors(model, velocity), step)


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], step: int) -> None:
    """A checkpoint's tensors (as `state_tensors` gives them) to `path`, tagged with the format and step."""
    save_tensors(path, tensors, tag=f"{CKPT_FORMAT};step={step}")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path, "checkpoint")


def check_state(tensors: dict[str, torch.Tensor], model: nn.Module, where: str,
                need_velocity: bool) -> None:
    """Names, shapes and dtypes must be exactly the model's (plus velocity when momentum is used); finite values."""
    expected = {f"param/{k}": v for k, v in model.named_parameters()}
    expected.update({f"buffer/{k}": v for k, v in model.named_buffers()})
    if need_velocity:
        expected.update({f"velocity/{k}": v for k, v in model.named_parameters()})
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise MalformedArtifact(f"{where}: tensors do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, ref in expected.items():
        t = tensors[key]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise MalformedArtifact(f"{where}: '{key}' has shape {tuple(t.shape)} {t.dtype}, "
                                    f"expected {tuple(ref.shape)} {ref.dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise MalformedArtifact(f"{where}: '{key}' holds non-finite values")


@torch.no_grad()
def load_state(tensors: dict[str, torch.Tensor], model: nn.Module, velocity: dict[str, torch.Tensor] | None) -> None:
    """Copy checked tensors into the model (and velocity) in place."""
    for k, p in model.named_parameters():
        p.copy_(tensors[f"param/{k}"])
    for k, b in model.named_buffers():
        b.copy_(tensors[f"buffer/{k}"])
    if velocity is not None:
        for k, v in velocity.items():
            v.copy_(tensors[f"velocity/{k}"])


def list_checkpoints(directory: Path) -> list[int]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := CKPT_RE.match(p.name)))
