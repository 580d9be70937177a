"""Helpers shared by the tests (tests/ is on sys.path through its conftest.py): tiny configs and phase 1 in-process."""

from __future__ import annotations


def tiny_config(**sections):
    """A config small enough to train in well under a second: synthetic data, logreg, 2 epochs."""
    from rayforge.config import config_from_dict

    raw = {
        "name": "tiny",
        "seed": 3,
        "data": {"dataset": "synthetic", "synthetic_train": 60, "synthetic_test": 40, "synthetic_shape": [1, 8, 8]},
        "model": {"name": "logreg"},
        "train": {"epochs": 2, "batch_size": 10, "lr": 0.1, "threads": 1, "device": "cpu"},
        "forge": {"kappa": 2, "mu": 4, "lam": 1},
        "attack": {"shadows": 4},
        "ray": {"actors": 2},
        "wandb": {"mode": "disabled"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return config_from_dict(raw)


def forge_in_process(run_dir, kappa=2, mu=3, lam=2, strategy="paper", points=None, parts_per_unit=None):
    """Phase 1 with the plain functions (no Ray), written where `rayforge forge` writes it."""
    from rayforge.forge.engine import ForgeParams, forge_local
    from rayforge.train.run import TrainingRun

    run = TrainingRun.open(run_dir)
    params = ForgeParams.from_config(run.cfg, strategy=strategy, kappa=kappa, mu=mu, lam=lam, threads=1, chunk=3,
                                     points=points, parts_per_unit=parts_per_unit)
    forge_local(run, params)
    return params


def write_image_folder(root, train, test, names=None):
    """An image folder from uint8 arrays: train/test = (images (N, H, W) or (N, H, W, 3), labels (N,)); class
    folders are the label numbers, file names `names[i]` (default: the zero-padded index). Returns root."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(root)
    for split, (images, labels) in (("train", train), ("test", test)):
        for i, (image, label) in enumerate(zip(images, labels)):
            name = names[i] if (names is not None and split == "train") else f"{i:05d}"
            path = root / split / str(int(label)) / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(image, np.uint8)).save(path)
    return root


def folder_order(root, split="train"):
    """The file of every point of an image folder's split, in the dataset's (torchvision ImageFolder) order."""
    from pathlib import Path

    from rayforge.data.imagefolder import class_files, class_names

    split_dir = Path(root) / split
    return [f for c in class_names(split_dir) for f in class_files(split_dir / c)]


def rebuild_in_process(run_dir, strategy="paper"):
    """Phase 2 with the plain functions (no Ray), written where `rayforge rebuild` writes distances.parquet."""
    from rayforge.io import write_parquet
    from rayforge.rebuild.driver import rebuild_dir
    from rayforge.rebuild.engine import RebuildContext, distances_table, rebuild_group
    from rayforge.train.run import TrainingRun

    ctx = RebuildContext(TrainingRun.open(run_dir), strategy, threads=1)
    out = rebuild_dir(run_dir, strategy)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(out / "distances.parquet", distances_table([rebuild_group(ctx, int(g)).row
                                                              for g in ctx.logs.groups]))
    return out


# ---------------------------------------------------------------------------------------------- PoR tampering

def copy_por(por: dict, tmp_path, name: str = "por"):
    """A copy of a PoR fixture's directory to tamper with."""
    import shutil

    dst = tmp_path / name
    shutil.copytree(por["por"], dst)
    return dst


def edit_steps(por_dir, edit) -> None:
    """Rewrite a PoR's step table after `edit(batches, flips)` changed the lists in place."""
    from rayforge.io import write_parquet
    from rayforge.train.log import read_steps, steps_table

    steps = read_steps(por_dir / "steps.parquet")
    batch, flip = [b.copy() for b in steps.batch], [f.copy() for f in steps.flip]
    edit(batch, flip)
    write_parquet(por_dir / "steps.parquet", steps_table(batch, flip, steps.lr))


def edit_manifest(por_dir, edit) -> None:
    """Rewrite a PoR's por.json after `edit(manifest)`."""
    import json

    m = json.loads((por_dir / "por.json").read_text())
    edit(m)
    (por_dir / "por.json").write_text(json.dumps(m))


def refused(result, code: int, match: str, out) -> None:
    """A CLI result that refused bad input: one line on stderr containing `match`, exit `code`, nothing at `out`
    (not even a staged sibling)."""
    assert result.exit_code == code, result.output
    assert result.stdout == "" and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert match in result.stderr, result.stderr
    assert not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())
