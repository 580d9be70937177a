"""The one I/O layer: atomic writes, Parquet and safetensors read/write, fresh and staged directories.

Every artifact rayforge writes goes through here, so a killed process never leaves a half-written file and a
failing build never leaves a half-built directory. Nothing here unpickles: logs and PoRs come from untrusted
parties, so they are Parquet, safetensors and JSON/YAML only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rayforge.errors import MalformedArtifact, RayforgeError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write to; renamed onto `path` on success, removed on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's private 0600 would hide shared outputs from other users
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` and rename tmp onto `path`: readers see the old file or the whole new one."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Atomic `.npy` write, never pickled (object arrays are refused)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: given a path, np.save would append ".npy" to the temp name
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)


# ---------------------------------------------------------------------------------------------- Parquet

def write_parquet(path: str | Path, table: pa.Table) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def read_parquet(path: str | Path, what: str = "table") -> pa.Table:
    """A Parquet table; a missing or unreadable one is a MalformedArtifact."""
    path = Path(path)
    if not path.is_file():
        raise MalformedArtifact(f"missing {what} {path}")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise MalformedArtifact(f"{path}: unreadable Parquet ({exc})") from None


def read_table_if_valid(path: str | Path, schema: pa.Schema) -> pa.Table | None:
    """A progress file's table, or None when absent, unreadable or of another schema (its unit is then redone)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None
    return table if table.schema.remove_metadata() == schema else None


# ---------------------------------------------------------------------------------------------- safetensors

def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], tag: str | None = None) -> None:
    """Atomic safetensors write. One metadata key at most: safetensors writes a multi-key metadata map in hash
    order, which breaks byte-identity."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata={"rayforge": tag} if tag else None))


def read_tensors(path: str | Path, what: str = "safetensors file") -> dict[str, torch.Tensor]:
    """Load a safetensors file (never a pickle); a missing or unreadable one is a MalformedArtifact."""
    path = Path(path)
    if not path.is_file():
        raise MalformedArtifact(f"missing {what} {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MalformedArtifact(f"{path}: not a readable safetensors {what} ({exc})") from None


# ---------------------------------------------------------------------------------------------- directories

def check_fresh_dir(out_dir: str | Path) -> None:
    """Outputs that are built whole (a run, a PoR) never go into a directory that already holds something."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RayforgeError(f"refusing to overwrite '{out_dir}': it exists and is not empty")


@contextlib.contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it into place only on success: a failure (or Ctrl-C)
    leaves nothing at `out_dir` and never touches an existing one. `out_dir` must be absent or empty."""
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        yield tmp_dir
        if out_dir.exists():
            out_dir.rmdir()  # empty, as required
        tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
