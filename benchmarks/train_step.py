"""Seconds per SGD training step (b=100) for each paper model on this machine, measured in one run.

    python benchmarks/train_step.py [--steps 20] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rayforge.models import build_model
from rayforge.train.sgd import SGDHyper, train_step, zero_velocity

SHAPES = {"lenet5": (1, 32, 32), "resnet_mini": (3, 32, 32), "vgg_mini": (3, 32, 32)}


def seconds_per_step(name: str, steps: int, device: str, batch: int = 100) -> float:
    torch.manual_seed(0)
    model = build_model(name, SHAPES[name], 10).to(device)
    velocity = zero_velocity(model)
    x = torch.randn(batch, *SHAPES[name], device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    hyper = SGDHyper(momentum=0.9, weight_decay=5e-4)
    times = []
    for i in range(steps + 3):  # 3 warm-up steps
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, velocity, x, y, 0.01, hyper)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={torch.get_num_threads()} batch=100 (median of {args.steps} steps)")
    base = None
    for name in SHAPES:
        s = seconds_per_step(name, args.steps, args.device)
        base = base or s
        print(f"{name:<12} {s:8.4f} s/step   {s / base:6.1f}x lenet5")


if __name__ == "__main__":
    main()
