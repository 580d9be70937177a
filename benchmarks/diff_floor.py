"""How low can c_A^Diff go? Single-point PoRs of sampled points, scored with the run's attacks, beside two references.

    python benchmarks/diff_floor.py RUN [--points 64] [--pool 256] [--variants drop,random,minimal] [--json OUT]

RUN must have been attacked (`rayforge attack RUN`): its shadows and attacks are reused, never refitted. For each
sampled training point x* (seeded) and each variant, a log without x* is replayed from the checkpoint before x*'s
first step, and the model is asked the Diff/Common/Validation queries of the attack stage:
  drop      x* removed from its batches (batch b-1 there): plain SGD on D \\ {x*} along the original order, the
            honest "trained without x*" reference. A PoR can do no better than this unless its substitutes carry
            x*'s own signal.
  random    x* replaced by a uniformly drawn point of D \\ (B_t ∪ {x*}) (random flip): a substitute chosen blindly.
  minimal   x* replaced by the greedy best of `--pool` substitutes (`rayforge por --mode minimal`; the `swap`
            strategy with a part per point, κ = n): the closest a one-for-one swap gets to x*'s gradient.
Prints c_A^U with Wilson 95 % intervals per variant and attack, and d_θ (mean, median).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rayforge.attacks.driver import stored_attacks  # noqa: E402
from rayforge.attacks.evaluate import ForgedModelScorer, attack_population, score_all  # noqa: E402
from rayforge.io import atomic_write_json  # noqa: E402
from rayforge.por.minimal import minimal_forged_log  # noqa: E402
from rayforge.progress import progress_bar  # noqa: E402
from rayforge.rebuild.engine import d_theta  # noqa: E402
from rayforge.report.metrics import KINDS, prediction_changes, valid_por, wilson_interval  # noqa: E402
from rayforge.train.log import Steps  # noqa: E402
from rayforge.train.replay import replay_steps  # noqa: E402
from rayforge.train.run import TrainingRun, hyper_of, set_determinism  # noqa: E402

SAMPLE_STREAM = 0xF100
VARIANTS = ("drop", "random", "minimal")


def dropped_log(run: TrainingRun, point: int) -> Steps:
    keep = [np.asarray(b) != point for b in run.steps.batch]
    return Steps([np.asarray(b)[k] for b, k in zip(run.steps.batch, keep)],
                 [np.asarray(f)[k] for f, k in zip(run.steps.flip, keep)], run.steps.lr)


def random_log(run: TrainingRun, point: int, seed: int) -> Steps:
    rng = np.random.default_rng([seed, SAMPLE_STREAM, point])
    n = int(run.info["n"])
    batches, flips = list(run.steps.batch), list(run.steps.flip)
    for t, b in enumerate(batches):
        b = np.asarray(b)
        if point in b:
            pool = np.setdiff1d(np.arange(n), np.append(b, point))
            b, f = b.copy(), np.asarray(flips[t]).copy()
            slot = int(np.flatnonzero(b == point)[0])
            b[slot] = rng.choice(pool)
            f[slot] = bool(rng.random() < 0.5) if run.cfg.data.flip else False
            batches[t], flips[t] = b, f
    return Steps(batches, flips, run.steps.lr)


def variant_log(run: TrainingRun, variant: str, point: int, pool: int) -> Steps:
    if variant == "drop":
        return dropped_log(run, point)
    if variant == "random":
        return random_log(run, point, run.cfg.seed)
    return minimal_forged_log(run, point, pool)[0]


def replay_without(run: TrainingRun, steps: Steps, point: int, data, device) -> torch.nn.Module:
    first = min(t for t, b in enumerate(run.steps.batch) if point in b)
    start = max(c for c in run.checkpoints if c <= first)
    model, velocity = run.model_at(start, device)
    replay_steps(model, velocity, data, steps, start, run.total_steps, hyper_of(run.cfg))
    return model


def summarise(rows: list[dict], original: dict, points: np.ndarray) -> dict:
    out, changed = {}, {}
    for name in sorted(original):
        mine = sorted((r for r in rows if r["attack"] == name), key=lambda r: r["point"])
        orig_pred = dict(zip(range(len(original[name]["pred"])), original[name]["pred"].tolist()))
        changed[name] = np.zeros(len(mine), dtype=bool)
        out[name] = {}
        for kind in KINDS:
            a, b = prediction_changes(mine, orig_pred, kind)
            flags = np.any(a != b, axis=1)
            changed[name] |= flags
            out[name][f"c_{kind}"] = 100.0 * float(flags.mean())
            out[name][f"c_{kind}_ci"] = wilson_interval(int(flags.sum()), len(flags))
    return {"attacks": out, **valid_por(changed, points)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--points", type=int, default=64)
    parser.add_argument("--pool", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    run = TrainingRun.open(args.run)
    cfg = run.cfg
    set_determinism(cfg.train.threads)
    torch.set_num_threads(cfg.train.threads or 1)  # one thread, as a rebuild actor computes
    device = torch.device("cpu")
    ds = run.load_dataset()
    pop, n, _ = attack_population(ds, cfg)
    attacks = stored_attacks(run, pop)
    theta_star = {k: p.detach() for k, p in run.model_at(run.total_steps, device)[0].named_parameters()}
    original = score_all(attacks, run.model_at(run.total_steps, device)[0], pop.ids)
    rng = np.random.default_rng([cfg.seed, SAMPLE_STREAM])
    points = np.sort(rng.choice(n, size=min(args.points, n), replace=False))
    data = run.tensor_data(ds, device)
    scorer = ForgedModelScorer(attacks, n, len(pop), cfg.attack, cfg.seed)
    result = {"run": str(args.run), "points": len(points), "pool": args.pool, "variants": {}}
    for variant in args.variants.split(","):
        start, rows, dist = time.perf_counter(), [], []
        for point in progress_bar(points, desc=f"floor[{variant}]", unit="point"):
            model = replay_without(run, variant_log(run, variant, int(point), args.pool), int(point), data, device)
            dist.append(d_theta({k: p.detach() for k, p in model.named_parameters()}, theta_star))
            rows += scorer(int(point), np.array([point]), model)
        summary = summarise(rows, original, points)
        summary["d_theta"] = {"mean": float(np.mean(dist)), "median": float(np.median(dist))}
        summary["wall_s"] = time.perf_counter() - start
        result["variants"][variant] = summary
        cells = ", ".join(f"{a} {m['c_diff']:.1f}% [{m['c_diff_ci'][0]:.1f}, {m['c_diff_ci'][1]:.1f}]"
                          for a, m in summary["attacks"].items())
        print(f"{variant:8s} c_diff: {cells}; valid PoRs {summary['valid_por_percent']['all']:.1f}% (all), "
              f"{summary['valid_por_percent']['lira_enhanced']:.1f}% (LiRA+EnhancedMIA); "
              f"d_theta mean {summary['d_theta']['mean']:.3g} ({summary['wall_s']:.0f}s)", flush=True)
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
