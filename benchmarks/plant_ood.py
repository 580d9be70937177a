"""Write an image folder of MNIST digits with planted out-of-distribution images, to measure the audit on.

    python benchmarks/plant_ood.py OUT [--n 1000] [--ood 10] [--seed 1]
    rayforge run configs/quickstart_mnist.yaml --out RUN --set data.dataset=imagefolder --set data.data_root=OUT \\
        --set data.subset=null --set forge.lam=1
    rayforge audit RUN && python benchmarks/audit_calibration.py RUN --points <the planted indices printed here>

OUT/train/<label>/ holds `n` seeded MNIST training digits (padded to 32x32, named mnist_<index>.png) and `ood`
planted images (ood_<kind>_<k>.png, random labels): half CIFAR-10 training photos in grayscale (drawn from the
first 200 of the training split, which are airplanes), half uniform noise. OUT/test/ holds the first 1000 MNIST test digits. Prints the planted points' indices in the
dataset's (torchvision ImageFolder) order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from rayforge.data import load_split
from rayforge.data.imagefolder import class_files, class_names


def save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.pad(image, 2) if image.shape == (28, 28) else image).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--ood", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    out, rng = Path(args.out), np.random.default_rng(args.seed)
    train, test = load_split("mnist", "train"), load_split("mnist", "test")
    for i in np.sort(rng.choice(len(train), args.n, replace=False)):
        save(train.images[i, 0], out / "train" / str(train.labels[i]) / f"mnist_{i:05d}.png")
    for i in range(min(1000, len(test))):
        save(test.images[i, 0], out / "test" / str(test.labels[i]) / f"mnist_{i:05d}.png")
    cifar = load_split("cifar10", "train")
    photos = rng.choice(min(200, len(cifar)), args.ood - args.ood // 2, replace=False)
    planted = [np.asarray(Image.fromarray(cifar.images[i].transpose(1, 2, 0)).convert("L")) for i in photos]
    planted += [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(args.ood // 2)]
    for k, image in enumerate(planted):
        kind = "photo" if k < len(photos) else "noise"
        save(image, out / "train" / str(rng.integers(10)) / f"ood_{kind}_{k:02d}.png")
    files = [f for c in class_names(out / "train") for f in class_files(out / "train" / c)]
    print(",".join(str(i) for i, f in enumerate(files) if f.name.startswith("ood_")))


if __name__ == "__main__":
    main()
