"""The in-memory form of a dataset split, and its content hashes (recorded in logs and PoRs)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageArrays:
    """A split as raw pixels: `images` uint8 (N, C, H, W), `labels` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        # Every producer (decoders, cache, subsets) must hand over exact dtypes: hashes depend on them.
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 ({len(self.images)},), got {self.labels.dtype} {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> ImageArrays:
        """The points at `indices`, in that order (copies)."""
        return ImageArrays(np.ascontiguousarray(self.images[indices]), np.ascontiguousarray(self.labels[indices]))


def arrays_sha256(a: ImageArrays) -> str:
    """sha256 (hex) over the C-contiguous uint8 image bytes, then the int64 little-endian label bytes."""
    h = hashlib.sha256()
    h.update(memoryview(np.ascontiguousarray(a.images, dtype=np.uint8)).cast("B"))
    # Fixed little-endian int64 labels so the hash does not depend on the host's byte order.
    h.update(memoryview(np.ascontiguousarray(a.labels, dtype="<i8")).cast("B"))
    return h.hexdigest()


def point_sha256(a: ImageArrays, i: int) -> str:
    """sha256 (hex) of one point: its image bytes, then its label as int64 little-endian."""
    h = hashlib.sha256()
    h.update(memoryview(np.ascontiguousarray(a.images[i], dtype=np.uint8)).cast("B"))
    h.update(int(a.labels[i]).to_bytes(8, "little", signed=True))
    return h.hexdigest()


def same_content(a: ImageArrays, image: np.ndarray, label: int, mirrored: bool = False) -> np.ndarray:
    """bool (N,): the points of `a` that hold this image and label (equal point_sha256), and with `mirrored` also
    those holding its mirror image (a training flip turns one into the other)."""
    images = a.images.reshape(len(a), -1)
    same_label = a.labels == label
    hits = same_label & (images == image.reshape(-1)).all(axis=1)
    if mirrored:
        hits |= same_label & (images == image[..., ::-1].reshape(-1)).all(axis=1)
    return hits
