"""Candidate-minibatch and per-sample gradients for LeNet5: vmap (`CandidateGradients`) vs hooks
(`GroupedGradients`, `per_sample_gradients`), measured in one run.

    python benchmarks/pergrad.py [--threads 1] [--reps 4] [--candidates 32] [--device cpu|cuda|all] [--skip-phase1]

b=100, LeNet5 (1, 32, 32), random parameters, synthetic data. Each time is the minimum over `--reps` runs after
one warm-up, as wall clock and as process CPU time (the steadier one on a shared machine; one intra-op thread).
  candidates   ms per candidate minibatch gradient, `__call__` on stacked raw tensors (no sample sharing),
               chunk 1, 8, 32, and the ratio vmap / hooks.
  phase 1      ms per candidate of `distances` in the paper's MNIST-10K setting: n=10,000 points in κ=5 parts, a
               part's candidates drawn from the ~8,000 points outside it, μ=200, no flips, chunk 8 (the config
               default); hooks with and without sample deduplication, and with all κ parts' candidates of a step
               in one call (they share θ and the target; the engine forges the parts separately today).
  per-sample   per-sample gradients per second: vmap(grad) over single samples vs `per_sample_gradients`.
Device cpu, and cuda too when available (`--device all`, the default).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from rayforge.data import ImageArrays
from rayforge.forge.fastgrad import GroupedGradients, per_sample_gradients
from rayforge.forge.gradients import CandidateGradients
from rayforge.models import build_model
from rayforge.train.batches import TensorData

SHAPE, B = (1, 32, 32), 100


def timed(fn, reps: int, device: str) -> tuple[float, float]:
    """(wall, CPU) seconds of `fn()`, each the minimum over `reps` runs after one warm-up. On a shared machine the
    process CPU time (one intra-op thread) is the steadier of the two."""
    fn()
    wall = cpu = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        w, c = time.perf_counter(), time.process_time()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu


def synthetic(n: int, device: str, seed: int = 0) -> TensorData:
    rng = np.random.default_rng(seed)
    arrays = ImageArrays(rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.int64))
    return TensorData(arrays, (0.1307,), (0.3081,), device)


def candidates(model, params, data, device, m: int, reps: int):
    rng = np.random.default_rng(1)
    idx = np.stack([rng.choice(len(data), B, replace=False) for _ in range(m)])
    xs, ys = data.stacked(idx, np.zeros_like(idx, dtype=bool))
    print(f"  candidates ({m} minibatches of b={B}, stacked raw tensors, ms per candidate; wall | CPU)")
    print(f"    {'chunk':>5} {'vmap':>8} {'hooks':>8} {'ratio':>7} | {'vmap':>8} {'hooks':>8} {'ratio':>7}")
    for chunk in (1, 8, 32):
        vm, hk = CandidateGradients(model, chunk), GroupedGradients(model, chunk)

        def run_vmap():
            for s in range(0, m, chunk):
                vm(params, xs[s:s + chunk], ys[s:s + chunk])

        (vw, vc), (hw, hc) = timed(run_vmap, reps, device), timed(lambda: hk(params, xs, ys), reps, device)
        print(f"    {chunk:>5} {vw / m * 1e3:8.2f} {hw / m * 1e3:8.2f} {vw / hw:6.2f}x | "
              f"{vc / m * 1e3:8.2f} {hc / m * 1e3:8.2f} {vc / hc:6.2f}x")


def phase1(model, params, device, reps: int, mu: int = 200, chunk: int = 8):
    data = synthetic(10_000, device, seed=2)
    rng = np.random.default_rng(3)
    parts = rng.integers(0, 5, 10_000)  # the κ=5 parts of the points at this step
    by_part = [np.stack([rng.choice(np.flatnonzero(parts != k), B, replace=False) for _ in range(mu)])
               for k in range(5)]  # part k's candidates come from the points outside it
    idx = by_part[0]
    flips = np.zeros_like(idx, dtype=bool)
    distinct = len(np.unique(idx))
    target = torch.randn(sum(p.numel() for p in params.values()), device=device) * 1e-2
    print(f"  phase 1 (distances, mu={mu}, b={B}, chunk={chunk}, {distinct} distinct of {idx.size} drawn "
          f"samples, ms per candidate; wall | CPU)")
    results = {}
    for label, ev in (("vmap", CandidateGradients(model, chunk)),
                      ("hooks, no dedupe", GroupedGradients(model, chunk, dedupe=False)),
                      ("hooks, dedupe", GroupedGradients(model, chunk))):
        wall, cpu = timed(lambda: ev.distances(params, data, idx, flips, target), max(1, reps - 1), device)
        results[label] = (wall * 1e3 / mu, cpu * 1e3 / mu)
    # All κ=5 parts of a step share θ and the target, so one call can take the 5·μ candidates together.
    idx5 = np.concatenate(by_part)
    flips5 = np.zeros_like(idx5, dtype=bool)
    ev = GroupedGradients(model, chunk)
    wall, cpu = timed(lambda: ev.distances(params, data, idx5, flips5, target), max(1, reps - 1), device)
    results["hooks, dedupe, 5 parts per call*"] = (wall * 1e3 / len(idx5), cpu * 1e3 / len(idx5))
    (vw, vc) = results["vmap"]
    for label, (w, c) in results.items():
        print(f"    {label:<32} {w:8.2f} {vw / w:6.2f}x vmap | {c:8.2f} {vc / c:6.2f}x vmap")
    print(f"    * all κ=5 parts' candidates of a step in one call: {len(np.unique(idx5))} distinct of {idx5.size} "
          f"drawn samples")


def per_sample(model, params, data, device, reps: int, n: int = 512):
    x, y = data.x[:n], data.y[:n]

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    vgrad = vmap(grad(loss), in_dims=(None, 0, 0))
    detached = {k: v.detach() for k, v in params.items()}
    (vw, vc) = timed(lambda: vgrad(detached, x, y), reps, device)
    (hw, hc) = timed(lambda: per_sample_gradients(model, params, x, y, chunk=256), reps, device)
    print(f"  per-sample gradients ({n} samples, per second; wall | CPU): vmap {n / vw:7.0f} hooks {n / hw:7.0f} "
          f"{vw / hw:5.2f}x | vmap {n / vc:7.0f} hooks {n / hc:7.0f} {vc / hc:5.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--device", default="all", choices=("cpu", "cuda", "all"))
    parser.add_argument("--skip-phase1", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    for device in devices:
        torch.manual_seed(0)
        model = build_model("lenet5", SHAPE, 10).to(device)
        params = dict(model.named_parameters())
        print(f"lenet5 {SHAPE}, device={device}, threads={torch.get_num_threads()}, torch {torch.__version__}, "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (min of {args.reps} runs)")
        data = synthetic(2_000, device)
        candidates(model, params, data, device, args.candidates, args.reps)
        if not args.skip_phase1:
            phase1(model, params, device, args.reps)
        per_sample(model, params, data, device, args.reps)
        print(f"  load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
