"""The user's own image folders: torchvision ImageFolder order, channels, own normalisation, cache, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayforge.config import DataConfig
from rayforge.data import build_dataset, dataset_info, load_split
from rayforge.data.imagefolder import channel_stats
from rayforge.errors import MalformedArtifact, RayforgeError


def write_folder(root: Path, layout: dict, size=(6, 5), mode="L", seed=0, ext="png") -> Path:
    """layout: {split: {class: count}}; random pixels, files named so that sorting differs from creation order."""
    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for cls, count in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for k in reversed(range(count)):
                shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                    root / split / cls / f"img{k:03d}.{ext}")
    return root


LAYOUT = {"train": {"dog": 3, "cat": 4, "ant": 2}, "test": {"cat": 2, "dog": 1, "ant": 1}}


def test_order_and_labels_match_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    root = write_folder(tmp_path / "data", LAYOUT)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored, as torchvision ignores it
    (root / "train" / "cat" / "sub").mkdir()
    Image.fromarray(np.zeros((5, 6), np.uint8), "L").save(root / "train" / "cat" / "sub" / "a.png")  # walked too
    for split in ("train", "test"):
        ours = load_split("imagefolder", split, str(root))
        theirs = ImageFolder(str(root / split))
        assert [label for _, label in theirs.samples] == ours.labels.tolist()
        expected = np.stack([np.asarray(Image.open(path)) for path, _ in theirs.samples])[:, None]
        np.testing.assert_array_equal(ours.images, expected)
        assert ours.images.shape[1:] == (1, 5, 6)


def test_rgb_and_mixed_channels(tmp_path):
    root = write_folder(tmp_path / "rgb", {"train": {"a": 2, "b": 2}, "test": {"a": 1}}, mode="RGB", ext="jpg")
    assert load_split("imagefolder", "train", str(root)).images.shape == (4, 3, 5, 6)
    mixed = write_folder(tmp_path / "mixed", {"train": {"a": 2}, "test": {"a": 1}}, mode="L")
    Image.fromarray(np.full((5, 6, 3), 7, np.uint8), "RGB").save(mixed / "train" / "a" / "z.png")
    arrays = load_split("imagefolder", "train", str(mixed))
    assert arrays.images.shape == (3, 3, 5, 6)  # any color image makes every image RGB
    gray = np.asarray(Image.open(mixed / "train" / "a" / "img000.png"))
    assert all(np.array_equal(arrays.images[0, c], gray) for c in range(3))


def test_dataset_normalised_with_own_stats_and_recorded(tmp_path):
    root = write_folder(tmp_path / "data", LAYOUT)
    ds = build_dataset(DataConfig(dataset="imagefolder", data_root=str(root)), 0)
    pixels = ds.train.images.astype(np.float64) / 255
    assert ds.mean == pytest.approx((pixels.mean(),), abs=1e-12) and ds.std == pytest.approx((pixels.std(),), abs=1e-12)
    assert ds.num_classes == 3 and ds.classes == ("ant", "cat", "dog")
    info = json.loads(json.dumps(dataset_info(ds)))
    assert info["classes"] == ["ant", "cat", "dog"] and info["num_classes"] == 3 and info["n"] == 9
    sub = build_dataset(DataConfig(dataset="imagefolder", data_root=str(root), subset=4), 1)
    assert len(sub.train) == 4 and sub.mean == ds.mean  # the split's statistics, not the subset's
    assert channel_stats(np.full((2, 1, 3, 3), 9, np.uint8))[1][0] > 0  # a constant image cannot divide by zero


def test_cached_like_the_others(tmp_path, monkeypatch):
    import rayforge.data.imagefolder as imagefolder

    root = write_folder(tmp_path / "data", LAYOUT)
    first = load_split("imagefolder", "train", str(root))

    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(imagefolder, "decode_split", no_decoding)
    np.testing.assert_array_equal(load_split("imagefolder", "train", str(root)).images, first.images)
    Image.fromarray(np.zeros((5, 6), np.uint8), "L").save(root / "train" / "ant" / "new.png")
    with pytest.raises(AssertionError, match="decoded again"):
        load_split("imagefolder", "train", str(root))


@pytest.mark.parametrize("problem, match", [
    ("size", r"dog/img001\.png: image is 7x5, expected 6x5 like .*ant/img000\.png"),
    ("empty", r"train/empty: empty class folder"),
    ("unreadable", r"cat/img002\.png: cannot decode image"),
    ("unknown_class", r"test/zebra: class 'zebra' is not a class of"),
    ("sixteen_bit", r"ant/img001\.png: unsupported image mode I;16"),
])
def test_errors_name_the_file(tmp_path, problem, match):
    root = write_folder(tmp_path / "data", LAYOUT)
    if problem == "size":
        Image.fromarray(np.zeros((5, 7), np.uint8), "L").save(root / "train" / "dog" / "img001.png")
    elif problem == "empty":
        (root / "train" / "empty").mkdir()
    elif problem == "unreadable":
        (root / "train" / "cat" / "img002.png").write_bytes(b"not a png at all")
    elif problem == "unknown_class":
        write_folder(root, {"test": {"zebra": 1}})
    else:
        Image.fromarray(np.zeros((5, 6), np.uint16)).save(root / "train" / "ant" / "img001.png")  # mode I;16
    with pytest.raises(MalformedArtifact, match=match) as info:
        build_dataset(DataConfig(dataset="imagefolder", data_root=str(root)), 0)
    assert "\n" not in str(info.value)


def test_missing_folder_and_split_shapes(tmp_path):
    with pytest.raises(RayforgeError, match=r"dataset 'imagefolder' not found: .*data_root=.*nowhere \(no such dir"):
        build_dataset(DataConfig(dataset="imagefolder", data_root=str(tmp_path / "nowhere")), 0)
    root = write_folder(tmp_path / "data", {"train": {"a": 2}})
    write_folder(root, {"test": {"a": 1}}, size=(4, 4))
    with pytest.raises(MalformedArtifact, match=r"test: images are 4x4 with 1 channel\(s\), the training images 6x5"):
        build_dataset(DataConfig(dataset="imagefolder", data_root=str(root)), 0)
