"""The paper's metrics (Section IV-A, Table IV) computed from a run's attack-stage output.

    c_A^U   percent of evaluated points x_i for which attack A predicts differently on θ* and θ_{-i} for at least
            one z in U (U = Diff {x_i}, Common: 5 points of D \\ X̂_g, Validation: 5 held-out points)
    s_A     |score(x_i, θ_{-i}) − score(x_i, θ*)|, median over evaluated points
    d_θ     ‖θ* − θ_{-i}‖²₂ / dim(θ), median and 90th percentile over forged models
    ℓ1      uniformity: ℓ1 distance between the sample frequencies in a PoR's batches (over D \\ X̂_g) and the
            uniform distribution, mean ± standard error over (up to) 100 PoRs, next to the original log's
Plus each attack's quality on the original model: AUC and TPR at 0.1% FPR, members (D) against held-out points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from rayforge.attacks.metrics import auc, mean_stderr, prediction_difference, roc, tpr_at_fpr
from rayforge.errors import RayforgeError
from rayforge.rebuild.forged_log import ForgedLogs
from rayforge.train.run import TrainingRun

UNIFORMITY_PORS = 100
UNIFORMITY_STREAM = 0x0F1F


def uniformity_over(batches, n: int, excluded: np.ndarray) -> float:
    """ℓ1 between the frequencies of the points of D \\ excluded in `batches` and the uniform distribution on them."""
    counts = np.bincount(np.concatenate(batches), minlength=n).astype(np.float64)
    keep = np.ones(n, dtype=bool)
    keep[excluded] = False
    freq = counts[keep] / counts[keep].sum()
    return float(np.abs(freq - 1.0 / keep.sum()).sum())


def uniformity(run: TrainingRun, logs: ForgedLogs, groups: np.ndarray, seed: int) -> dict:
    n = int(run.info["n"])
    rng = np.random.default_rng([seed, UNIFORMITY_STREAM])
    chosen = rng.choice(groups, size=min(UNIFORMITY_PORS, len(groups)), replace=False)
    values = [uniformity_over(logs.group_log(int(g)).steps(run.steps).batch, n, logs.splits.groups[g])
              for g in chosen]
    mean, stderr = mean_stderr(values)
    return {"mean": mean, "stderr": stderr, "pors": len(values),
            "original": uniformity_over(run.steps.batch, n, np.array([], dtype=np.int64))}


def compute_metrics(run_dir: str | Path, strategy: str = "paper") -> tuple[dict, dict]:
    """(metrics.json content, arrays for the figures)."""
    run = TrainingRun.open(run_dir)
    out = Path(run.run_dir) / "attack" / strategy
    for name in ("original.parquet", "scores.parquet", "distances.parquet"):
        if not (out / name).is_file():
            raise RayforgeError(f"no {out / name}: run `rayforge attack {run.run_dir}` first")
    original = pq.read_table(out / "original.parquet").to_pydict()
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    distances = pq.read_table(out / "distances.parquet")
    d = distances.column("d_theta").to_numpy()

    orig_score, orig_pred, members = {}, {}, {}
    for i, a, s, p, m in zip(original["id"], original["attack"], original["score"], original["pred"],
                             original["member"]):
        orig_score.setdefault(a, {})[i] = s
        orig_pred.setdefault(a, {})[i] = p
        members.setdefault(a, {})[i] = m

    attacks, figures = {}, {"d_theta": d, "s": {}, "roc": {}}
    for name in sorted(orig_score):
        rows = [r for r in scores if r["attack"] == name]
        ids = np.array(list(orig_score[name]))
        sc = np.array([orig_score[name][i] for i in ids])
        lab = np.array([members[name][i] for i in ids])
        result = {"auc": auc(sc, lab), "tpr_at_0.1_fpr": tpr_at_fpr(sc, lab, 0.001)}
        for kind in ("diff", "common", "validation"):
            forged = [[p for p, k in zip(r["pred"], r["kind"]) if k == kind] for r in rows]
            origin = [[orig_pred[name][z] for z, k in zip(r["z"], r["kind"]) if k == kind] for r in rows]
            result[f"c_{kind}"] = prediction_difference(np.array(origin, dtype=bool), np.array(forged, dtype=bool))
        s = np.array([abs(r["score"][r["kind"].index("diff")] - orig_score[name][r["point"]]) for r in rows])
        result["s_median"] = float(np.median(s))
        attacks[name] = result
        figures["s"][name] = s
        figures["roc"][name] = roc(sc, lab)
    logs = ForgedLogs(run, strategy)
    groups = np.unique(distances.column("group").to_numpy())
    metrics = {
        "attacks": attacks,
        "d_theta": {"median": float(np.median(d)), "p90": float(np.quantile(d, 0.9))},
        "uniformity_l1": uniformity(run, logs, groups, run.cfg.seed),
        "setting": {"dataset": run.cfg.data.dataset, "model": run.cfg.model.name, "n": int(run.info["n"]),
                    "tau": run.total_steps, "lam": logs.params.lam, "kappa": logs.params.kappa,
                    "mu": logs.params.mu, "strategy": strategy, "evaluated_points": len({r["point"] for r in scores}),
                    "modified_sgd": bool(run.cfg.train.momentum or run.cfg.train.weight_decay
                                         or run.cfg.train.lr_schedule != "constant")},
    }
    return metrics, figures
