from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from rayforge.data import cifar10, load_split
from rayforge.errors import MalformedArtifact

# Deliberately not in sorted order, and test/ lacks one class: labels come from the sorted union.
CLASSES = {"train": {"frog": 2, "airplane": 3, "cat": 1}, "test": {"cat": 1, "frog": 2}}


def _write_tree(root) -> None:
    rng = np.random.default_rng(0)
    for split, counts in CLASSES.items():
        for cls, n in counts.items():
            (root / split / cls).mkdir(parents=True)
            for i in reversed(range(n)):  # written in reverse: order must come from sorting, not the filesystem
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i:04d}.jpg", quality=90)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def _expected(root, split):
    """What PIL itself decodes, in (class, filename) order, labelled by sorted class name."""
    label_of = {c: i for i, c in enumerate(["airplane", "cat", "frog"])}
    files = sorted((root / split).glob("*/*.jpg"), key=lambda f: (f.parent.name, f.name))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files])
    return images, np.array([label_of[f.parent.name] for f in files])


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("layout", ["folder", "archive"])
def test_image_folder_and_archive(tmp_path, split, layout):
    tree = tmp_path / "tree"
    _write_tree(tree)
    if layout == "folder":
        root = tree
    else:
        root = tmp_path / "root"
        (root / "cifar10").mkdir(parents=True)
        with tarfile.open(root / "cifar10" / cifar10.ARCHIVE, "w:gz") as tar:
            for split_name in ("test", "train"):
                tar.add(tree / split_name, arcname=split_name)
    a = load_split("cifar10", split, data_root=str(root))
    images, labels = _expected(tree, split)
    assert a.images.shape == (sum(CLASSES[split].values()), 3, 32, 32) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images, images)
    np.testing.assert_array_equal(a.labels, labels)


def test_archive_is_read_once_for_both_splits(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    _write_tree(tree)
    with tarfile.open(tmp_path / cifar10.ARCHIVE, "w:gz") as tar:
        tar.add(tree, arcname="cifar10")  # a leading folder in member names is fine too
    train = load_split("cifar10", "train", data_root=str(tmp_path))

    def no_decoding(*args, **kwargs):
        raise AssertionError("archive read again")

    monkeypatch.setattr(cifar10, "decode_archive", no_decoding)
    assert load_split("cifar10", "train", data_root=str(tmp_path)).labels.tolist() == train.labels.tolist()
    test = load_split("cifar10", "test", data_root=str(tmp_path))
    np.testing.assert_array_equal(test.labels, _expected(tree, "test")[1])


def test_broken_archive_is_malformed(tmp_path):
    (tmp_path / cifar10.ARCHIVE).write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(MalformedArtifact, match=cifar10.ARCHIVE):
        load_split("cifar10", "train", data_root=str(tmp_path))


def _write_batches(directory, seed=0, written: dict | None = None) -> dict:
    """Pickled batches shaped like the release's (dict: 'data' (N, 3072) uint8, 'labels' list); their MD5s.
    `written` receives the batches as written, so tests compare against them without unpickling anything.

    Protocol 3: Python 3 pickles bytes natively from it on (the release's Python 2 str needs no global either).
    """
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    md5 = {}
    for name in cifar10.BATCH_MD5:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, 4).tolist()}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=3))
        if written is not None:
            written[name] = batch
        md5[name] = hashlib.md5((directory / name).read_bytes()).hexdigest()
    return md5


def test_batches_with_canonical_md5_load(tmp_path, monkeypatch):
    written = {}
    md5 = _write_batches(tmp_path / cifar10.BATCHES_DIR, written=written)
    monkeypatch.setattr(cifar10, "BATCH_MD5", md5)  # stand-ins for the canonical checksums
    a = load_split("cifar10", "train", data_root=str(tmp_path))
    first = written["data_batch_1"]
    assert a.images.shape == (20, 3, 32, 32) and a.labels.shape == (20,)
    np.testing.assert_array_equal(a.images[:4], first["data"].reshape(4, 3, 32, 32))
    np.testing.assert_array_equal(a.labels[:4], first["labels"])


class _Tripwire:
    """Unpickling this creates a marker file: proof that the file was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_batches_with_wrong_md5_are_refused_unread(tmp_path):
    _write_batches(tmp_path / cifar10.BATCHES_DIR)
    marker = tmp_path / "was-unpickled"
    (tmp_path / cifar10.BATCHES_DIR / "test_batch").write_bytes(pickle.dumps(_Tripwire(str(marker))))
    with pytest.raises(MalformedArtifact, match="test_batch: MD5 .* refusing to unpickle"):
        load_split("cifar10", "test", data_root=str(tmp_path))
    assert not marker.exists()


def test_restricted_unpickler_allows_only_numpy_arrays(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    protocol3 = pickle.dumps({"data": arr}, protocol=3)
    assert b"numpy._core.multiarray\n_reconstruct" in protocol3
    numpy1 = protocol3.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # as numpy < 2 wrote it
    for data in (protocol3, numpy1, pickle.dumps({"data": arr}, protocol=4)):
        loaded = cifar10._NumpyOnlyUnpickler(io.BytesIO(data)).load()
        np.testing.assert_array_equal(loaded["data"], arr)
    marker = tmp_path / "was-unpickled"
    with pytest.raises(MalformedArtifact, match="refusing to unpickle global (posix|os|nt).mkdir"):
        cifar10._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(_Tripwire(str(marker))))).load()
    assert not marker.exists()
