"""Public data D_p for public-data PoRs: the training split of an image folder, `<root>/train/<class>/*`.

Order and labels follow torchvision's ImageFolder (`rayforge.data.imagefolder`): class folders sorted to labels
0..K-1, so they must sort into the model's label order (for MNIST and CIFAR-10: folders 0..9). Images must already
have the model's input shape: D_p's hash is of its files' pixels as decoded, which a verifier recomputes without
knowing how the owner's training data were prepared (an MNIST run takes 32x32 digits, padded by 2 pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from rayforge.data import imagefolder
from rayforge.data.arrays import ImageArrays
from rayforge.data.cache import Source, cached_arrays
from rayforge.errors import RayforgeError


def load_public(root: str | Path) -> ImageArrays:
    """D_p from `<root>/train/<class>/*` (decoded once, then cached); one-line errors for a missing or bad folder."""
    root = Path(root).expanduser()
    if not (root / "train").is_dir():
        raise RayforgeError(f"public dataset '{root}': no train/<class>/ folders (the image-folder layout)")
    classes = imagefolder.class_names(root / "train")
    if classes and all(c.isdigit() for c in classes) and classes != [str(i) for i in range(len(classes))]:
        raise RayforgeError(f"public dataset '{root}': class folders named by number must be 0..{len(classes) - 1} "
                            f"(labels come from their sorted order), got {', '.join(classes[:12])}")
    found = imagefolder.find_imagefolder(root, "train")
    if not isinstance(found, Source):
        raise RayforgeError(f"public dataset '{root}': {found}")
    return cached_arrays("imagefolder", "train", found)


def write_image_folder(arrays: ImageArrays, root: str | Path) -> Path:
    """Write `arrays` as `<root>/train/<label>/<index>.png` (lossless; labels 0..9 sort as numbers): a split of
    MNIST or CIFAR-10 as a stand-in public dataset. `root` must not exist."""
    root = Path(root)
    if root.exists():
        raise RayforgeError(f"refusing to overwrite '{root}'")
    if len(arrays) and int(arrays.labels.max()) > 9:
        raise RayforgeError("write_image_folder names class folders 0..9; labels above 9 would not sort as numbers")
    for i, (image, label) in enumerate(zip(arrays.images, arrays.labels)):
        folder = root / "train" / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")
    return root
