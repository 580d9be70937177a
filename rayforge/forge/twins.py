"""Content twins: points that are the same example under another index (identical pixels and label, or, when
training uses flips, each other's mirror image). A PoR must not use a twin of the point it repudiates (the
verifier checks batches by content, not only by index), and a twin's gradient matches the point's exactly, so
phase 1 would otherwise pick it. Twins are excluded wherever their point is."""

from __future__ import annotations

import hashlib

import numpy as np

from rayforge.data import ImageArrays


def _key(image: np.ndarray, label: int) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes() + np.int64(label).tobytes()).digest()


def content_classes(arrays: ImageArrays, flip: bool) -> np.ndarray:
    """A class id per point; twins share one (union-find over identical and, with flips, mirrored content)."""
    n = len(arrays.labels)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[bytes, int] = {}
    for i in range(n):
        label = int(arrays.labels[i])
        keys = [_key(arrays.images[i], label)]
        if flip:
            keys.append(_key(arrays.images[i][..., ::-1], label))
        for key in keys:
            j = first_with.setdefault(key, i)
            if j != i:
                parent[find(i)] = find(j)
    return np.array([find(i) for i in range(n)])


class Twins:
    """Exclusion by content for phase 1; a no-op when the training set has no twins (the usual case)."""

    def __init__(self, arrays: ImageArrays, flip: bool):
        self.classes = content_classes(arrays, flip)
        sizes = np.bincount(self.classes, minlength=len(self.classes))
        self.twinned = np.flatnonzero(sizes[self.classes] > 1)  # points that have at least one twin

    def allowed(self, candidates: np.ndarray, excluded_mask: np.ndarray) -> np.ndarray:
        """`candidates` minus every twin of a point where `excluded_mask` is True."""
        if len(self.twinned) == 0:
            return candidates
        return candidates[~self._banned(excluded_mask)[candidates]]

    def allowed_mask(self, excluded_mask: np.ndarray) -> np.ndarray:
        """The points that are neither excluded nor a twin of an excluded point, as a mask."""
        if len(self.twinned) == 0:
            return ~excluded_mask
        return ~excluded_mask & ~self._banned(excluded_mask)

    def _banned(self, excluded_mask: np.ndarray) -> np.ndarray:
        """Mask of the points sharing a content class with an excluded twinned point."""
        banned = np.unique(self.classes[self.twinned[excluded_mask[self.twinned]]])
        return np.isin(self.classes, banned)
