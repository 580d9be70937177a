"""Phase-2 cost, measured in one run: forged models x SGD steps per second, sequential replay against the batched
one (K models as one wide model, rayforge.rebuild.stacked), per worker of one thread; and PoR verification time
(`all`, `topq:Q`) as a fraction of training time.

    python benchmarks/rebuild_throughput.py RUN [RUN ...] [--groups 8] [--strategy paper] [--reps 2] [--topq 1]
                                            [--profile]

Each RUN must hold phase-1 output for the strategy (`rayforge forge RUN [--points N]`). The first `--groups` groups
of the stage's group list are replayed both ways, alternately `--reps` times (the load of a shared machine hits
both), and the fastest round of each counts; their d_θ must agree to float rounding. The throughput printed is
measured on them, not extrapolated. `--profile` adds where the time goes: self CPU time per operator (torch
profiler) of the sequential and the batched replay of the same groups, as a share of each, and the batched/sequential
ratio of each operator's time per model step (which kernels stacking speeds up, and which it does not).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from rayforge.por import export_por, verify_por  # noqa: E402
from rayforge.rebuild.engine import DEFAULT_METHOD, RebuildContext, rebuild_unit  # noqa: E402
from rayforge.train.run import TrainingRun  # noqa: E402
from rayforge.io import atomic_write_json  # noqa: E402


def replay_rates(ctx: RebuildContext, groups: list[int], reps: int) -> dict:
    """Models x steps per second of each method (the best of `reps` alternating rounds), and the worst relative
    difference of their d_θ."""
    rebuild_unit(ctx, groups[:2], "batched")  # warm-up both
    rebuild_unit(ctx, groups[:1], "sequential")
    best, rows = {}, {}
    for _ in range(reps):
        for method in ("sequential", "batched"):
            start = time.perf_counter()
            results = rebuild_unit(ctx, groups, method)
            wall = time.perf_counter() - start
            best[method] = max(best.get(method, 0.0), sum(r.steps for r in results) / wall)
            rows[method] = [r.row["d_theta"] for r in results]
    diff = max(abs(a - b) / max(abs(a), 1e-300) for a, b in zip(rows["sequential"], rows["batched"]))
    return {"sequential_models_steps_per_s": best["sequential"], "batched_models_steps_per_s": best["batched"],
            "batched_over_sequential": best["batched"] / best["sequential"], "d_theta_max_rel_diff": diff}


def operator_profile(ctx: RebuildContext, groups: list[int], top: int = 8) -> list[tuple[str, float, float, float]]:
    """[(operator, share of sequential, share of batched, batched/sequential time per model step)] for the `top`
    operators of the batched replay."""
    from torch.profiler import ProfilerActivity, profile

    totals = {}
    for method in ("sequential", "batched"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps = sum(r.steps for r in rebuild_unit(ctx, groups, method))
        totals[method] = ({e.key: e.self_cpu_time_total for e in prof.key_averages()}, steps)
    (seq, seq_steps), (bat, bat_steps) = totals["sequential"], totals["batched"]
    seq_all, bat_all = sum(seq.values()), sum(bat.values())
    rows = []
    for name in sorted(bat, key=bat.get, reverse=True)[:top]:
        per_seq = seq.get(name, 0.0) / seq_steps
        rows.append((name, seq.get(name, 0.0) / seq_all, bat[name] / bat_all,
                     (bat[name] / bat_steps) / per_seq if per_seq else float("nan")))
    return rows


def verify_times(run: TrainingRun, strategy: str, point: int, topq: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        por_dir = Path(tmp) / "por"
        start = time.perf_counter()
        export_por(run, strategy, point, por_dir)
        out = {"por_export_s": time.perf_counter() - start}
        for mode in ("all", f"topq:{topq}"):
            start = time.perf_counter()
            report = verify_por(por_dir, steps=mode)
            out[f"verify_{mode}_s"] = time.perf_counter() - start
            assert report.valid, report.reasons
    return out


def measure(run_dir: Path, strategy: str, groups: int, reps: int, topq: int, profile: bool = False) -> dict:
    run = TrainingRun.open(run_dir)
    torch.set_num_threads(1)
    ctx = RebuildContext(run, strategy, threads=1)
    chosen = [int(g) for g in ctx.logs.groups[:groups]]
    load = os.getloadavg()[0]
    row = {"run": str(run_dir), "n": int(run.info["n"]), "tau": run.total_steps, "groups_timed": len(chosen),
           "default_method": DEFAULT_METHOD.get(ctx.device.type), **replay_rates(ctx, chosen, reps)}
    train_wall = json.loads((run.run_dir / "train_summary.json").read_text())["train_wall_s"]
    point = int(ctx.logs.splits.groups[chosen[0]][0])  # a member of the first group
    row.update(verify_times(run, strategy, point, topq), train_wall_s=train_wall)
    for mode in ("all", f"topq:{topq}"):
        row[f"verify_{mode}_over_train"] = row[f"verify_{mode}_s"] / train_wall
    row["load_average"] = [load, os.getloadavg()[0]]
    if profile:
        row["profile"] = operator_profile(ctx, chosen)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--strategy", default="paper")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--topq", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="time per operator, sequential vs batched")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for run_dir in args.runs:
        r = measure(run_dir, args.strategy, args.groups, args.reps, args.topq, args.profile)
        rows.append(r)
        q = f"topq:{args.topq}"
        print(f"\n[{run_dir}] n={r['n']} tau={r['tau']} ({r['groups_timed']} groups, 1 thread per worker; load "
              f"average {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f} on {os.cpu_count()} CPUs)")
        print(f"  phase 2, models x steps / s: sequential {r['sequential_models_steps_per_s']:.1f}, batched "
              f"{r['batched_models_steps_per_s']:.1f}: batched/sequential {r['batched_over_sequential']:.2f}x "
              f"(d_theta agree to {r['d_theta_max_rel_diff']:.1e} relative; default here: {r['default_method']})")
        print(f"  PoR export {r['por_export_s']:.1f} s; verify all {r['verify_all_s']:.1f} s "
              f"({r['verify_all_over_train']:.3f} x training), {q} {r[f'verify_{q}_s']:.1f} s "
              f"({r[f'verify_{q}_over_train']:.3f} x training {r['train_wall_s']:.1f} s)")
        for name, seq_share, bat_share, ratio in r.get("profile", []):
            print(f"  {name:32} {100 * seq_share:5.1f} % of sequential, {100 * bat_share:5.1f} % of batched; "
                  f"batched/sequential time per model step {ratio:.2f}")
    if args.json:
        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
