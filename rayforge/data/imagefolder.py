"""The user's own images: `<root>/train/<class>/*` and `<root>/test/<class>/*` (PNG or JPEG), in torchvision's
ImageFolder order.

Order and labels follow `torchvision.datasets.ImageFolder` on `<root>/train`: class names sorted to labels 0..K-1,
and within a class the files in sorted order (recursively, as torchvision walks sub-folders). The test split is
labelled with the training split's classes, so a class missing from test/ does not shift the labels; a test class
unknown to train/ is an error. Every image must have the same size. Channels: 1 when every image is grayscale,
else 3 (grayscale images are then repeated to RGB and alpha is dropped). Pixels stay uint8; normalisation uses the
training split's own per-channel mean and std (`channel_stats`, computed exactly in integers).

Errors name the offending file or folder in one line: an empty class folder, an unreadable or undecodable file,
16-bit or float images, a size different from the others.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from rayforge.data.arrays import ImageArrays
from rayforge.data.cache import Source
from rayforge.errors import MalformedArtifact

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = ("1", "L", "LA")
COLOR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
NEEDS = "train/<class>/*.png|jpg and test/<class>/*.png|jpg under data.data_root (or $RAYFORGE_DATA)"


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def class_names(split_dir: Path) -> list[str]:
    """The class folders of a split, sorted (torchvision's `find_classes`)."""
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def class_files(class_dir: Path) -> list[Path]:
    """The image files of one class, in torchvision's order (sorted walk, sorted names)."""
    return [Path(root) / name for root, _, names in sorted(os.walk(class_dir, followlinks=True))
            for name in sorted(names) if is_image(name)]


def list_split(root: Path, split: str, classes: Sequence[str]) -> list[tuple[int, Path]]:
    """(label, file) for every image of `<root>/<split>`, labelled by `classes` (the training split's)."""
    split_dir = root / split
    label_of = {c: i for i, c in enumerate(classes)}
    out = []
    for name in class_names(split_dir):
        if name not in label_of:
            raise MalformedArtifact(f"{split_dir / name}: class '{name}' is not a class of {root / 'train'}")
        files = class_files(split_dir / name)
        if not files:
            raise MalformedArtifact(f"{split_dir / name}: empty class folder (no .png/.jpg/.jpeg images)")
        out += [(label_of[name], f) for f in files]
    return out


def decode_image(data: bytes, name: str) -> np.ndarray:
    """One encoded image as uint8 (H, W) when grayscale, (H, W, 3) otherwise; `name` is used in errors."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in GRAY_MODES:
                return np.asarray(im.convert("L"))
            if im.mode in COLOR_MODES:
                return np.asarray(im.convert("RGB"))
            raise MalformedArtifact(f"{name}: unsupported image mode {im.mode} (8-bit grayscale or RGB only)")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MalformedArtifact(f"{name}: cannot decode image ({exc})") from None


def stack_images(pixels: list[np.ndarray], names: list[str], size: tuple[int, int] | None = None,
                 channels: int | None = None) -> np.ndarray:
    """Decoded images -> uint8 (N, C, H, W). All must share one size (`size` (H, W) when given, else the first
    image's); C is `channels` when given, else 1 if every image is grayscale and 3 otherwise."""
    if not pixels:
        return np.zeros((0, channels or 1, *(size or (1, 1))), np.uint8)
    h, w = size or pixels[0].shape[:2]
    for p, name in zip(pixels, names):
        if p.shape[:2] != (h, w):
            expected = f"{w}x{h}" + ("" if size else f" like {names[0]}")
            raise MalformedArtifact(f"{name}: image is {p.shape[1]}x{p.shape[0]}, expected {expected}")
    c = channels or (1 if all(p.ndim == 2 for p in pixels) else 3)
    out = np.empty((len(pixels), c, h, w), np.uint8)
    for i, p in enumerate(pixels):
        out[i] = p[None] if p.ndim == 2 else p.transpose(2, 0, 1)  # a gray image broadcasts to every channel
    return out


def decode_split(root: Path, split: str) -> ImageArrays:
    """`<root>/<split>` decoded in torchvision ImageFolder order, labelled by the training split's classes."""
    items = list_split(root, split, class_names(root / "train"))
    if not items:
        raise MalformedArtifact(f"{root / split}: no class folders with images")
    pixels, names = [], []
    for _, path in items:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MalformedArtifact(f"{path}: unreadable ({exc.strerror or exc})") from None
        pixels.append(decode_image(data, str(path)))
        names.append(str(path))
    images = stack_images(pixels, names)
    labels = np.array([label for label, _ in items], np.int64)
    return ImageArrays(np.ascontiguousarray(images), labels)


def check_splits(train: ImageArrays, test: ImageArrays, root: Path) -> None:
    """Both splits must have the same image shape (a model takes one input shape)."""
    if train.images.shape[1:] != test.images.shape[1:]:
        c, h, w = train.images.shape[1:]
        c2, h2, w2 = test.images.shape[1:]
        raise MalformedArtifact(f"{root / 'test'}: images are {w2}x{h2} with {c2} channel(s), the training images "
                                f"{w}x{h} with {c}")


def find_imagefolder(directory: Path, split: str) -> Source | str:
    """The split's files under `directory` (for the cache key), or why they are not there."""
    if not (directory / "train").is_dir():
        return f"no {directory / 'train'}/<class>/ folders"
    if not (directory / split).is_dir():
        return f"no {directory / split}/<class>/ folders"
    classes = class_names(directory / "train")
    class_dirs = [directory / s / c for s in SPLITS if (directory / s).is_dir() for c in class_names(directory / s)]
    files = [f for c in class_names(directory / split) for f in class_files(directory / split / c)]
    key_files = [directory / "train", directory / split, *class_dirs, *files]
    if not classes:
        return f"no class folders in {directory / 'train'}"
    return Source(key_files, lambda: {split: decode_split(directory, split)})


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images in [0, 1] units, from exact integer sums, so every
    machine gets the same floats (normalisation enters every replayed step)."""
    n = images.shape[0] * images.shape[2] * images.shape[3]
    means, stds = [], []
    for c in range(images.shape[1]):
        pixels = images[:, c].astype(np.int64)
        s, ss = int(pixels.sum()), int((pixels * pixels).sum())
        mean = s / n
        var = (ss * n - s * s) / (n * n)  # exact numerator, one rounding
        means.append(mean / 255.0)
        stds.append(max(math.sqrt(var), 1e-3) / 255.0)  # a constant channel must not divide by zero
    return tuple(means), tuple(stds)
