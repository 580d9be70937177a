"""PoR fixtures: tiny runs trained, forged in-process (no Ray) and exported, once per module."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from helpers import forge_in_process
from helpers import tiny_config as shared_tiny_config


def tiny_config(**sections):
    """The shared tiny config, named 'por' (module-scoped fixtures cannot use the `make_config` fixture)."""
    return shared_tiny_config(name="por", **sections)


def build_por(root: Path, cfg, point: int, kappa: int = 2, mu: int = 3, lam: int = 1) -> dict:
    """Train `cfg`, forge, export the PoR of `point` and write the deployed model; paths and the manifest."""
    from rayforge.por import export_por, write_deployed_model
    from rayforge.train.run import TrainingRun
    from rayforge.train.trainer import train

    run_dir, por_dir, deployed = root / "run", root / "por", root / "deployed.safetensors"
    train(cfg, run_dir, progress=False)
    forge_in_process(run_dir, kappa=kappa, mu=mu, lam=lam)
    run = TrainingRun.open(run_dir)
    manifest = export_por(run, "paper", point, por_dir)
    write_deployed_model(run, deployed)
    return {"run_dir": run_dir, "por": por_dir, "deployed": deployed, "manifest": manifest, "root": root}


@pytest.fixture(scope="module")
def plain_por(tmp_path_factory):
    """Logreg on synthetic data, plain SGD, 60 points, 12 steps, checkpoints every 3 steps; groups of 2."""
    root = tmp_path_factory.mktemp("plain")
    return build_por(root, tiny_config(train={"checkpoint_every": 3}), point=7, kappa=2, mu=3, lam=2)


@pytest.fixture(scope="module")
def old_por(plain_por, tmp_path_factory):
    """The plain run's PoR of point 7 as exported before one-step windows (topq_windows=0): the log's checkpoints
    only."""
    from rayforge.por import export_por
    from rayforge.train.run import TrainingRun

    root = tmp_path_factory.mktemp("old")
    manifest = export_por(TrainingRun.open(plain_por["run_dir"]), "paper", 7, root / "por", topq_windows=0)
    return {**plain_por, "por": root / "por", "manifest": manifest}


@pytest.fixture(scope="module")
def modified_por(tmp_path_factory):
    """The paper's modified SGD: momentum, weight decay, cosine annealing, random flips; groups of 3."""
    root = tmp_path_factory.mktemp("modified")
    cfg = tiny_config(data={"flip": True},
                      train={"momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine", "lr": 0.05,
                             "checkpoint_every": 2, "epochs": 2})
    return build_por(root, cfg, point=11, kappa=2, mu=3, lam=3)


# ---------------------------------------------------------------------------------------------- tiny MNIST files

def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_mnist(root: Path, images: np.ndarray, labels: np.ndarray, test_images: np.ndarray,
                test_labels: np.ndarray) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                      ("t10k-images-idx3-ubyte", test_images), ("t10k-labels-idx1-ubyte", test_labels)):
        (root / name).write_bytes(_idx_bytes(arr))
    return root


DUP_POINT, DUP_TWIN = 3, 11  # identical image and label at these two training indices


@pytest.fixture(scope="module")
def mnist_por(tmp_path_factory):
    """MNIST-format files with a duplicated point (index 3 == index 11), logreg, and the PoR of point 3. Also a
    second data root whose training set differs in one pixel."""
    root = tmp_path_factory.mktemp("mnist")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYFORGE_CACHE", str(root / "cache"))
        mp.delenv("RAYFORGE_DATA", raising=False)
        rng = np.random.default_rng(5)
        images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
        labels = (np.arange(20) % 10).astype(np.uint8)
        images[DUP_TWIN], labels[DUP_TWIN] = images[DUP_POINT], labels[DUP_POINT]
        test_images = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
        test_labels = (np.arange(10) % 10).astype(np.uint8)
        data = write_mnist(root / "data", images, labels, test_images, test_labels)
        changed = images.copy()
        changed[0, 14, 14] ^= 1
        other = write_mnist(root / "other", changed, labels, test_images, test_labels)
        cfg = tiny_config(data={"dataset": "mnist", "data_root": str(data)},
                          train={"batch_size": 5, "epochs": 2, "checkpoint_every": 2, "lr": 0.01})
        out = build_por(root, cfg, point=DUP_POINT, kappa=2, mu=3, lam=1)
    out.update(data_root=data, other_root=other, twin=DUP_TWIN)
    return out


# ---------------------------------------------------------------------------------------------- include PoRs

@pytest.fixture(scope="module")
def include_por(plain_por, tmp_path_factory):
    """The include PoR of test point 3 on the plain run (|H| = epochs = 2, one admission per epoch)."""
    from rayforge.por.include import export_include_por
    from rayforge.train.run import TrainingRun

    root = tmp_path_factory.mktemp("include")
    manifest, admitted = export_include_por(TrainingRun.open(plain_por["run_dir"]), root / "por", test_index=3,
                                            progress=False)
    return {**plain_por, "por": root / "por", "manifest": manifest, "admitted": admitted}


# ---------------------------------------------------------------------------------------------- public-data PoRs

@pytest.fixture(scope="module")
def public_por(plain_por, tmp_path_factory):
    """The public-data PoR of the plain run, D_p = its test split (40 points) as an image folder."""
    from rayforge.data.public import write_image_folder
    from rayforge.por.public import export_public_por
    from rayforge.train.run import TrainingRun

    root = tmp_path_factory.mktemp("public")
    run = TrainingRun.open(plain_por["run_dir"])
    public = write_image_folder(run.load_dataset().test, root / "public")
    summary = {}
    manifest = export_public_por(run, public, root / "por", strategy="hybrid", mu=4, pool_size=20, progress=False,
                                 summary=summary)
    return {**plain_por, "por": root / "por", "manifest": manifest, "public": public, "summary": summary}
