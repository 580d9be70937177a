"""Throughput of rayforge's heavy loops on a CUDA device, printed as ONE JSON line.

    python benchmarks/gpu.py [--device cuda|cpu] [--quick] [--models 8,32,64] [--steps 5] [--threads 1]

LeNet5 on a synthetic MNIST-shaped training set (n=10,000 points of 1x32x32, b=100, one epoch logged: tau=100),
measured on the device in one run:
  train_step_s                  one SGD training step (median of `--steps` after warm-up)
  phase1_<strategy>_s_per_step  phase 1 per step, all kappa=5 parts (paper: mu=200; swap: pool 256)
  phase1_<strategy>_over_train  the same, in training steps
  phase2_sequential             forged models replayed one at a time: models x steps per second
  phase2_batched_<K>            K forged models as one wide model (rayforge.rebuild.stacked): models x steps/s
  phase2_batched_over_sequential_<K>
Phase 2 replays the groups of K sampled points of a swap phase 1 forged here (lambda=1). With no CUDA device and no
`--device cpu`, it prints one line on stderr and exits with status 1. `--device cpu` runs the same code on the CPU
(a dry run: `--quick` shrinks every size so it takes seconds; tests run it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from rayforge.config import config_from_dict  # noqa: E402
from rayforge.forge.engine import ForgeContext, ForgeParams, forge_local, forge_unit  # noqa: E402
from rayforge.rebuild.engine import RebuildContext, rebuild_group, rebuild_groups_batched  # noqa: E402
from rayforge.train.run import TrainingRun, hyper_of  # noqa: E402
from rayforge.train.sgd import train_step  # noqa: E402
from rayforge.train.trainer import train  # noqa: E402


def synced(device: torch.device):
    """A clock that waits for the device's queued work."""
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def make_run(root: Path, device: torch.device, n: int, threads: int) -> TrainingRun:
    cfg = config_from_dict({
        "name": "gpu-bench", "seed": 0,
        "data": {"dataset": "synthetic", "synthetic_train": n, "synthetic_test": 100, "synthetic_shape": [1, 32, 32]},
        "model": {"name": "lenet5"},
        "train": {"epochs": 1, "batch_size": 100, "lr": 0.01, "device": device.type, "threads": threads},
        "forge": {"kappa": 5, "mu": 200, "lam": 1}, "ray": {"actors": 1}, "wandb": {"mode": "disabled"},
    })
    train(cfg, root / "run", progress=False)
    return TrainingRun.open(root / "run")


def train_step_seconds(run: TrainingRun, device: torch.device, steps: int) -> float:
    model, velocity = run.model_at(0, device)
    data = run.tensor_data(run.load_dataset(), device)
    now, times = synced(device), []
    for t in range(steps + 2):
        x, y = data.batch(run.steps.batch[t], run.steps.flip[t])
        start = now()
        train_step(model, velocity, x, y, 0.01, hyper_of(run.cfg))
        if t >= 2:
            times.append(now() - start)
    return statistics.median(times)


def phase1_seconds(run: TrainingRun, device: torch.device, strategy: str, steps: int, **overrides) -> float:
    params = ForgeParams.from_config(run.cfg, strategy=strategy, threads=torch.get_num_threads(), **overrides)
    ctx = ForgeContext(run, params, device)
    forge_unit(ctx, 0, 1, tuple(range(params.kappa)))  # warm-up
    now = synced(device)
    start = now()
    forge_unit(ctx, 0, steps, tuple(range(params.kappa)))
    return (now() - start) / steps


def phase2(run: TrainingRun, device: torch.device, models: list[int], pool: int) -> dict:
    """models x steps per second, sequential and as wide models of K, on the groups of max(models) points."""
    params = ForgeParams.from_config(run.cfg, strategy="swap", threads=torch.get_num_threads(), points=max(models),
                                     pool_size=pool)
    forge_local(run, params, device)
    ctx = RebuildContext(run, "swap", torch.get_num_threads(), device)
    groups = [int(g) for g in ctx.logs.groups]
    now = synced(device)
    rebuild_group(ctx, groups[0])  # warm-up
    start = now()
    steps = sum(rebuild_group(ctx, g).steps for g in groups[:min(models)])
    out = {"phase2_sequential": steps / (now() - start)}
    for k in models:
        chosen = (groups * (-(-k // len(groups))))[:k]  # fewer sampled groups than K: repeat them
        rebuild_groups_batched(ctx, chosen[:2])  # warm-up
        start = now()
        steps = sum(r.steps for r in rebuild_groups_batched(ctx, chosen))
        out[f"phase2_batched_{k}"] = steps / (now() - start)
        out[f"phase2_batched_over_sequential_{k}"] = out[f"phase2_batched_{k}"] / out["phase2_sequential"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the code path")
    parser.add_argument("--models", default="8,32,64", help="K models per wide model (phase 2)")
    parser.add_argument("--steps", type=int, default=5, help="steps timed per phase-1 strategy and for training")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one per worker, as Ray actors use)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device present; nothing measured (--device cpu for a dry run)",
              file=sys.stderr)
        sys.exit(1)
    device = torch.device(args.device)
    models = [int(k) for k in args.models.split(",")]
    n, mu, pool, steps = (1000, 8, 32, 2) if args.quick else (10_000, 200, 256, args.steps)
    if args.quick:
        models = [min(k, 4) for k in models[:2]]
    torch.set_num_threads(args.threads)
    threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), device, n, threads)
        train_s = train_step_seconds(run, device, steps)
        row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "threads": threads, "n": n, "batch": 100, "mu": mu, "pool": pool,
               "train_step_s": train_s}
        for strategy, extra in (("paper", {"mu": mu}), ("swap", {"pool_size": pool})):
            s = phase1_seconds(run, device, strategy, steps, **extra)
            row[f"phase1_{strategy}_s_per_step"] = s
            row[f"phase1_{strategy}_over_train"] = s / train_s
        row.update(phase2(run, device, models, pool))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
