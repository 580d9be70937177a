"""Decode once: decoded splits are kept as uint8 `.npy` files keyed by the identity of their source files."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rayforge.data.arrays import ImageArrays
from rayforge.io import save_npy

# Bump when a decoder's output changes, so stale caches are never reused.
DECODER_VERSION = 1


@dataclass(frozen=True)
class Source:
    """Where a split was found: the files that identify it (for the cache key) and how to decode it.

    `decode` returns the split asked for, plus any other split it decoded on the way from the same `files`
    (which are then cached too, under the same key).
    """

    files: Sequence[Path]
    decode: Callable[[], dict[str, ImageArrays]]


def cache_dir() -> Path:
    """`$RAYFORGE_CACHE`, else `~/.cache/rayforge`."""
    return Path(os.environ.get("RAYFORGE_CACHE") or Path.home() / ".cache" / "rayforge").expanduser()


def source_key(files: Sequence[Path]) -> str:
    """A short hash of each file's resolved path, size and mtime: changes whenever the source might have."""
    h = hashlib.sha256(f"v{DECODER_VERSION}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _load(images_path: Path, labels_path: Path) -> ImageArrays | None:
    if not (images_path.is_file() and labels_path.is_file()):
        return None
    try:
        return ImageArrays(np.load(images_path, allow_pickle=False), np.load(labels_path, allow_pickle=False))
    except (OSError, ValueError, EOFError):
        # Unreadable or inconsistent (e.g. edited by hand): the source is still there, so just decode again.
        return None


def cached_arrays(dataset: str, split: str, source: Source) -> ImageArrays:
    """The decoded split from `<cache>/arrays/`, decoding (and caching) it only on a miss."""
    key = source_key(source.files)

    def paths(s: str) -> tuple[Path, Path]:
        stem = cache_dir() / "arrays" / f"{dataset}-{s}-{key}"
        return Path(f"{stem}.images.npy"), Path(f"{stem}.labels.npy")

    hit = _load(*paths(split))
    if hit is not None:
        return hit
    decoded = source.decode()
    try:
        for s, arrays in decoded.items():
            images_path, labels_path = paths(s)
            images_path.parent.mkdir(parents=True, exist_ok=True)
            # Each file is atomic and a hit needs both, so a run killed between the two only costs a re-decode.
            save_npy(labels_path, arrays.labels)
            save_npy(images_path, arrays.images)
    except OSError as exc:
        # A read-only cache only costs speed, never correctness.
        warnings.warn(f"could not write the array cache under {cache_dir()}: {exc}", stacklevel=2)
    return decoded[split]
