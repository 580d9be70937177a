"""CIFAR-10 from an image-folder tree (unpacked or as a tar archive) or torchvision's `cifar-10-batches-py`."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterable

import numpy as np
from rayforge.data.arrays import ImageArrays
from rayforge.data.cache import Source
from rayforge.data.imagefolder import decode_image, stack_images
from rayforge.errors import MalformedArtifact

ARCHIVE = "cifar10-jpeg.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")
# The canonical MD5s torchvision lists for the pickled batches (torchvision.datasets.CIFAR10).
BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
NEEDS = f"train/<class>/*.jpg + test/<class>/*.jpg, {ARCHIVE}, or {BATCHES_DIR}/{{data_batch_1..5,test_batch}}"


# ---- image-folder layout: <split>/<class>/<file>, labels = classes sorted by name --------------------------


def _decode_entries(entries: list[tuple[str, str, bytes]], classes: set[str], origin: Path) -> ImageArrays:
    """Decode (class, filename, encoded bytes) entries in (class, filename) order, labelled by sorted class."""
    label_of = {c: i for i, c in enumerate(sorted(classes))}
    entries.sort(key=lambda e: (e[0], e[1]))
    names = [f"{origin}: image {cls}/{name}" for cls, name, _ in entries]
    pixels = [decode_image(data, name) for (_, _, data), name in zip(entries, names)]
    images = stack_images(pixels, names, size=(32, 32), channels=3)
    labels = np.array([label_of[cls] for cls, _, _ in entries], np.int64)
    return ImageArrays(images, labels)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _class_dirs(root: Path) -> list[Path]:
    return [d for split in SPLITS if (root / split).is_dir() for d in sorted((root / split).iterdir()) if d.is_dir()]


def _folder_files(root: Path, split: str) -> list[Path]:
    return [f for d in _class_dirs(root) if d.parent.name == split for f in sorted(d.iterdir()) if _is_image(f.name)]


def decode_folder(root: Path, split: str) -> ImageArrays:
    """An unpacked `<root>/<split>/<class>/*.jpg` tree; classes are those of train/ and test/ together."""
    classes = {d.name for d in _class_dirs(root)}
    entries = [(f.parent.name, f.name, f.read_bytes()) for f in _folder_files(root, split)]
    return _decode_entries(entries, classes, root)


def decode_archive(path: Path, split: str) -> dict[str, ImageArrays]:
    """The same tree inside a tar archive, read as one stream (no unpacking to disk).

    Both splits are decoded: the stream must be read to its end anyway (for the class list), and this way a
    second split costs a cache hit instead of another pass over the whole archive.
    """
    entries: dict[str, list] = {s: [] for s in SPLITS}
    classes = set()
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                # Match on the last three components, so a leading top-level folder is fine.
                if member.isfile() and len(parts) >= 3 and parts[-3] in SPLITS and _is_image(parts[-1]):
                    classes.add(parts[-2])
                    entries[parts[-3]].append((parts[-2], parts[-1], tar.extractfile(member).read()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise MalformedArtifact(f"{path}: unreadable tar archive ({exc})") from None
    if not entries[split]:
        raise MalformedArtifact(f"{path}: no {split}/<class>/*.jpg images in the archive")
    return {s: _decode_entries(e, classes, path) for s, e in entries.items() if e}


# ---- torchvision's pickled batches ------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickling can run arbitrary code, and this project never unpickles untrusted input.

    The batches are only read after their MD5 matched the canonical release; as a second wall, this unpickler
    resolves nothing but the globals numpy needs to rebuild an array, so even a file that got past the MD5
    check cannot call anything else.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # how numpy < 2 (the 2009 release's numpy) names it
        ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise MalformedArtifact(f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed")
        if name == "_reconstruct":
            # Resolve to this numpy's own function, whichever module name the file was written with.
            return np.ndarray.__reduce__(np.empty(0))[0]
        return getattr(np, name)


def load_batch(path: Path) -> dict:
    """One pickled batch, refused unless its MD5 is the canonical one."""
    raw = path.read_bytes()
    digest, canonical = hashlib.md5(raw).hexdigest(), BATCH_MD5[path.name]
    if digest != canonical:
        raise MalformedArtifact(f"{path}: MD5 {digest} is not the canonical {canonical}; refusing to unpickle it")
    try:
        # latin1: the batches were pickled by Python 2, whose str holds numpy's raw bytes.
        return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except MalformedArtifact:
        raise
    except Exception as exc:  # any unpickling failure is a bad file, whatever the exception type
        raise MalformedArtifact(f"{path}: cannot unpickle ({exc})") from None


def decode_batches(paths: Iterable[Path]) -> ImageArrays:
    """The batches' rows (3072 bytes: R, G, B planes of 32x32) and labels, in file order."""
    images, labels = [], []
    for path in paths:
        batch = load_batch(path)
        data, batch_labels = batch.get("data"), batch.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise MalformedArtifact(f"{path}: 'data' is not a uint8 (N, 3072) array")
        if batch_labels is None or len(batch_labels) != len(data):
            raise MalformedArtifact(f"{path}: 'labels' missing or not one per image")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch_labels, np.int64))
    return ImageArrays(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


# ---- lookup -------------------------------------------------------------------------------------------------


def find_cifar10(directory: Path, split: str) -> Source | str:
    """The first CIFAR-10 layout present in `directory`, or why there is none."""
    if (directory / split).is_dir():
        files = _folder_files(directory, split)
        if not files:
            return f"no images under {directory / split}/<class>/"
        return Source([*_class_dirs(directory), *files], lambda: {split: decode_folder(directory, split)})
    if (directory / ARCHIVE).is_file():
        archive = directory / ARCHIVE
        return Source([archive], lambda: decode_archive(archive, split))
    for batches_dir in (directory / BATCHES_DIR, directory):
        paths = [batches_dir / name for name in BATCHES[split]]
        present = [p for p in paths if p.is_file()]
        if present and len(present) < len(paths):
            return f"incomplete {batches_dir}: missing {', '.join(p.name for p in paths if p not in present)}"
        if present:
            return Source(paths, lambda: {split: decode_batches(paths)})
    return f"no CIFAR-10 files in {directory}"
