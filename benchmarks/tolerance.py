"""What a segment tolerance rules out, measured on one run: every segment's replay deviation (ℓ2, max |Δ|, ℓ2 over
the segment's update norm) for

    honest      the minimal PoR of POINT (`rayforge por RUN --point P --mode minimal`): a real trajectory without it
    eps0        the ε = 0 construction (rayforge.por.probes.log_only_por): the point swapped out of the original log,
                over the original checkpoints, claiming ε = 0
    lr          the honest PoR with lr x (1 + --lr-delta) declared in both its manifest and its log (probes.scale_lr)
    threads256  the honest PoR declaring training.threads 256, verified with the default (capped) thread count

all verified in one process, every segment, against the deployed model: the honest PoR with every --threads (a
count other than the training's shows the float noise of a genuine replay), the edits with the first.

    python benchmarks/tolerance.py RUN --point P --out DIR [--threads 1 2] [--lr-delta 3e-4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

from rayforge.io import atomic_write_json  # noqa: E402
from rayforge.por import verify_por, write_deployed_model  # noqa: E402
from rayforge.por.minimal import export_minimal_por  # noqa: E402
from rayforge.por.probes import log_only_por, scale_lr  # noqa: E402
from rayforge.train.run import TrainingRun  # noqa: E402


def build(run: TrainingRun, point: int, out: Path, lr_delta: float) -> dict[str, Path]:
    pors = {"honest": out / "honest", "eps0": out / "eps0", "lr": out / "lr", "threads256": out / "threads256"}
    export_minimal_por(run, point, pors["honest"])
    log_only_por(run, point, pors["eps0"])
    for name in ("lr", "threads256"):
        shutil.copytree(pors["honest"], pors[name])
    scale_lr(pors["lr"], 1.0 + lr_delta)
    manifest = json.loads((pors["threads256"] / "por.json").read_text())
    manifest["training"]["threads"] = 256
    (pors["threads256"] / "por.json").write_text(json.dumps(manifest))
    return pors


def measure(por_dir: Path, deployed: Path, threads: int | None) -> dict:
    start = time.perf_counter()
    r = verify_por(por_dir, model_path=deployed, threads=threads, warn=lambda message: None)
    rel = [s.relative for s in r.segments]
    return {"threads": r.threads, "valid": r.valid, "reasons": sorted(set(r.reason_codes)), "segments": len(r.segments),
            "worst_l2": r.max_distance, "worst_max_abs": max(s.max_abs for s in r.segments),
            "worst_rel": max(rel), "best_rel": min(rel), "epsilon_claimed": r.epsilon,
            "epsilon_measured": r.epsilon_measured, "verify_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--point", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="Directory to create for the PoRs.")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--lr-delta", type=float, default=3e-4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    run = TrainingRun.open(args.run)
    pors = build(run, args.point, args.out, args.lr_delta)
    deployed = args.out / "deployed.safetensors"
    write_deployed_model(run, deployed)
    threads = {"honest": args.threads, "eps0": args.threads[:1], "lr": args.threads[:1], "threads256": [None]}
    rows = [{"por": name, **measure(path, deployed, t)} for name, path in pors.items() for t in threads[name]]
    print(table(rows))
    if args.json:
        atomic_write_json(args.json, rows)


COLUMNS = [("por", "por", 11, ""), ("threads", "threads", 8, ""), ("valid", "valid", 7, ""),
           ("worst l2", "worst_l2", 11, ".3g"), ("max|d|", "worst_max_abs", 11, ".3g"),
           ("best l2/update", "best_rel", 16, ".3g"), ("worst l2/update", "worst_rel", 17, ".3g"),
           ("eps claimed", "epsilon_claimed", 13, ".4g"), ("measured", "epsilon_measured", 11, ".4g"),
           ("verify s", "verify_s", 10, ".1f")]  # (title, key, width, format)


def table(rows: list[dict]) -> str:
    def line(cells) -> str:
        return "".join(f"{cell:>{width}}" for cell, (_, _, width, _) in zip(cells, COLUMNS))

    out = [line([title for title, *_ in COLUMNS]) + "  reasons"]
    out += [line([format(r[key], fmt) if fmt else str(r[key]) for _, key, _, fmt in COLUMNS]) + "  "
            + ",".join(r["reasons"]) for r in rows]
    return "\n".join(out)


if __name__ == "__main__":
    main()
