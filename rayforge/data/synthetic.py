"""A tiny generated 10-class dataset for tests: no files, deterministic from the seed, learnable."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rayforge.data.arrays import ImageArrays
from rayforge.errors import RayforgeError

N_CLASSES = 10
NOISE_STD = 30.0  # pixel units; well below the prototypes' spread, so a small model separates the classes


def make_synthetic(n_train: int, n_test: int, shape: Sequence[int], seed: int) -> tuple[ImageArrays, ImageArrays]:
    """Train and test sets of 10 classes: one random prototype image per class, plus Gaussian pixel noise."""
    if len(shape) != 3 or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise RayforgeError(f"config: data.synthetic_shape must be three positive ints [C, H, W], got {list(shape)}")
    if n_train < 1 or n_test < 1:
        raise RayforgeError(f"config: data.synthetic_train/synthetic_test must be >= 1, got {n_train}, {n_test}")
    # Independent streams per purpose, so the test set does not shift when the training size changes.
    prototypes = np.random.default_rng([seed, 0]).uniform(40, 215, (N_CLASSES, *shape))
    train = _sample(prototypes, n_train, np.random.default_rng([seed, 1]))
    test = _sample(prototypes, n_test, np.random.default_rng([seed, 2]))
    return train, test


def _sample(prototypes: np.ndarray, n: int, rng: np.random.Generator) -> ImageArrays:
    # Balanced classes in random order.
    labels = rng.permutation(np.arange(n) % N_CLASSES).astype(np.int64)
    pixels = prototypes[labels] + rng.normal(0.0, NOISE_STD, (n, *prototypes.shape[1:]))
    return ImageArrays(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), labels)
