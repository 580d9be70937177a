"""Finding a dataset's files, and building the exact training/test sets a run uses."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from rayforge.config import DataConfig
from rayforge.data import cifar10, idx, imagefolder
from rayforge.data.arrays import ImageArrays, arrays_sha256
from rayforge.data.cache import Source, cache_dir, cached_arrays
from rayforge.data.synthetic import make_synthetic
from rayforge.errors import RayforgeError

SPLITS = ("train", "test")
KNOWN_DATASETS = ("cifar10", "imagefolder", "mnist", "synthetic")
NUM_CLASSES = 10  # MNIST, CIFAR-10 and the synthetic set; an image folder has as many as its class folders
# Fixed normalization constants (the usual published per-channel values), in [0, 1] pixel units.
MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
DOWNLOAD_TIMEOUT_S = 30  # without it an unreachable host can block urllib forever


@dataclass(frozen=True)
class _FileDataset:
    find: Callable[[Path, str], Source | str]  # a Source found in one directory, or why not
    needs: Callable[[str], str]  # the files a split needs, for the not-found message
    torchvision_class: str  # torchvision.datasets class used to download it
    torchvision_dir: str  # where that class puts the files, under its root


FILE_DATASETS = {
    "mnist": _FileDataset(idx.find_mnist, idx.mnist_needs, "MNIST", "MNIST/raw"),
    "cifar10": _FileDataset(cifar10.find_cifar10, lambda split: cifar10.NEEDS, "CIFAR10", cifar10.BATCHES_DIR),
}


def _check_name(dataset: str) -> None:
    if dataset not in KNOWN_DATASETS:
        raise RayforgeError(f"unknown dataset '{dataset}' (known: {', '.join(KNOWN_DATASETS)})")


def _find_under(spec: _FileDataset, base: Path, dataset: str, split: str) -> Source | str:
    """Look in `<base>/<dataset>/`, then in `<base>` itself (a root of datasets, or the files directly)."""
    reasons = []
    for directory in (base / dataset, base):
        if directory.is_dir():
            found = spec.find(directory, split)
            if isinstance(found, Source):
                return found
            reasons.append(found)
    return "; ".join(reasons)


def _download(spec: _FileDataset, root: Path) -> str | None:
    """Try torchvision's download into `root`; the reason it failed, or None."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        import torchvision.datasets

        getattr(torchvision.datasets, spec.torchvision_class)(str(root), download=True)
        return None
    except Exception as exc:  # offline, host down, bad checksum...: all just mean "not available this way"
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    finally:
        socket.setdefaulttimeout(previous)


def _search(data_root: str | None, probe: Callable[[Path], object],
            fallback: bool = True) -> tuple[object | None, list[str]]:
    """data_root, then (with `fallback`) $RAYFORGE_DATA: the first `probe(directory)` that is not a reason (a str),
    and the reasons."""
    bases = [("data_root", data_root)]
    if fallback:
        bases.append(("$RAYFORGE_DATA", os.environ.get("RAYFORGE_DATA")))
    searched = []
    for label, base in bases:
        if not base:
            searched.append(f"{label}=<unset>")
            continue
        base = Path(base).expanduser()
        found = probe(base) if base.is_dir() else "no such dir"
        if not isinstance(found, str):
            return found, searched
        searched.append(f"{label}={base} ({found})")
    return None, searched


def _locate(dataset: str, split: str, data_root: str | None, fallback: bool = True) -> Source:
    """data_root, then (with `fallback`) $RAYFORGE_DATA and torchvision's download into the cache; one error naming
    every place searched."""
    spec = FILE_DATASETS[dataset]
    found, searched = _search(data_root, lambda base: _find_under(spec, base, dataset, split), fallback)
    if found is not None:
        return found
    if not fallback:
        raise RayforgeError(f"dataset '{dataset}' not found: need {spec.needs(split)}; searched {searched[0]} "
                            f"only (no fallback from an explicit data root)")
    return _downloaded(spec, dataset, split, searched)


def _downloaded(spec: _FileDataset, dataset: str, split: str, searched: list[str]) -> Source:
    """The split from torchvision's download into the cache (reused when present); `searched` names the places
    already tried, for the error."""
    root = cache_dir() / "downloads"
    directory = root / spec.torchvision_dir
    # A previous download is reused; only when it is absent is the (slow, maybe offline) download tried.
    found = spec.find(directory, split) if directory.is_dir() else None
    if not isinstance(found, Source):
        failure = _download(spec, root)
        # Even a failed download may have fetched this split's files (torchvision fetches file by file).
        found = spec.find(directory, split) if directory.is_dir() else "no files after download"
        if not isinstance(found, Source):
            searched.append(f"download to {root} (failed: {failure or found})")
            places = ", ".join(searched)
            raise RayforgeError(f"dataset '{dataset}' not found: need {spec.needs(split)}; searched {places}")
    return found


def folder_root(data_root: str | None, fallback: bool = True) -> Path:
    """An image folder's root: data_root, else (with `fallback`) $RAYFORGE_DATA, whichever holds train/ and test/
    (no download)."""

    def probe(base: Path) -> Path | str:
        missing = [s for s in SPLITS if not (base / s).is_dir()]
        return f"no {', '.join(missing)}/" if missing else base

    found, searched = _search(data_root, probe, fallback)
    if found is not None:
        return found
    raise RayforgeError(f"dataset 'imagefolder' not found: need {imagefolder.NEEDS}; searched {', '.join(searched)}")


def load_split(dataset: str, split: str, data_root: str | None = None, fallback: bool = True) -> ImageArrays:
    """One split of a file dataset as uint8 arrays: MNIST (N, 1, 28, 28), CIFAR-10 (N, 3, 32, 32), an image folder
    (N, C, H, W). Without `fallback`, only `data_root` is searched."""
    _check_name(dataset)
    if dataset == "imagefolder":
        if split not in SPLITS:
            raise RayforgeError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
        root = folder_root(data_root, fallback)
        found = imagefolder.find_imagefolder(root, split)
        if not isinstance(found, Source):
            raise RayforgeError(f"dataset 'imagefolder': {found}")
        return cached_arrays(dataset, split, found)
    if dataset not in FILE_DATASETS:
        raise RayforgeError(f"dataset '{dataset}' is generated, not loaded from files: use build_dataset")
    if split not in SPLITS:
        raise RayforgeError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
    return cached_arrays(dataset, split, _locate(dataset, split, data_root, fallback))


@dataclass(frozen=True)
class Dataset:
    """The exact data of a run: its training set (after subset and padding), test set and normalization."""

    name: str
    train: ImageArrays
    test: ImageArrays
    subset_indices: np.ndarray | None  # int64, sorted, into the full training split; None when all is used
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = NUM_CLASSES
    classes: tuple[str, ...] | None = None  # an image folder's class names, label order


def prepare_points(dataset: str, a: ImageArrays) -> ImageArrays:
    """Points of a split as the run's models see them: MNIST's 28x28 padded with 2 zero pixels on each side to the
    32x32 inputs LeNet-5 was designed for; other datasets as they are."""
    if dataset != "mnist":
        return a
    return ImageArrays(np.pad(a.images, ((0, 0), (0, 0), (2, 2), (2, 2))), a.labels)


def draw_subset(n_available: int, n: int, seed: int) -> np.ndarray:
    """n distinct indices drawn by `seed` (first n of a permutation), sorted so the subset reads as a set."""
    if n > n_available:
        raise RayforgeError(f"config: data.subset={n} exceeds the {n_available} training points available")
    return np.sort(np.random.default_rng(seed).permutation(n_available)[:n]).astype(np.int64)


def _raw_splits(cfg: DataConfig, seed: int, fallback: bool = True) -> tuple[ImageArrays, ImageArrays, tuple, tuple]:
    """(whole training split, test split, mean, std), loaded or generated, before subset and padding. Without
    `fallback`, files are searched for only under cfg.data_root."""
    _check_name(cfg.dataset)
    if cfg.dataset == "synthetic":
        train, test = make_synthetic(cfg.synthetic_train, cfg.synthetic_test, cfg.synthetic_shape, seed)
        channels = train.images.shape[1]
        return train, test, (0.5,) * channels, (0.25,) * channels
    if cfg.dataset == "imagefolder":  # normalised with its whole training split's own statistics
        root = folder_root(cfg.data_root, fallback)
        train, test = (load_split("imagefolder", split, str(root), fallback=False) for split in SPLITS)
        imagefolder.check_splits(train, test, root)
        return train, test, *imagefolder.channel_stats(train.images)
    train, test = (load_split(cfg.dataset, split, cfg.data_root, fallback) for split in SPLITS)
    return train, test, *MEAN_STD[cfg.dataset]


def _classes(cfg: DataConfig, train: ImageArrays, fallback: bool) -> tuple[str, ...] | None:
    """An image folder's class names in label order (None for the 10-class datasets)."""
    if cfg.dataset != "imagefolder":
        return None
    root = folder_root(cfg.data_root, fallback)
    classes = tuple(imagefolder.class_names(root / "train"))
    if len(train) and train.labels.max() >= len(classes):  # a stale cache cannot get here: its key covers the folders
        raise RayforgeError(f"{root}: labels do not match the {len(classes)} class folders")
    return classes


def training_split(cfg: DataConfig, seed: int, fallback: bool = True) -> ImageArrays:
    """The whole training split a run's D is drawn from (before `subset`; not padded: see `prepare_points`).
    `Dataset.subset_indices` index into it."""
    return _raw_splits(cfg, seed, fallback)[0]


def build_dataset(cfg: DataConfig, seed: int, fallback: bool = True) -> Dataset:
    """The run's data: loaded (or generated), subset by `seed` when cfg.subset is set, MNIST padded to 32x32.
    Without `fallback`, files are searched for only under cfg.data_root."""
    train, test, mean, std = _raw_splits(cfg, seed, fallback)
    classes = _classes(cfg, train, fallback)
    chosen = None
    if cfg.subset is not None:
        chosen = draw_subset(len(train), cfg.subset, seed)
        train = train.take(chosen)
    train, test = prepare_points(cfg.dataset, train), prepare_points(cfg.dataset, test)
    return Dataset(cfg.dataset, train, test, chosen, mean, std, NUM_CLASSES if classes is None else len(classes),
                   classes)


def dataset_info(ds: Dataset) -> dict:
    """A JSON-ready summary that pins the data down: sizes, shape, subset, content hashes, normalization."""
    return {
        "dataset": ds.name,
        "n": len(ds.train),
        "n_test": len(ds.test),
        "shape": list(ds.train.images.shape[1:]),
        "subset_indices": None if ds.subset_indices is None else ds.subset_indices.tolist(),
        "train_sha256": arrays_sha256(ds.train),
        "test_sha256": arrays_sha256(ds.test),
        "mean": list(ds.mean),
        "std": list(ds.std),
        "num_classes": ds.num_classes,
        **({"classes": list(ds.classes)} if ds.classes is not None else {}),
    }
