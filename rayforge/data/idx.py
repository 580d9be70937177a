"""MNIST in its original IDX format, gzipped or not."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from rayforge.data.arrays import ImageArrays
from rayforge.data.cache import Source
from rayforge.errors import MalformedArtifact

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims (N, H, W)
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim (N,)
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
GZIP_MAGIC = b"\x1f\x8b"


def read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name says)."""
    raw = path.read_bytes()
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise MalformedArtifact(f"{path}: corrupt gzip stream ({exc})") from None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file as a uint8 array of the shape its header declares; any mismatch is MalformedArtifact."""
    data = read_maybe_gzip(path)
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        got = data[:4].hex() or "nothing"
        raise MalformedArtifact(f"{path}: bad IDX magic 0x{got}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MalformedArtifact(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise MalformedArtifact(f"{path}: {len(data)} bytes, but header dims {dims} need {expected} (truncated?)")
    # Copy out of the immutable bytes so callers get an ordinary writable array.
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def decode_mnist(images_path: Path, labels_path: Path) -> ImageArrays:
    """A pair of MNIST IDX files as (N, 1, 28, 28) images and int64 labels."""
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise MalformedArtifact(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, MNIST is 28x28")
    if len(labels) != len(images):
        raise MalformedArtifact(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    if labels.size and labels.max() > 9:
        raise MalformedArtifact(f"{labels_path}: label {labels.max()} out of range 0..9")
    return ImageArrays(images[:, None], labels)


def find_mnist(directory: Path, split: str) -> Source | str:
    """The split's two IDX files in `directory` (each as `name` or `name.gz`), or why they are not there."""
    found, missing = [], []
    for name in MNIST_FILES[split]:
        path = next((p for p in (directory / name, directory / f"{name}.gz") if p.is_file()), None)
        (found if path else missing).append(path or f"{name}[.gz]")
    if missing:
        return f"missing {', '.join(missing)} in {directory}"
    return Source(found, lambda: {split: decode_mnist(*found)})


def mnist_needs(split: str) -> str:
    return ", ".join(f"{name}[.gz]" for name in MNIST_FILES[split])
