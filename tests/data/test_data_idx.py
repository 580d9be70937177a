from __future__ import annotations

import gzip

import numpy as np
import pytest

from rayforge.data import load_split
from rayforge.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from rayforge.errors import MalformedArtifact


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_round_trip(tmp_path, mnist_dir, gz):
    written = mnist_dir(tmp_path / "mnist", gz=gz)
    for split in ("train", "test"):
        a = load_split("mnist", split, data_root=str(tmp_path))
        images, labels = written[split]
        assert a.images.shape == (len(images), 1, 28, 28) and a.images.dtype == np.uint8
        assert a.labels.dtype == np.int64
        np.testing.assert_array_equal(a.images[:, 0], images)
        np.testing.assert_array_equal(a.labels, labels)


def test_gzip_detected_by_content_not_name(tmp_path, idx_file):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    gz_named_plain = idx_file(tmp_path / "a", arr, gz=True)  # gzip data, no .gz suffix
    plain_named_gz = idx_file(tmp_path / "b.gz", arr, gz=False)  # plain data, .gz suffix
    for path in (gz_named_plain, plain_named_gz):
        np.testing.assert_array_equal(read_idx(path, IMAGES_MAGIC), arr)


def _corrupt(path, transform):
    path.write_bytes(transform(gzip.decompress(path.read_bytes())))


@pytest.mark.parametrize(
    "name, transform, problem",
    [
        ("train-images-idx3-ubyte.gz", lambda b: b[:-7], "truncated"),
        ("train-images-idx3-ubyte.gz", lambda b: b[:10], "truncated IDX header"),
        ("train-images-idx3-ubyte.gz", lambda b: b"\x00\x00\x08\x01" + b[4:], "bad IDX magic"),
        ("train-labels-idx1-ubyte.gz", lambda b: b[:-1], "truncated"),
        ("train-images-idx3-ubyte.gz", lambda b: gzip.compress(b)[:-20], "corrupt gzip"),
    ],
)
def test_malformed_idx_names_file_and_problem(tmp_path, mnist_dir, name, transform, problem):
    mnist_dir(tmp_path)
    _corrupt(tmp_path / name, transform)
    with pytest.raises(MalformedArtifact, match=problem) as err:
        load_split("mnist", "train", data_root=str(tmp_path))
    assert name in str(err.value)


def test_label_count_must_match_images(tmp_path, mnist_dir, idx_file):
    mnist_dir(tmp_path)
    idx_file(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8), gz=True)
    with pytest.raises(MalformedArtifact, match="3 labels for 12 images") as err:
        load_split("mnist", "train", data_root=str(tmp_path))
    assert "train-labels-idx1-ubyte.gz" in str(err.value)


def test_labels_magic_is_checked(tmp_path, idx_file):
    path = idx_file(tmp_path / "labels", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(MalformedArtifact, match="labels: bad IDX magic 0x00000803, expected 0x00000801"):
        read_idx(path, LABELS_MAGIC)
