"""PoR verification cost as a fraction of one training, measured in one run: `topq:Q` on a PoR exported with
one-step checkpoint windows around each epoch's largest updates (`rayforge por --topq-windows W`, default 1)
against the same PoR without them (W=0: the log's checkpoints only, the format before windows), and `all`.

    python benchmarks/verify_cost.py RUN [--point 0] [--strategy minimal] [--topq 1] [--windows 1] [--reps 3]
                                         [--json OUT]

RUN is a trained run (`rayforge train`). With --strategy minimal (default) the PoR is the minimal one of --point
(swap out the point only: no phase-1 output needed), else the group PoR of that phase-1 strategy. Both PoRs replay
the same forged log, so they differ only in their checkpoints. `topq:Q` is timed --reps times, alternating the two
PoRs (the load of a shared machine hits both), and the fastest round counts; `all` once per PoR. Times are whole
`verify_por` calls (dataset, checks, replay) and are printed as fractions of the run's `train_wall_s` and of `all`
on the PoR without windows (a replay of the whole log under the same load as the rest).
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
from rayforge.por.export import exclude_claim, write_por  # noqa: E402
from rayforge.por.minimal import minimal_forged_log  # noqa: E402
from rayforge.train.run import TrainingRun  # noqa: E402
from rayforge.io import atomic_write_json  # noqa: E402


def export_both(run: TrainingRun, strategy: str, point: int, windows: int, root: Path) -> dict[int, Path]:
    """The PoR of `point` without and with `windows` windows per epoch: {windows: directory}."""
    out = {w: root / f"windows-{w}" for w in (0, windows)}
    if strategy != "minimal":
        for w, path in out.items():
            export_por(run, strategy, point, path, topq_windows=w)
        return out
    forged, first = minimal_forged_log(run, point)
    claim = exclude_claim(run, run.load_dataset(), point, [point])
    for w, path in out.items():
        write_por(run, forged, first, path, claim, topq_windows=w)
    return out


def timed(por_dir: Path, steps: str) -> dict:
    start = time.perf_counter()
    report = verify_por(por_dir, steps=steps)
    wall = time.perf_counter() - start
    assert report.valid, [str(r) for r in report.reasons]
    return {"s": wall, "segments": len(report.segments), "segments_total": report.segments_total,
            "steps_replayed": sum(s.stop - s.start for s in report.segments), **report.timing}


def measure(run_dir: Path, strategy: str, point: int, topq: int, windows: int, reps: int) -> dict:
    run = TrainingRun.open(run_dir)
    train_wall = json.loads((run.run_dir / "train_summary.json").read_text())["train_wall_s"]
    row = {"run": str(run_dir), "n": int(run.info["n"]), "tau": run.total_steps, "epochs": run.cfg.train.epochs,
           "log_checkpoints": len(run.checkpoints), "train_wall_s": train_wall, "strategy": strategy,
           "point": point, "load_average": [os.getloadavg()[0]]}
    q = f"topq:{topq}"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pors = export_both(run, strategy, point, windows, Path(tmp))
        row["export_both_s"] = time.perf_counter() - start
        best: dict[int, dict] = {}
        for _ in range(reps):
            for w, path in pors.items():
                result = timed(path, q)
                if w not in best or result["s"] < best[w]["s"]:
                    best[w] = result
        full = {w: timed(path, "all") for w, path in pors.items()}
    for w in pors:
        row[f"windows_{w}"] = {q: best[w], "all": full[w], f"{q}_over_train": best[w]["s"] / train_wall,
                               f"{q}_over_all": best[w]["s"] / full[0]["s"]}
    row["load_average"].append(os.getloadavg()[0])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--point", type=int, default=0)
    parser.add_argument("--strategy", default="minimal")
    parser.add_argument("--topq", type=int, default=1)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    r = measure(args.run, args.strategy, args.point, args.topq, args.windows, args.reps)
    q = f"topq:{args.topq}"
    print(f"[{r['run']}] n={r['n']} tau={r['tau']} ({r['epochs']} epochs, {r['log_checkpoints']} log checkpoints), "
          f"training {r['train_wall_s']:.1f} s; {r['strategy']} PoR of point {r['point']}; load average "
          f"{r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f} on {os.cpu_count()} CPUs")
    for w in sorted({0, args.windows}):
        v = r[f"windows_{w}"]
        t = v[q]
        print(f"  windows={w}: {q} {t['s']:.2f} s = {v[f'{q}_over_train']:.3f} x training "
              f"({v[f'{q}_over_all']:.3f} x verify all), {t['segments']} of {t['segments_total']} segments, "
              f"{t['steps_replayed']} steps replayed (dataset {t['dataset_s']:.2f} s, checks {t['checks_s']:.2f} s, "
              f"replay {t['replay_s']:.2f} s); all {v['all']['s']:.1f} s")
    if args.json:
        atomic_write_json(args.json, r)


if __name__ == "__main__":
    main()
