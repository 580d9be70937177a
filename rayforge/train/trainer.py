"""SGD training that writes the replayable training log (the Proof-of-Learning).

The run is built in a temporary sibling directory and renamed into place only when complete, so a failing or
interrupted run never leaves a partial log at RUN and never overwrites an existing one.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from rayforge.config import Config, dump_config
from rayforge.data import build_dataset, dataset_info
from rayforge.progress import progress_bar
from rayforge.tracking import MetricLogger
from rayforge.train.batches import TensorData, accuracy
from rayforge.io import atomic_write_bytes, atomic_write_json, check_fresh_dir, staged_dir, write_parquet
from rayforge.train.log import ckpt_name, save_checkpoint, steps_table
from rayforge.train.run import hyper_of, new_model, resolve_device, set_determinism
from rayforge.train.schedule import checkpoint_steps, make_plan, steps_per_epoch
from rayforge.train.sgd import train_step, zero_velocity


def train(cfg: Config, out_dir: str | Path, progress: bool = True) -> dict:
    """Train per `cfg`, write the log under `out_dir`, return a summary (accuracies, wall time, steps)."""
    out_dir = Path(out_dir)
    check_fresh_dir(out_dir)
    with staged_dir(out_dir) as tmp_dir:
        (tmp_dir / "trajectory").mkdir()
        return _train_into(cfg, tmp_dir, progress, final_dir=out_dir)


def _train_into(cfg: Config, run_dir: Path, progress: bool, final_dir: Path) -> dict:
    # Resolve the thread count into the logged config: CPU kernels round differently with other thread counts,
    # and an exact replay must use the same one.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=cfg.train.threads or
                                                             torch.get_num_threads()))
    set_determinism(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    ds = build_dataset(cfg.data, cfg.seed)
    info = dataset_info(ds)
    atomic_write_bytes(run_dir / "config.yaml", dump_config(cfg).encode())
    atomic_write_json(run_dir / "dataset.json", info)

    n = len(ds.train.labels)
    plan = make_plan(n, cfg.train, cfg.seed, cfg.data.flip)
    write_parquet(run_dir / "trajectory" / "steps.parquet", steps_table(plan.batches, plan.flips, plan.lrs))
    every = cfg.train.checkpoint_every or steps_per_epoch(n, cfg.train.batch_size)
    ckpts = set(checkpoint_steps(plan.total_steps, every))

    train_data = TensorData(ds.train, ds.mean, ds.std, device)
    test_data = TensorData(ds.test, ds.mean, ds.std, device)
    model = new_model(cfg, info["shape"], device, ds.num_classes)
    velocity = zero_velocity(model)
    hyper = hyper_of(cfg)
    kept_velocity = velocity if hyper.momentum else None  # optimizer state exists only with momentum

    logger = MetricLogger(run_dir, "train", cfg.wandb, cfg.to_dict(), run_name=cfg.name, final_dir=final_dir)
    start = time.perf_counter()
    bar = progress_bar(range(plan.total_steps), desc="train", unit="step", disable=not progress)
    for step in bar:
        if step in ckpts:
            save_checkpoint(run_dir / "trajectory" / ckpt_name(step), model, kept_velocity, step)
        x, y = train_data.batch(plan.batches[step], plan.flips[step])
        loss = train_step(model, velocity, x, y, float(plan.lrs[step]), hyper)
        if step % 10 == 0 or step == plan.total_steps - 1:
            loss_value = float(loss)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_value:.4f}")
            logger.log({"train/loss": loss_value, "train/lr": float(plan.lrs[step])}, step=step)
    save_checkpoint(run_dir / "trajectory" / ckpt_name(plan.total_steps), model, kept_velocity, plan.total_steps)
    wall = time.perf_counter() - start
    summary = {
        "steps": plan.total_steps,
        "train_wall_s": wall,
        "seconds_per_step": wall / plan.total_steps,
        "train_accuracy": accuracy(model, train_data),
        "test_accuracy": accuracy(model, test_data),
        "device": str(device),
    }
    logger.summary(summary)
    logger.close()
    atomic_write_json(run_dir / "train_summary.json", summary)
    return summary
