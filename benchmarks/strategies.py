"""`paper` vs `swap` (and `hybrid`) on the same training log, side by side, measured in one run.

    python benchmarks/strategies.py RUN [--points 20] [--steps 3] [--hybrid] [--json OUT]

For each strategy: gradient evaluations and wall time per step (all κ parts of the first `--steps` steps, forged
in-process with one thread, as each Ray actor does), then phase 1 for the groups of `--points` sampled points on Ray
(the sampling approximation; the same sample for every strategy, resumed if already on disk), then phase 2 with the
attacks (shadows shared between strategies) and the paper's metrics: grad_error/grad_norm (median, p90), d_θ
(median, p90), the uniformity ℓ1 of Table IV and c_A^Diff per attack. Ratios are against `paper`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

from rayforge.attacks.driver import run_attack  # noqa: E402
from rayforge.forge.driver import run_forge  # noqa: E402
from rayforge.forge.engine import ForgeContext, ForgeParams, forge_unit  # noqa: E402
from rayforge.report.metrics import compute_metrics  # noqa: E402
from rayforge.train.run import TrainingRun  # noqa: E402


def per_step_cost(run: TrainingRun, params: ForgeParams, steps: int) -> tuple[float, float]:
    """Every part of the first steps (not only what the sample needs): the cost of forging a whole step."""
    ctx = ForgeContext(run, dataclasses.replace(params, points=None))
    forge_unit(ctx, 0, 1, 0)  # warm-up
    start = time.perf_counter()
    result = forge_unit(ctx, 0, steps, tuple(range(params.kappa)))
    return (time.perf_counter() - start) / steps, (result["grad_evals"] - steps) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hybrid", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    run = TrainingRun.open(args.run)
    cfg = run.cfg
    rows = {}
    for strategy in ["paper", "swap"] + (["hybrid"] if args.hybrid else []):
        params = ForgeParams.from_config(cfg, strategy=strategy, points=args.points)
        wall, evals = per_step_cost(run, params, args.steps)
        forge = run_forge(run.run_dir, params, cfg.ray.actors, cfg.ray, cfg.wandb)
        run_attack(run.run_dir, strategy, cfg.ray.actors, cfg.ray, cfg.wandb)
        metrics, _ = compute_metrics(run.run_dir, strategy)
        rows[strategy] = {
            "wall_s_per_step": wall, "grad_evals_per_step": evals,
            "rel_error_median": forge["rel_error_median"], "rel_error_p90": forge["rel_error_p90"],
            "d_theta_median": metrics["d_theta"]["median"], "d_theta_p90": metrics["d_theta"]["p90"],
            "uniformity_l1": metrics["uniformity_l1"]["mean"], "uniformity_l1_stderr": metrics["uniformity_l1"]["stderr"],
            "c_diff": {a: m["c_diff"] for a, m in metrics["attacks"].items()},
            "evaluated_points": metrics["setting"]["evaluated_points"],
        }
    base = rows["paper"]
    print(f"\n{run.run_dir}: n={run.info['n']} tau={run.total_steps} kappa={cfg.forge.kappa} mu={cfg.forge.mu} "
          f"pool={cfg.forge.pool_size}; {base['evaluated_points']} sampled points (lam={cfg.forge.lam})")
    names = list(rows)
    print(f"{'':34}" + "".join(f"{n:>14}" for n in names) + "   " + "  ".join(f"{n}/paper" for n in names[1:]))

    def line(label, key, fmt="{:14.4g}"):
        values = [rows[n][key] for n in names]
        ratios = "  ".join(f"{rows[n][key] / base[key]:10.3g}x" if base[key] else "         -" for n in names[1:])
        print(f"{label:34}" + "".join(fmt.format(v) for v in values) + "   " + ratios)

    line("wall time per step (s, 1 thread)", "wall_s_per_step")
    line("gradient evaluations per step", "grad_evals_per_step")
    line("grad_error/grad_norm median", "rel_error_median")
    line("grad_error/grad_norm p90", "rel_error_p90")
    line("d_theta median", "d_theta_median")
    line("d_theta p90", "d_theta_p90")
    line("uniformity l1 (Table IV)", "uniformity_l1")
    for attack in base["c_diff"]:
        print(f"{'c_diff ' + attack + ' (%)':34}" + "".join(f"{rows[n]['c_diff'][attack]:14.2f}" for n in names))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
