"""Does the audit's mechanism predict what the MI attacks see? Chosen points' forged models scored, in one run.

    python benchmarks/audit_calibration.py RUN [--mode minimal|group] [--strategy paper] [--points I,J,...]
                                           [--top 10] [--random 60] [--json OUT]

Needs `rayforge audit RUN` (the mechanism per point) and the attack stage's shadows (`RUN/attack/shadows/`, written
by `rayforge attack`, which may be stopped once they are there); `--mode group` also phase 1 of the strategy.
For the named points, the audit's `--top` highest scores and `--random` seeded other points, it builds each
point's forged model in this process: `minimal` (default) replays the minimal PoR's forged log (x* swapped for its
best single substitute at each of its steps, `rayforge.por.minimal`: the substitution the audit's mechanism
models), `group` the point's group's log from phase 1 (whole batches replaced, as Algorithm 2 does). It scores
the model with every attack on x* and on its Common points exactly as the attack stage does
(`rayforge.attacks.evaluate.ForgedModelScorer`), and prints per point the audit's
score and evidence, each attack's score shift on x* and whether its prediction flipped, then:
  * the forging noise per attack: the 99th percentile of |shift| over the Common points' queries;
  * "forgetting": each attack's −shift on x* in units of that noise, averaged over the attacks (> 1: the forged
    model treats x* as less of a member than forging noise explains);
  * the Spearman correlation of forgetting with each audit quantity (the score, unmatched_influence,
    self_influence, unmatched, d_θ), and the forgetting of points the audit flags against the others;
  * "attack evidence": a member -> non-member flip on x* with |shift| above the noise (the audit's attack
    criterion).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("WANDB_MODE", "disabled")

import pyarrow.parquet as pq  # noqa: E402

from rayforge.attacks.driver import stored_attacks  # noqa: E402
from rayforge.attacks.evaluate import ForgedModelScorer, attack_population, score_all  # noqa: E402
from rayforge.por.minimal import minimal_forged_log  # noqa: E402
from rayforge.rebuild.engine import RebuildContext, d_theta, rebuild_group  # noqa: E402
from rayforge.train.replay import replay_steps  # noqa: E402
from rayforge.train.run import TrainingRun, hyper_of  # noqa: E402
from rayforge.io import atomic_write_json  # noqa: E402


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            r[x == v] = r[x == v].mean()
        return r

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--mode", choices=["minimal", "group"], default="minimal")
    parser.add_argument("--strategy", default="paper")
    parser.add_argument("--points", default="", help="comma-separated point indices to evaluate")
    parser.add_argument("--top", type=int, default=10, help="the audit's highest scores to evaluate")
    parser.add_argument("--random", type=int, default=60, help="seeded random other points to evaluate")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    run = TrainingRun.open(args.run_dir)
    audit = pq.read_table(Path(args.run_dir) / "audit" / "points.parquet").to_pandas().set_index("point")
    named = [int(p) for p in args.points.split(",") if p]
    top = audit.drop(index=named, errors="ignore").sort_values("score", ascending=False).index[:args.top].tolist()
    rest = np.setdiff1d(audit.index.to_numpy(), named + top)
    rng = np.random.default_rng(0xCA1)
    chosen = named + top + sorted(rng.choice(rest, size=min(args.random, len(rest)), replace=False).tolist())

    start = time.perf_counter()
    cfg = run.cfg
    pop, n, _ = attack_population(run.load_dataset(), cfg)
    attacks = stored_attacks(run, pop)
    original_model, _ = run.model_at(run.total_steps, run.device())
    original = score_all(attacks, original_model, pop.ids)
    theta_star = {k: v.detach().cpu() for k, v in original_model.named_parameters()}
    scorer = ForgedModelScorer(attacks, n, len(pop), cfg.attack, cfg.seed)
    ctx = RebuildContext(run, args.strategy, threads=max(1, int(cfg.ray.num_cpus_per_actor))) \
        if args.mode == "group" else None
    data = run.tensor_data(run.load_dataset(), run.device())

    rows, common = [], {a: [] for a in attacks}
    for point in chosen:
        if ctx is not None:
            group = int(ctx.logs.splits.group_of[point])
            result = rebuild_group(ctx, group)
            model, members, d = result.model, result.row["members"], result.row["d_theta"]
        else:
            group, members = point, np.array([point])
            forged, first = minimal_forged_log(run, point, data=data)
            start = max(c for c in run.checkpoints if c <= first)
            model, velocity = run.model_at(start, run.device())
            replay_steps(model, velocity, data, forged, start, run.total_steps, hyper_of(cfg))
            d = d_theta(dict(model.named_parameters()), theta_star)
        row = {"point": point, "kind": "named" if point in named else "top" if point in top else "random",
               "audit_score": float(audit.loc[point, "score"]), "d_theta": d,
               **{q: float(audit.loc[point, q]) for q in ("unmatched_influence", "self_influence", "unmatched")}}
        for r in scorer(group, members, model):
            if r["point"] != point:
                continue
            a = r["attack"]
            for z, kind, score, pred in zip(r["z"], r["kind"], r["score"], r["pred"]):
                shift = score - original[a]["score"][z]
                if kind == "common":
                    common[a].append(abs(shift))
                elif kind == "diff":
                    row[f"shift_{a}"] = float(shift)
                    row[f"refuted_{a}"] = bool(original[a]["pred"][z]) and not bool(pred)
        rows.append(row)

    noise = {a: float(np.quantile(v, 0.99)) for a, v in common.items()}
    for row in rows:
        row["forgetting"] = float(np.mean([-row[f"shift_{a}"] / noise[a] for a in attacks]))
        row["evidence"] = [a for a in attacks if row[f"refuted_{a}"] and abs(row[f"shift_{a}"]) > noise[a]]
    forgetting = np.array([r["forgetting"] for r in rows])
    flagged = np.array([r["audit_score"] > 1 for r in rows])
    out = {
        "run": str(run.run_dir), "mode": args.mode, "strategy": args.strategy, "evaluated": len(rows),
        "seconds": time.perf_counter() - start, "common_noise_q99": noise,
        "spearman_with_forgetting": {q: spearman(np.array([r[q] for r in rows]), forgetting)
                                     for q in ("audit_score", "unmatched_influence", "self_influence", "unmatched",
                                               "d_theta")},
        "flagged": int(flagged.sum()),
        "forgetting_median": {"flagged": float(np.median(forgetting[flagged])) if flagged.any() else None,
                              "others": float(np.median(forgetting[~flagged])) if (~flagged).any() else None},
        "share_forgetting_above_1": {"flagged": float(np.mean(forgetting[flagged] > 1)) if flagged.any() else None,
                                     "others": float(np.mean(forgetting[~flagged] > 1)) if (~flagged).any()
                                     else None},
        "with_attack_evidence": sum(bool(r["evidence"]) for r in rows),
        "named": {r["point"]: {"score": r["audit_score"], "forgetting": r["forgetting"]} for r in rows
                  if r["kind"] == "named"},
        "rows": rows,
    }
    cols = ["point", "kind", "audit_score", "unmatched", "d_theta", "forgetting"] + [f"shift_{a}" for a in attacks]
    print(" ".join(f"{c:>14}" for c in cols + ["evidence"]))
    for r in sorted(rows, key=lambda r: -r["audit_score"]):
        print(" ".join(f"{r[c]:>14.4g}" if isinstance(r[c], float) else f"{r[c]!s:>14}" for c in cols),
              ",".join(r["evidence"]) or "-")
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))
    if args.json:
        atomic_write_json(args.json, out)


if __name__ == "__main__":
    main()
