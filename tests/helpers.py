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
    import pyarrow as pa

    from rayforge.forge.engine import (ForgeContext, ForgeParams, forge_dir, forge_unit, plan_units,
                                       prepare_output, unit_table)
    from rayforge.io import write_parquet
    from rayforge.train.run import TrainingRun

    run = TrainingRun.open(run_dir)
    params = ForgeParams.from_config(run.cfg, strategy=strategy, kappa=kappa, mu=mu, lam=lam, threads=1, chunk=3,
                                     points=points, parts_per_unit=parts_per_unit)
    ctx = ForgeContext(run, params)
    tables = [unit_table(forge_unit(ctx, a, b, parts)["columns"])
              for a, b, parts in plan_units(run.checkpoints, kappa, ctx.needed, parts_per_unit)]
    out = forge_dir(run_dir, strategy)
    prepare_output(out, params)
    table = pa.concat_tables(tables).sort_by([("step", "ascending"), ("part", "ascending")]).combine_chunks()
    write_parquet(out / "forged.parquet", table)
    return params
