"""Phase-1 cost, measured in one run: forge wall time / train wall time, gradient evaluations per step,
candidates per second, and the speed-up of Algorithm 2 over Algorithm 1 (Thudi et al.) for the same points.

    python benchmarks/forge_cost.py [--quickstart-run RUN] [--mnist10k-run RUN] [--steps 2] [--points 3]

Settings:
  quickstart   the whole of phase 1 on Ray (`run_forge`, config's κ, μ and actors), end to end.
  mnist10k     MNIST LeNet5 n=10K, τ=2K (the paper's sampling setting, κ=5, μ=200). Forging all of it here would
               take ~20 CPU-hours, so the first `--steps` steps are forged in-process (1 thread per worker, as
               each Ray actor uses) and the full cost is extrapolated linearly in steps; this is said in the output.
Algorithm 1 vs 2: per step, Algorithm 2 evaluates κ·μ candidates for ALL n points; Algorithm 1 evaluates μ for ONE
point. Both are timed on the same steps of the same log with the same μ; speed-up for n points =
n · t(Alg. 1 per point-step) / t(Alg. 2 per step). (Phase 2's n·τ/λ replays are measured by the rebuild benchmark.)
Runs are trained first when the given run directory does not exist (needs RAYFORGE_DATA).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

from rayforge.config import load_config  # noqa: E402
from rayforge.forge.algorithm1 import forge_point_naive  # noqa: E402
from rayforge.forge.driver import run_forge  # noqa: E402
from rayforge.forge.engine import ForgeContext, ForgeParams, forge_unit  # noqa: E402
from rayforge.train.run import TrainingRun  # noqa: E402
from rayforge.train.trainer import train  # noqa: E402
from rayforge.io import atomic_write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def ensure_run(config: str, run_dir: Path) -> TrainingRun:
    if not (run_dir / "trajectory").is_dir():
        train(load_config(ROOT / "configs" / config), run_dir)
    return TrainingRun.open(run_dir)


def time_algorithms(run: TrainingRun, params: ForgeParams, steps: int, points: int) -> dict:
    """Seconds per step of Algorithm 2 (all κ parts) and per point-step of Algorithm 1, same steps and μ."""
    ctx = ForgeContext(run, params)
    forge_unit(ctx, 0, 1, 0)  # warm-up (first gradient call)
    start = time.perf_counter()
    forge_unit(ctx, 0, steps, tuple(range(params.kappa)))
    alg2 = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    for point in range(points):
        forge_point_naive(run, point, params.mu, params.seed, steps=range(0, steps), chunk=params.chunk,
                          threads=params.threads, data=ctx.data, grad_method=params.grad_method)
    alg1 = (time.perf_counter() - start) / (steps * points)
    return {"alg2_s_per_step": alg2, "alg1_s_per_point_step": alg1}


def report(name: str, run: TrainingRun, params: ForgeParams, timing: dict, forge_wall: float, evals_per_step: float,
           cand_per_s: float, note: str) -> dict:
    n, tau = int(run.info["n"]), run.total_steps
    train_wall = json.loads((run.run_dir / "train_summary.json").read_text())["train_wall_s"]
    speedup = n * timing["alg1_s_per_point_step"] / timing["alg2_s_per_step"]
    row = {"setting": name, "n": n, "tau": tau, "kappa": params.kappa, "mu": params.mu,
           "train_wall_s": train_wall, "forge_wall_s": forge_wall, "forge_over_train": forge_wall / train_wall,
           "grad_evals_per_step": evals_per_step, "candidates_per_s": cand_per_s,
           "alg2_s_per_step": timing["alg2_s_per_step"], "alg1_s_per_point_step": timing["alg1_s_per_point_step"],
           "speedup_alg2_over_alg1_all_n": speedup, "note": note}
    print(f"\n[{name}] n={n} tau={tau} kappa={params.kappa} mu={params.mu}  ({note})")
    print(f"  forge wall / train wall      {forge_wall:10.1f} s / {train_wall:.1f} s = {forge_wall / train_wall:,.1f}x")
    print(f"  gradient evaluations / step  {evals_per_step:10.0f}")
    print(f"  candidates / s               {cand_per_s:10.1f}")
    print(f"  Alg. 2: {timing['alg2_s_per_step']:.2f} s/step for all n points;  Alg. 1: "
          f"{timing['alg1_s_per_point_step']:.3f} s per point-step")
    print(f"  speed-up of Alg. 2 over Alg. 1 for all n={n} points: {speedup:,.0f}x "
          f"(paper's count n/κ = {n / params.kappa:,.0f}x before phase 2)")
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart-run", type=Path, default=ROOT / "runs" / "bench-quickstart")
    parser.add_argument("--mnist10k-run", type=Path, default=ROOT / "runs" / "bench-mnist10k")
    parser.add_argument("--steps", type=int, default=2, help="steps timed for Algorithm 1 vs 2 (and n=10K)")
    parser.add_argument("--points", type=int, default=3, help="points forged with Algorithm 1")
    parser.add_argument("--skip-mnist10k", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = []

    run = ensure_run("quickstart_mnist.yaml", args.quickstart_run)
    params = ForgeParams.from_config(run.cfg)
    summary = run_forge(run.run_dir, params, run.cfg.ray.actors, run.cfg.ray, run.cfg.wandb)
    timing = time_algorithms(run, params, args.steps, args.points)
    rows.append(report("quickstart", run, params, timing, summary["forge_wall_s"], summary["grad_evals_per_step"],
                       summary["candidates_per_s"], f"all of phase 1 on Ray, {run.cfg.ray.actors} actors"))

    if not args.skip_mnist10k:
        run = ensure_run("mnist_lenet5_10k.yaml", args.mnist10k_run)
        params = ForgeParams.from_config(run.cfg)
        timing = time_algorithms(run, params, args.steps, args.points)
        actors = run.cfg.ray.actors
        forge_wall = timing["alg2_s_per_step"] * run.total_steps / actors
        evals = params.kappa * (params.mu + 1)
        rows.append(report("mnist10k", run, params, timing, forge_wall, evals, evals / timing["alg2_s_per_step"],
                           f"extrapolated from {args.steps} forged steps to tau, {actors} actors of 1 thread"))
    if args.json:
        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
