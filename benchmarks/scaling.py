"""Phase 1 and phase 2 on Ray with 1 and with N actors: wall time, speed-up, units in flight per actor.

    python benchmarks/scaling.py [--config configs/quickstart.yaml] [--run RUN] [--actors 1 2] [--repeats 1]
                                 [--set key=value ...] [--json OUT]

Trains RUN in-process when it does not exist, then, per repeat and per actor count (interleaved, so a change in the
machine's load hits both alike), copies the bare log, forges it (`run_forge`) and rebuilds every group
(`run_rebuild`, sequential), on one private local Ray for the whole benchmark. Wall times are the driver's, actor
start-up included. Units in flight: the time-averaged number of units queued or running per live actor (the limit is
`ray.units_in_flight`). The machine's load average is printed before and after each measurement; on a shared machine
read ratios from one run. Checks that every actor count gives the same forged.parquet and distances.parquet bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

from rayforge.config import load_config  # noqa: E402
from rayforge.forge.driver import run_forge  # noqa: E402
from rayforge.forge.engine import ForgeParams, forge_dir  # noqa: E402
from rayforge.io import atomic_write_json  # noqa: E402
from rayforge.ray_utils import ray_session  # noqa: E402
from rayforge.rebuild.driver import RebuildParams, rebuild_dir, run_rebuild  # noqa: E402
from rayforge.train.run import TrainingRun  # noqa: E402
from rayforge.train.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load() -> str:
    return "load %.1f %.1f %.1f" % os.getloadavg()


def measure(base: Path, work: Path, actors: int, cfg) -> dict:
    run_dir = work / f"a{actors}"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(base, run_dir, ignore=shutil.ignore_patterns("forge", "rebuild", "attack", "metrics"))
    run = TrainingRun.open(run_dir)
    before = load()
    start = time.perf_counter()
    forged = run_forge(run_dir, ForgeParams.from_config(run.cfg), actors, cfg.ray, cfg.wandb, progress=False)
    phase1 = time.perf_counter() - start
    start = time.perf_counter()
    rebuilt = run_rebuild(run_dir, RebuildParams(strategy=forged["strategy"]), actors, cfg.ray, cfg.wandb,
                          progress=False)
    phase2 = time.perf_counter() - start
    return {"actors": actors, "phase1_s": phase1, "phase2_s": phase2, "load_before": before, "load_after": load(),
            "phase1_units": forged["units"], "phase2_units": sum(p["units"] for p in rebuilt["placement"]),
            "phase1_in_flight": forged["units_in_flight"], "phase2_in_flight": rebuilt["units_in_flight"],
            "phase1_startup_s": forged["actor_startup_s"], "phase2_startup_s": rebuilt["actor_startup_s"],
            "phase1_driver_s": forged["driver_busy_s"], "phase2_driver_s": rebuilt["driver_busy_s"],
            "phase1_units_per_actor": [p["units"] for p in forged["placement"]],
            "phase2_units_per_actor": [p["units"] for p in rebuilt["placement"]],
            "forged": (forge_dir(run_dir, forged["strategy"]) / "forged.parquet").read_bytes(),
            "distances": (rebuild_dir(run_dir, forged["strategy"]) / "distances.parquet").read_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--run", default=None, help="trained run to use (trained here when missing)")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg = load_config(ROOT / args.config if not Path(args.config).is_absolute() else args.config, args.overrides)
    work = Path(tempfile.mkdtemp(prefix="rf-scaling-"))
    base = Path(args.run) if args.run else work / "base"
    if not (base / "trajectory").is_dir():
        train(cfg, base, progress=False)
    run = TrainingRun.open(base)
    print(f"{args.config} {' '.join(args.overrides)}: n={run.info['n']}, {run.total_steps} steps, "
          f"{len(run.checkpoints) - 1} checkpoint segments, logged threads {run.threads}; {load()}")
    rows = []
    with ray_session(cfg.ray):
        for repeat in range(args.repeats):
            for actors in args.actors:
                row = measure(base, work, actors, cfg)
                rows.append(row)
                print(f"repeat {repeat} actors {actors}: phase 1 {row['phase1_s']:.1f} s "
                      f"(first actor up after {row['phase1_startup_s']:.1f} s, driver busy {row['phase1_driver_s']:.1f} s; "
                      f"{row['phase1_units']} units, per actor {row['phase1_units_per_actor']}, in flight "
                      f"{row['phase1_in_flight']['mean']:.2f}/{row['phase1_in_flight']['limit']}), phase 2 "
                      f"{row['phase2_s']:.1f} s (first actor up after {row['phase2_startup_s']:.1f} s, driver busy "
                      f"{row['phase2_driver_s']:.1f} s; "
                      f"{row['phase2_units']} units, per actor "
                      f"{row['phase2_units_per_actor']}, in flight {row['phase2_in_flight']['mean']:.2f}/"
                      f"{row['phase2_in_flight']['limit']}); {row['load_before']} -> {row['load_after']}")
    assert len({r["forged"] for r in rows}) == 1 and len({r["distances"] for r in rows}) == 1, "bytes differ"
    for phase in ("phase1_s", "phase2_s"):
        by = {a: min(r[phase] for r in rows if r["actors"] == a) for a in args.actors}
        lo = min(args.actors)
        print(f"{phase[:6]}: " + ", ".join(f"{a} actor(s) {t:.1f} s (x{by[lo] / t:.2f})" for a, t in by.items()))
    print("outputs byte-identical across actor counts")
    if args.json:
        atomic_write_json(args.json, [{k: v for k, v in r.items() if not isinstance(v, bytes)} for r in rows])
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
