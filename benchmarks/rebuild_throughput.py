"""Phase-2 cost, measured in one run: forged models per minute (sequential vs batched replay, per worker of one
thread and for the configured actors), and PoR verification time (`all`, `topq:1`) as a fraction of training time.

    python benchmarks/rebuild_throughput.py RUN [RUN ...] [--groups 6] [--strategy paper]

Each RUN must hold phase-1 output for the strategy (`rayforge forge RUN [--points N]`). Groups timed are the first
`--groups` of the stage's group list; the throughput printed is measured on them, not extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

from rayforge.por import export_por, verify_por  # noqa: E402
from rayforge.rebuild.engine import RebuildContext, rebuild_group, rebuild_groups_batched  # noqa: E402
from rayforge.train.run import TrainingRun  # noqa: E402


def measure(run_dir: Path, strategy: str, groups: int) -> dict:
    run = TrainingRun.open(run_dir)
    ctx = RebuildContext(run, strategy, threads=1)
    chosen = [int(g) for g in ctx.logs.groups[:groups]]
    rebuild_group(ctx, chosen[0])  # warm-up
    start = time.perf_counter()
    for g in chosen:
        rebuild_group(ctx, g)
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    rebuild_groups_batched(ctx, chosen)
    batched = time.perf_counter() - start
    train_wall = json.loads((run.run_dir / "train_summary.json").read_text())["train_wall_s"]
    point = int(ctx.logs.splits.groups[ctx.logs.groups[0]][0])  # a member of the first group
    with tempfile.TemporaryDirectory() as tmp:
        por_dir = Path(tmp) / "por"
        start = time.perf_counter()
        export_por(run, strategy, point, por_dir)
        export_s = time.perf_counter() - start
        timings = {}
        for mode in ("all", "topq:1"):
            start = time.perf_counter()
            report = verify_por(por_dir, steps=mode)
            timings[mode] = time.perf_counter() - start
            assert report.valid, report.reasons
    actors = run.cfg.ray.actors
    return {"run": str(run_dir), "n": int(run.info["n"]), "tau": run.total_steps, "groups_timed": len(chosen),
            "seq_models_per_min_per_worker": 60 * len(chosen) / sequential,
            "batched_models_per_min_per_worker": 60 * len(chosen) / batched,
            "actors": actors, "seq_models_per_min": 60 * len(chosen) / sequential * actors,
            "train_wall_s": train_wall, "por_export_s": export_s,
            "verify_all_s": timings["all"], "verify_topq1_s": timings["topq:1"],
            "verify_all_over_train": timings["all"] / train_wall,
            "verify_topq1_over_train": timings["topq:1"] / train_wall}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--groups", type=int, default=6)
    parser.add_argument("--strategy", default="paper")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for run_dir in args.runs:
        r = measure(run_dir, args.strategy, args.groups)
        rows.append(r)
        print(f"\n[{run_dir}] n={r['n']} tau={r['tau']} ({r['groups_timed']} groups timed, 1 thread per worker)")
        print(f"  forged models / min / worker: sequential {r['seq_models_per_min_per_worker']:.2f}, batched "
              f"{r['batched_models_per_min_per_worker']:.2f} (batched/sequential "
              f"{r['batched_models_per_min_per_worker'] / r['seq_models_per_min_per_worker']:.2f}x)")
        print(f"  with {r['actors']} actors (sequential): {r['seq_models_per_min']:.2f} models / min")
        print(f"  PoR export {r['por_export_s']:.1f} s; verify all {r['verify_all_s']:.1f} s "
              f"({r['verify_all_over_train']:.2f} x training), topq:1 {r['verify_topq1_s']:.1f} s "
              f"({r['verify_topq1_over_train']:.2f} x training {r['train_wall_s']:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
