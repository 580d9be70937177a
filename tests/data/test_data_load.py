from __future__ import annotations

import os

import numpy as np
import pytest

from rayforge.data import cache_dir, idx, load_split
from rayforge.errors import RayforgeError

# Read at collection, before the autouse fixture hides $RAYFORGE_DATA: only the real-data test uses it.
REAL_DATA = os.environ.get("RAYFORGE_DATA")


def test_missing_everywhere_lists_every_place_searched(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("RAYFORGE_DATA", str(empty))
    with pytest.raises(RayforgeError) as err:
        load_split("mnist", "train", data_root=str(tmp_path / "nowhere"))
    message = str(err.value)
    assert "\n" not in message
    need = "need train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]"
    assert message.startswith(f"dataset 'mnist' not found: {need}; searched ")
    assert f"data_root={tmp_path / 'nowhere'} (no such dir)" in message
    assert f"$RAYFORGE_DATA={empty} (missing train-images-idx3-ubyte[.gz]" in message
    assert f"download to {cache_dir() / 'downloads'} (failed: RuntimeError: offline (test))" in message


def test_unset_places_are_named(tmp_path):
    with pytest.raises(RayforgeError, match=r"data_root=<unset>, \$RAYFORGE_DATA=<unset>, download to .*offline"):
        load_split("cifar10", "test")


@pytest.mark.parametrize("layout", ["subfolder", "direct"])
def test_lookup_order_and_layouts(tmp_path, monkeypatch, mnist_dir, layout):
    env_root = tmp_path / "env"
    from_env = mnist_dir(env_root / "mnist" if layout == "subfolder" else env_root, seed=1)
    monkeypatch.setenv("RAYFORGE_DATA", str(env_root))
    np.testing.assert_array_equal(load_split("mnist", "test").labels, from_env["test"][1])
    # data_root wins over $RAYFORGE_DATA.
    from_arg = mnist_dir(tmp_path / "arg", seed=2, n_test=7)
    from_arg_loaded = load_split("mnist", "test", data_root=str(tmp_path / "arg"))
    np.testing.assert_array_equal(from_arg_loaded.labels, from_arg["test"][1])


def test_cache_hit_does_not_decode_again(tmp_path, monkeypatch, mnist_dir):
    mnist_dir(tmp_path)
    first = load_split("mnist", "train", data_root=str(tmp_path))
    cached = sorted(p.name for p in (cache_dir() / "arrays").iterdir())
    assert len(cached) == 2 and all(n.startswith("mnist-train-") and n.endswith(".npy") for n in cached)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(idx, "read_idx", no_decoding)
    second = load_split("mnist", "train", data_root=str(tmp_path))
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    # A changed source file (here: its mtime) gets a new key, so it is decoded (here: attempted) again.
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        load_split("mnist", "train", data_root=str(tmp_path))


def test_unknown_names(tmp_path):
    with pytest.raises(RayforgeError,
                       match=r"unknown dataset 'imagenet' \(known: cifar10, imagefolder, mnist, synthetic\)"):
        load_split("imagenet", "train")
    with pytest.raises(RayforgeError, match=r"unknown split 'val'"):
        load_split("mnist", "val")


@pytest.mark.skipif(REAL_DATA is None, reason="RAYFORGE_DATA is not set")
def test_real_mnist_train():
    a = load_split("mnist", "train", data_root=REAL_DATA)
    assert a.images.shape == (60000, 1, 28, 28)
    counts = np.bincount(a.labels, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
