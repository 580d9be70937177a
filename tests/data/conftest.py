"""Data tests are hermetic: a private cache per test, no $RAYFORGE_DATA, and torchvision downloads fail at once."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

@pytest.fixture(autouse=True)
def _hermetic(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("offline (test)")

    monkeypatch.setenv("RAYFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAYFORGE_DATA", raising=False)
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's bytes for a uint8 array (magic 0x0000_08_<ndim>, big-endian dims)."""
    header = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _write(path: Path, data: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def idx_file():
    """`idx_file(path, array, gz)` writes one IDX file."""
    return lambda path, array, gz=False: _write(path, _idx_bytes(array), gz)


@pytest.fixture
def mnist_dir():
    """`make(root, n_train, n_test, gz)` writes tiny random MNIST IDX files into `root`; returns the arrays."""

    def make(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        out = {}
        for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
            images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            labels = rng.integers(0, 10, n, dtype=np.uint8)
            suffix = ".gz" if gz else ""
            _write(root / f"{prefix}-images-idx3-ubyte{suffix}", _idx_bytes(images), gz)
            _write(root / f"{prefix}-labels-idx1-ubyte{suffix}", _idx_bytes(labels), gz)
            out[split] = (images, labels)
        return out

    return make
