from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rayforge.config import DataConfig
from rayforge.data import (
    ImageArrays,
    apply_flips,
    arrays_sha256,
    build_dataset,
    dataset_info,
    point_sha256,
    to_float,
)
from rayforge.errors import RayforgeError


def test_subset_is_deterministic_sorted_and_distinct():
    cfg = DataConfig(dataset="synthetic", synthetic_train=50, subset=20)
    a, b, c = build_dataset(cfg, seed=7), build_dataset(cfg, seed=7), build_dataset(cfg, seed=8)
    idx = a.subset_indices
    assert idx.dtype == np.int64 and len(idx) == 20 and len(set(idx.tolist())) == 20
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 50
    np.testing.assert_array_equal(idx, b.subset_indices)
    assert not np.array_equal(idx, c.subset_indices)
    full = build_dataset(DataConfig(dataset="synthetic", synthetic_train=50), seed=7)
    assert full.subset_indices is None and len(full.train) == 50
    np.testing.assert_array_equal(a.train.images, full.train.images[idx])
    np.testing.assert_array_equal(a.train.labels, full.train.labels[idx])
    assert arrays_sha256(a.test) == arrays_sha256(full.test)  # the subset never touches the test set


def test_subset_larger_than_available():
    with pytest.raises(RayforgeError, match="data.subset=51 exceeds the 50 training points"):
        build_dataset(DataConfig(dataset="synthetic", synthetic_train=50, subset=51), seed=0)


def test_mnist_padded_to_32(tmp_path, mnist_dir):
    written = mnist_dir(tmp_path / "mnist", n_train=12, n_test=5)
    ds = build_dataset(DataConfig(dataset="mnist", data_root=str(tmp_path), subset=4), seed=1)
    assert ds.train.images.shape == (4, 1, 32, 32) and ds.test.images.shape == (5, 1, 32, 32)
    np.testing.assert_array_equal(ds.test.images[:, 0, 2:30, 2:30], written["test"][0])
    np.testing.assert_array_equal(ds.train.images[:, 0, 2:30, 2:30], written["train"][0][ds.subset_indices])
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not ds.train.images[:, :, border].any() and not ds.test.images[:, :, border].any()
    assert (ds.mean, ds.std) == ((0.1307,), (0.3081,))


def test_synthetic_is_deterministic_and_shaped():
    cfg = DataConfig(dataset="synthetic", synthetic_train=30, synthetic_test=20, synthetic_shape=[3, 6, 5])
    a, b, c = build_dataset(cfg, 1), build_dataset(cfg, 1), build_dataset(cfg, 2)
    assert a.train.images.shape == (30, 3, 6, 5) and a.test.images.shape == (20, 3, 6, 5)
    assert dataset_info(a) == dataset_info(b) and dataset_info(a) != dataset_info(c)
    assert sorted(set(a.train.labels.tolist())) == list(range(10))
    assert (a.mean, a.std) == ((0.5,) * 3, (0.25,) * 3)
    # Learnable: nearest class mean (from train) classifies most test points correctly.
    means = np.stack([a.train.images[a.train.labels == k].reshape(-1, 90).mean(0) for k in range(10)])
    dists = ((a.test.images.reshape(20, 1, 90).astype(float) - means) ** 2).sum(-1)
    assert (dists.argmin(1) == a.test.labels).mean() > 0.9


@pytest.mark.parametrize("shape", [[1, 8], [0, 8, 8]])
def test_synthetic_bad_shape(shape):
    with pytest.raises(RayforgeError, match="synthetic_shape"):
        build_dataset(DataConfig(dataset="synthetic", synthetic_shape=shape), 0)


def test_unknown_dataset_lists_known():
    with pytest.raises(RayforgeError,
                       match=r"unknown dataset 'svhn' \(known: cifar10, imagefolder, mnist, synthetic\)"):
        build_dataset(DataConfig(dataset="svhn"), 0)


def test_dataset_info_is_json_ready():
    ds = build_dataset(DataConfig(dataset="synthetic", synthetic_train=20, synthetic_test=10, subset=5), 3)
    info = json.loads(json.dumps(dataset_info(ds)))
    assert info["dataset"] == "synthetic" and info["n"] == 5 and info["n_test"] == 10
    assert info["shape"] == [1, 8, 8] and info["subset_indices"] == ds.subset_indices.tolist()
    assert info["train_sha256"] == arrays_sha256(ds.train) and info["mean"] == [0.5] and info["std"] == [0.25]


def test_hashes_see_one_pixel_and_one_label():
    ds = build_dataset(DataConfig(dataset="synthetic", synthetic_train=10), 0)
    a = ds.train
    images = a.images.copy()
    images[3, 0, 4, 5] ^= 1
    changed = ImageArrays(images, a.labels)
    assert arrays_sha256(changed) != arrays_sha256(a)
    assert point_sha256(changed, 3) != point_sha256(a, 3) and point_sha256(changed, 2) == point_sha256(a, 2)
    relabelled = ImageArrays(a.images, (a.labels + 1) % 10)
    assert arrays_sha256(relabelled) != arrays_sha256(a) and point_sha256(relabelled, 0) != point_sha256(a, 0)
    assert arrays_sha256(a) == arrays_sha256(ImageArrays(a.images.copy(), a.labels.copy()))
    assert point_sha256(a, -1) == point_sha256(a, len(a) - 1)


def test_to_float_normalizes():
    images = np.array([0, 51, 255], np.uint8).reshape(1, 3, 1, 1).repeat(2, axis=0)
    x = to_float(images, (0.2, 0.2, 0.2), (0.5, 0.5, 0.5))
    assert x.dtype == torch.float32 and x.is_contiguous() and x.shape == (2, 3, 1, 1)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-0.4, 0.0, 1.6]))
    torch.testing.assert_close(to_float(torch.from_numpy(images), (0.2,) * 3, (0.5,) * 3), x)
    with pytest.raises(ValueError):
        to_float(images.astype(np.float32), (0.2,) * 3, (0.5,) * 3)


def test_apply_flips_flips_exactly_the_flagged():
    x = torch.arange(4 * 2 * 3 * 5, dtype=torch.float32).reshape(4, 2, 3, 5)
    before = x.clone()
    flags = torch.tensor([True, False, False, True])
    y = apply_flips(x, flags)
    torch.testing.assert_close(x, before)  # input untouched
    for i in range(4):
        torch.testing.assert_close(y[i], x[i].flip(-1) if flags[i] else x[i])
    torch.testing.assert_close(apply_flips(y, flags), x)  # an involution
    with pytest.raises(ValueError):
        apply_flips(x, torch.tensor([True]))
