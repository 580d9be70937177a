"""SGD training that writes the replayable training log (the Proof-of-Learning).

Training itself (`training_log`) writes nothing: it yields the log as records (config, dataset record, step table,
checkpoints, metrics, summary), so it runs in this process (`train`) or in a Ray task whose records stream back to the
driver (`rayforge.pipeline.train_stage`), and only the driver writes (`write_log`). The run is built in a temporary
sibling directory and renamed into place only when complete, so a failing or interrupted run never leaves a partial
log at RUN and never overwrites an existing one.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch

from rayforge.config import Config, dump_config
from rayforge.data import Dataset, build_dataset, dataset_info
from rayforge.progress import progress_bar
from rayforge.ray_utils import worker_device
from rayforge.tracking import MetricLogger
from rayforge.train.batches import TensorData, accuracy
from rayforge.io import atomic_write_bytes, atomic_write_json, check_fresh_dir, staged_dir, write_parquet
from rayforge.train.log import ckpt_name, state_tensors, steps_table, write_checkpoint
from rayforge.train.run import hyper_of, new_model, use_threads
from rayforge.train.schedule import checkpoint_steps, make_plan, steps_per_epoch
from rayforge.train.sgd import train_step, zero_velocity


def with_threads(cfg: Config, threads: int | None = None) -> Config:
    """The config with its thread count resolved (`train.threads`, else `threads`, else torch's default): it is
    logged, since CPU kernels round differently with other thread counts and an exact replay must use the same."""
    resolved = cfg.train.threads or threads or torch.get_num_threads()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=resolved))


def train(cfg: Config, out_dir: str | Path, progress: bool = True) -> dict:
    """Train per `cfg` in this process, write the log under `out_dir`, return a summary (accuracies, wall time)."""
    check_fresh_dir(out_dir)
    return write_log(training_log(with_threads(cfg), build_dataset(cfg.data, cfg.seed), progress), out_dir)


def training_log(cfg: Config, ds: Dataset, progress: bool = True) -> Iterator[tuple]:
    """Train on `ds` with `cfg` (threads resolved) and yield the log as it is made, in order:
    ("config", yaml text), ("dataset", record), ("steps", table), then ("checkpoint", step, tensors) and
    ("metrics", step, values) as training goes, and ("summary", values) last."""
    use_threads(cfg.train.threads, "the config")
    device = worker_device(cfg.train.device)
    info = dataset_info(ds)
    yield "config", dump_config(cfg)
    yield "dataset", info
    n = len(ds.train.labels)
    plan = make_plan(n, cfg.train, cfg.seed, cfg.data.flip)
    yield "steps", steps_table(plan.batches, plan.flips, plan.lrs)
    every = cfg.train.checkpoint_every or steps_per_epoch(n, cfg.train.batch_size)
    ckpts = set(checkpoint_steps(plan.total_steps, every))

    train_data = TensorData(ds.train, ds.mean, ds.std, device)
    test_data = TensorData(ds.test, ds.mean, ds.std, device)
    model = new_model(cfg, info["shape"], device, ds.num_classes)
    velocity = zero_velocity(model)
    hyper = hyper_of(cfg)
    kept_velocity = velocity if hyper.momentum else None  # optimizer state exists only with momentum

    start = time.perf_counter()
    bar = progress_bar(range(plan.total_steps), desc="train", unit="step", disable=not progress)
    for step in bar:
        if step in ckpts:
            yield "checkpoint", step, state_tensors(model, kept_velocity)
        x, y = train_data.batch(plan.batches[step], plan.flips[step])
        loss = train_step(model, velocity, x, y, float(plan.lrs[step]), hyper)
        if step % 10 == 0 or step == plan.total_steps - 1:
            loss_value = float(loss)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_value:.4f}")
            yield "metrics", step, {"train/loss": loss_value, "train/lr": float(plan.lrs[step])}
    yield "checkpoint", plan.total_steps, state_tensors(model, kept_velocity)
    wall = time.perf_counter() - start
    yield "summary", {
        "steps": plan.total_steps,
        "train_wall_s": wall,
        "seconds_per_step": wall / plan.total_steps,
        "train_accuracy": accuracy(model, train_data),
        "test_accuracy": accuracy(model, test_data),
        "device": str(device),
    }


def write_log(records: Iterable[tuple], out_dir: str | Path, extra_summary: dict | None = None) -> dict:
    """Write the records of `training_log` as a run directory at `out_dir` (staged: all or nothing); the summary
    (plus `extra_summary`) goes to train_summary.json and is returned."""
    with staged_dir(out_dir) as run_dir:
        (run_dir / "trajectory").mkdir()
        logger, summary = None, None
        try:
            for kind, *payload in records:
                if kind == "config":
                    atomic_write_bytes(run_dir / "config.yaml", payload[0].encode())
                elif kind == "dataset":
                    atomic_write_json(run_dir / "dataset.json", payload[0])
                elif kind == "steps":
                    write_parquet(run_dir / "trajectory" / "steps.parquet", payload[0])
                elif kind == "checkpoint":
                    write_checkpoint(run_dir / "trajectory" / ckpt_name(payload[0]), payload[1], payload[0])
                elif kind == "metrics":
                    if logger is None:  # config.yaml and dataset.json are on disk by now
                        logger = _open_logger(run_dir, Path(out_dir))
                    logger.log(payload[1], step=payload[0])
                elif kind == "summary":
                    summary = {**payload[0], **(extra_summary or {})}
            if summary is None:
                raise RuntimeError("training ended without a summary")
            logger = logger or _open_logger(run_dir, Path(out_dir))
            logger.summary(summary)
        finally:
            if logger is not None:
                logger.close()
        atomic_write_json(run_dir / "train_summary.json", summary)
    return summary


def _open_logger(run_dir: Path, final_dir: Path) -> MetricLogger:
    """The training stage's logger, for the run being built in `run_dir` (renamed to `final_dir` when complete)."""
    import yaml

    from rayforge.config import config_from_dict

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    return MetricLogger(run_dir, "train", cfg.wandb, cfg.to_dict(), run_name=cfg.name, final_dir=final_dir)
