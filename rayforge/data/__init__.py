"""Datasets as uint8 arrays: MNIST and CIFAR-10 from local files (decoded once, then cached), or synthetic ones."""

from rayforge.data.arrays import ImageArrays, arrays_sha256, point_sha256
from rayforge.data.cache import cache_dir
from rayforge.data.dataset import (
    KNOWN_DATASETS,
    MEAN_STD,
    Dataset,
    build_dataset,
    dataset_info,
    draw_subset,
    load_split,
    prepare_points,
    training_split,
)
from rayforge.data.transforms import apply_flips, to_float

__all__ = [
    "KNOWN_DATASETS",
    "MEAN_STD",
    "Dataset",
    "ImageArrays",
    "apply_flips",
    "arrays_sha256",
    "build_dataset",
    "cache_dir",
    "dataset_info",
    "draw_subset",
    "load_split",
    "point_sha256",
    "prepare_points",
    "to_float",
    "training_split",
]
