"""`paper` vs `swap` (and `hybrid`) on the same training log, side by side, measured in one run.

    python benchmarks/strategies.py RUN [--points 20] [--steps 3] [--reps 2] [--swap-kappa 20] [--swap-pool 96]
                                        [--hybrid] [--skip-full] [--json OUT]

`paper` runs with the config's κ and μ; `swap` (and `hybrid`) with `--swap-kappa` and `--swap-pool` (swap replaces
the b/κ members of D_k in each batch, so a larger κ means fewer substitutes and a smaller error, at the cost of a
matching per part; its pool of per-sample gradients is shared by all parts of a step).

Three measurements, each ratio from numbers taken in this run (the load of a shared machine hits both sides):
  per step     every κ part of the first `--steps` steps forged in-process with one thread (as each Ray actor
               does), interleaved with a training step of the same steps, also one thread: seconds per step, wall
               and process CPU, minimum over `--reps` rounds, as multiples of the training step;
  all points   phase 1 of `swap` for ALL points on Ray (the config's actors) against a training of the same
               config, both run now into a temporary directory: forge wall / train wall (`forge_over_train` of
               the forge summary), and the forging error;
  quality      phase 1 for the groups of `--points` sampled points (the sampling approximation; the same sample
               for every strategy, resumed if already on disk), then phase 2 with the attacks (shadows shared
               between strategies) and the paper's metrics: grad_error/grad_norm, d_θ (median, p90), the
               uniformity ℓ1 of Table IV and c_A^Diff per attack. Ratios are against `paper`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from rayforge.attacks.driver import run_attack  # noqa: E402
from rayforge.forge.driver import run_forge  # noqa: E402
from rayforge.io import atomic_write_json  # noqa: E402
from rayforge.forge.engine import ForgeContext, ForgeParams, forge_unit  # noqa: E402
from rayforge.report.metrics import compute_metrics  # noqa: E402
from rayforge.train.replay import replay_steps  # noqa: E402
from rayforge.train.run import TrainingRun  # noqa: E402
from rayforge.train.trainer import train  # noqa: E402


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float], steps: int) -> tuple[float, float]:
    wall, cpu = clock()
    return (wall - start[0]) / steps, (cpu - start[1]) / steps


def per_step_costs(run: TrainingRun, params: dict[str, ForgeParams], steps: int, reps: int) -> dict:
    """{name: (wall, cpu) seconds per step} for 'train' and every strategy (all parts, no sampling), one thread."""
    torch.set_num_threads(1)
    strategies = list(params)
    contexts = {}
    for s, p in params.items():
        contexts[s] = ForgeContext(run, dataclasses.replace(p, threads=1, points=None))
        forge_unit(contexts[s], 0, 1, 0)  # warm-up
    data, hyper = contexts[strategies[0]].data, contexts[strategies[0]].hyper
    best: dict[str, tuple[float, float]] = {}

    def keep(name, value):
        old = best.get(name, (float("inf"), float("inf")))
        best[name] = (min(old[0], value[0]), min(old[1], value[1]))

    for _ in range(reps):
        for s in ["train"] + strategies:
            if s == "train":
                model, velocity = run.model_at(0, data.device)
                start = clock()
                replay_steps(model, velocity, data, run.steps, 0, steps, hyper)
            else:
                start = clock()
                forge_unit(contexts[s], 0, steps, tuple(range(params[s].kappa)))
            keep(s, since(start, steps))
    return best


def all_points(run: TrainingRun, params: ForgeParams) -> dict:
    """Train the run's config and forge all of it with `params` on Ray, both now, in a temporary directory."""
    cfg = run.cfg
    with tempfile.TemporaryDirectory(dir=run.run_dir.parent) as tmp:
        trained = train(cfg, Path(tmp) / "run", progress=False)
        summary = run_forge(Path(tmp) / "run", dataclasses.replace(params, points=None), cfg.ray.actors, cfg.ray,
                            cfg.wandb)
    return {"train_wall_s": trained["train_wall_s"], **summary}


def quality(run: TrainingRun, params: ForgeParams) -> dict:
    cfg, strategy = run.cfg, params.strategy
    forge = run_forge(run.run_dir, params, cfg.ray.actors, cfg.ray, cfg.wandb)
    run_attack(run.run_dir, strategy, cfg.ray.actors, cfg.ray, cfg.wandb)
    metrics, _ = compute_metrics(run.run_dir, strategy)
    return {
        "rel_error_median": forge["rel_error_median"], "rel_error_p90": forge["rel_error_p90"],
        "d_theta_median": metrics["d_theta"]["median"], "d_theta_p90": metrics["d_theta"]["p90"],
        "uniformity_l1": metrics["uniformity_l1"]["mean"], "uniformity_l1_stderr": metrics["uniformity_l1"]["stderr"],
        "c_diff": {a: m["c_diff"] for a, m in metrics["attacks"].items()},
        "evaluated_points": metrics["setting"]["evaluated_points"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--swap-kappa", type=int, default=20, help="κ for swap and hybrid (paper: the config's)")
    parser.add_argument("--swap-pool", type=int, default=96, help="pool size for swap and hybrid")
    parser.add_argument("--hybrid", action="store_true")
    parser.add_argument("--skip-full", action="store_true", help="skip the all-points phase 1")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    run = TrainingRun.open(args.run)
    cfg = run.cfg
    names = ["paper", "swap"] + (["hybrid"] if args.hybrid else [])
    params = {s: ForgeParams.from_config(cfg, strategy=s, points=args.points, **(
        {} if s == "paper" else {"kappa": args.swap_kappa, "pool_size": args.swap_pool})) for s in names}
    load = [os.getloadavg()[0]]
    costs = per_step_costs(run, params, args.steps, args.reps)
    print("per step (wall, CPU seconds, 1 thread):", json.dumps(costs), flush=True)
    full = None if args.skip_full else all_points(run, params["swap"])
    print("all points, swap:", json.dumps(full), f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = {s: quality(run, p) for s, p in params.items()}
    load.append(os.getloadavg()[0])
    for s in names:
        rows[s].update(wall_s_per_step=costs[s][0], cpu_s_per_step=costs[s][1],
                       wall_over_train=costs[s][0] / costs["train"][0], cpu_over_train=costs[s][1] / costs["train"][1])
    base = rows["paper"]
    print(f"\n{run.run_dir}: n={run.info['n']} tau={run.total_steps}; paper kappa={cfg.forge.kappa} mu={cfg.forge.mu}; "
          f"swap kappa={args.swap_kappa} pool={args.swap_pool}; {base['evaluated_points']} sampled points "
          f"(lam={cfg.forge.lam}); "
          f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end, on {os.cpu_count()} CPUs")
    print(f"{'':36}" + "".join(f"{n:>14}" for n in names) + "   " + "  ".join(f"{n}/paper" for n in names[1:]))

    def line(label, key, fmt="{:14.4g}"):
        values = [rows[n][key] for n in names]
        ratios = "  ".join(f"{rows[n][key] / base[key]:10.3g}x" if base[key] else "         -" for n in names[1:])
        print(f"{label:36}" + "".join(fmt.format(v) for v in values) + "   " + ratios)

    print(f"training step, 1 thread: {costs['train'][0]:.4f} s wall, {costs['train'][1]:.4f} s CPU")
    line("phase 1 per step (s wall, 1 thread)", "wall_s_per_step")
    line("  in training steps (wall)", "wall_over_train")
    line("  in training steps (CPU)", "cpu_over_train")
    line("grad_error/grad_norm median", "rel_error_median")
    line("grad_error/grad_norm p90", "rel_error_p90")
    line("d_theta median", "d_theta_median")
    line("d_theta p90", "d_theta_p90")
    line("uniformity l1 (Table IV)", "uniformity_l1")
    for attack in base["c_diff"]:
        print(f"{'c_diff ' + attack + ' (%)':36}" + "".join(f"{rows[n]['c_diff'][attack]:14.2f}" for n in names))
    print(f"d_theta median paper / swap: {base['d_theta_median'] / rows['swap']['d_theta_median']:.1f}x")
    if full:
        actors = len(full["placement"])
        print(f"phase 1 of swap for all {run.info['n']} points on Ray ({actors} actor{'s' * (actors > 1)} of "
              f"{run.threads} threads): forge "
              f"{full['forge_wall_s']:.1f} s / training {full['train_wall_s']:.1f} s = "
              f"{full['forge_over_train']:.2f}x; grad_error/grad_norm median {full['rel_error_median']:.4f}")
    if args.json:
        atomic_write_json(args.json, {"per_step": costs, "all_points_swap": full, "quality": rows, "load": load})


if __name__ == "__main__":
    main()
