"""The paper's metrics (Section IV-A, Table IV, Section IV-E) computed from a run's attack-stage output.

    c_A^U   percent of evaluated points x_i for which attack A predicts differently on θ* and θ_{-i} for at least
            one z in U (U = Diff {x_i}, Common: 5 points of D \\ X̂_g, Validation: 5 held-out points), with a
            Wilson 95 % interval (the evaluated points are the trials)
    valid   the Discussion's headline (Section IV-E): percent of evaluated points whose PoR is membership-equivalent,
            i.e. no Diff, Common or Validation prediction changes, under every attack of the run and under LiRA and
            EnhancedMIA only
    s_A     |score(x_i, θ_{-i}) − score(x_i, θ*)|, median over evaluated points
    d_θ     ‖θ* − θ_{-i}‖²₂ / dim(θ): mean (what the paper reports), median and 90th percentile over forged models
    ℓ1      uniformity: ℓ1 distance between the sample frequencies in a PoR's batches (over D \\ X̂_g) and the
            uniform distribution, mean ± standard error over (up to) 100 PoRs, next to the original log's and to the
            expected value for an i.i.d. SGD sampler with the same n, batch sizes and τ (the paper's "standard SGD"
            reference, 0.177 for its n=10K setting)
Plus each attack's quality on the original model: AUC and TPR at 0.1% FPR, members (D) against held-out points, and
the exchangeable-control AUC (one shadow playing the target) when the attack stage wrote it.

A run may hold the attack-stage output of several forging strategies (`RUN/attack/<strategy>/`): each gets its own
section; the main one's metrics also sit at the top level.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from rayforge.attacks.metrics import auc, mean_stderr, prediction_difference, roc, tpr_at_fpr
from rayforge.errors import MalformedArtifact, RayforgeError
from rayforge.forge.engine import STRATEGIES
from rayforge.rebuild.forged_log import ForgedLogs
from rayforge.train.run import TrainingRun

UNIFORMITY_PORS = 100
UNIFORMITY_STREAM = 0x0F1F
KINDS = ("diff", "common", "validation")
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
HEADLINE = ("lira", "enhanced")  # the paper's state-of-the-art attacks (Section IV-E: LiRA and EnhancedMIA)
OUTPUTS = ("original.parquet", "scores.parquet", "distances.parquet")


def wilson_interval(k: int, n: int, z: float = Z95) -> list[float]:
    """Wilson score interval of a proportion k/n, in percent: [low, high]."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, n >= 1 (got k={k}, n={n})")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends: rounding would leave 1e-17 or 0.99999...
    high = 1.0 if k == n else min(1.0, centre + half)
    return [100.0 * low, 100.0 * high]


def percent_with_ci(flags: np.ndarray) -> tuple[float, list[float]]:
    """(percent of True flags, its Wilson 95 % interval)."""
    flags = np.asarray(flags, dtype=bool)
    return 100.0 * float(flags.mean()), wilson_interval(int(flags.sum()), len(flags))


# ---- Table IV -----------------------------------------------------------------------------------------------------

def uniformity_over(batches, n: int, excluded: np.ndarray) -> float:
    """ℓ1 between the frequencies of the points of D \\ excluded in `batches` and the uniform distribution on them."""
    counts = np.bincount(np.concatenate(batches), minlength=n).astype(np.float64)
    keep = np.ones(n, dtype=bool)
    keep[excluded] = False
    freq = counts[keep] / counts[keep].sum()
    return float(np.abs(freq - 1.0 / keep.sum()).sum())


def _binomial_pmf(trials: int, p: float) -> np.ndarray:
    """Binomial(trials, p) probabilities of 0..trials (float64, from log-gamma: exact enough for any trials)."""
    if p >= 1.0:
        return np.eye(trials + 1)[trials]
    k = torch.arange(trials + 1, dtype=torch.float64)
    log_pmf = (torch.lgamma(torch.tensor(trials + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1)
               - torch.lgamma(trials - k + 1) + k * math.log(p) + (trials - k) * math.log1p(-p))
    return log_pmf.exp().numpy()


def iid_uniformity(points: int, batch_sizes) -> dict[str, float]:
    """Expected Table IV ℓ1 of an ideal i.i.d. SGD log over `points` points with these batch sizes (one per step).

    with_replacement: every sample of every batch drawn uniformly and independently (counts multinomial; the
    paper's "standard SGD" reference, 0.177 at n=10K, b=100, τ=2K). without_replacement: every batch b distinct
    points drawn uniformly, batches independent (the yellow curve of the paper's Fig. 9). A point's count is then
    Binomial(M, 1/n) resp. a sum of Bernoulli(b_t/n); the total M = Σ b_t is fixed, so E ℓ1 = n · E|X − M/n| / M.
    An epoch-wise permutation (what `rayforge train` does) gives 0 when n divides the samples evenly.
    """
    sizes = np.asarray(batch_sizes, dtype=np.int64)
    total = int(sizes.sum())
    if points < 1 or total < 1 or sizes.min() > points:
        raise ValueError(f"iid_uniformity needs points >= 1 and batches of at most {points} samples")
    expected = total / points

    def mean_abs_dev(pmf: np.ndarray) -> float:
        return float(np.sum(pmf * np.abs(np.arange(len(pmf)) - expected)))

    without = np.array([1.0])
    for size, steps in zip(*np.unique(sizes, return_counts=True)):
        without = np.convolve(without, _binomial_pmf(int(steps), min(1.0, size / points)))
    return {"with_replacement": points * mean_abs_dev(_binomial_pmf(total, 1.0 / points)) / total,
            "without_replacement": points * mean_abs_dev(without) / total}


def uniformity(run: TrainingRun, logs: ForgedLogs, groups: np.ndarray, seed: int) -> dict:
    n = int(run.info["n"])
    rng = np.random.default_rng([seed, UNIFORMITY_STREAM])
    chosen = rng.choice(groups, size=min(UNIFORMITY_PORS, len(groups)), replace=False)
    values = [uniformity_over(logs.group_log(int(g)).steps(run.steps).batch, n, logs.splits.groups[g])
              for g in chosen]
    mean, stderr = mean_stderr(values)
    iid = iid_uniformity(n - logs.params.lam, [len(b) for b in run.steps.batch])
    return {"mean": mean, "stderr": stderr, "pors": len(values),
            "original": uniformity_over(run.steps.batch, n, np.array([], dtype=np.int64)),
            "iid_with_replacement": iid["with_replacement"], "iid_without_replacement": iid["without_replacement"]}


# ---- Tables I-III and the headline ---------------------------------------------------------------------------------

def prediction_changes(rows: list[dict], orig_pred: dict[int, bool], kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(original, forged) bool (P, U) predictions on the `kind` queries of each evaluated point's row."""
    forged = [[p for p, k in zip(r["pred"], r["kind"]) if k == kind] for r in rows]
    origin = [[orig_pred[z] for z, k in zip(r["z"], r["kind"]) if k == kind] for r in rows]
    return np.array(origin, dtype=bool), np.array(forged, dtype=bool)


def valid_por(changed: dict[str, np.ndarray], points: np.ndarray) -> dict:
    """The headline: % of evaluated points whose PoR changes no prediction of the named attacks."""
    out = {"valid_por_percent": {}, "valid_por_ci": {}, "valid_por_attacks": {}}
    for key, names in (("all", sorted(changed)), ("lira_enhanced", [a for a in HEADLINE if a in changed])):
        out["valid_por_attacks"][key] = names
        if not names:
            out["valid_por_percent"][key], out["valid_por_ci"][key] = None, None
            continue
        invalid = np.zeros(len(points), dtype=bool)
        for name in names:
            invalid |= changed[name]
        out["valid_por_percent"][key], out["valid_por_ci"][key] = percent_with_ci(~invalid)
    return out


def control_aucs(attack_dir: Path) -> dict[str, float]:
    """The exchangeable-control AUC per attack (shadows in turn playing the target), from RUN/attack/control.json
    when the attack stage wrote one ({"attacks": {name: {"auc": x or null, ...}}}); attacks without one are left out."""
    path = attack_dir / "control.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())["attacks"]
        return {str(a): float(v["auc"]) for a, v in raw.items() if v.get("auc") is not None}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MalformedArtifact(f"{path}: unreadable control AUCs ({exc})") from None


def strategy_metrics(run: TrainingRun, strategy: str) -> tuple[dict, dict]:
    """(metrics, arrays for the figures) of one strategy's attack-stage output."""
    out = Path(run.run_dir) / "attack" / strategy
    for name in OUTPUTS:
        if not (out / name).is_file():
            raise RayforgeError(f"no {out / name}: run `rayforge attack {run.run_dir} --strategy {strategy}` first")
    original = pq.read_table(out / "original.parquet").to_pydict()
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    distances = pq.read_table(out / "distances.parquet")
    d = distances.column("d_theta").to_numpy()
    control = control_aucs(out.parent)

    orig_score, orig_pred, members = {}, {}, {}
    for i, a, s, p, m in zip(original["id"], original["attack"], original["score"], original["pred"],
                             original["member"]):
        orig_score.setdefault(a, {})[i] = s
        orig_pred.setdefault(a, {})[i] = p
        members.setdefault(a, {})[i] = m

    points = np.unique([r["point"] for r in scores])
    attacks, changed, figures = {}, {}, {"d_theta": d, "s": {}, "roc": {}}
    for name in sorted(orig_score):
        rows = sorted((r for r in scores if r["attack"] == name), key=lambda r: r["point"])
        if [r["point"] for r in rows] != points.tolist():
            raise MalformedArtifact(f"{out / 'scores.parquet'}: attack {name} did not score every evaluated point")
        ids = np.array(list(orig_score[name]))
        sc = np.array([orig_score[name][i] for i in ids])
        lab = np.array([members[name][i] for i in ids])
        result = {"auc": auc(sc, lab), "tpr_at_0.1_fpr": tpr_at_fpr(sc, lab, 0.001)}
        if name in control:
            result["control_auc"] = control[name]
        changed[name] = np.zeros(len(rows), dtype=bool)
        for kind in KINDS:
            origin, forged = prediction_changes(rows, orig_pred[name], kind)
            flags = np.any(origin != forged, axis=1)
            changed[name] |= flags
            result[f"c_{kind}"] = prediction_difference(origin, forged)
            result[f"c_{kind}_ci"] = wilson_interval(int(flags.sum()), len(flags))
        s = np.array([abs(r["score"][r["kind"].index("diff")] - orig_score[name][r["point"]]) for r in rows])
        result["s_median"] = float(np.median(s))
        attacks[name] = result
        figures["s"][name] = s
        figures["roc"][name] = roc(sc, lab)
    logs = ForgedLogs(run, strategy)
    groups = np.unique(distances.column("group").to_numpy())
    metrics = {
        "attacks": attacks,
        **valid_por(changed, points),
        "d_theta": {"mean": float(np.mean(d)), "median": float(np.median(d)), "p90": float(np.quantile(d, 0.9))},
        "uniformity_l1": uniformity(run, logs, groups, run.cfg.seed),
        "setting": {"dataset": run.cfg.data.dataset, "model": run.cfg.model.name, "n": int(run.info["n"]),
                    "tau": run.total_steps, "lam": logs.params.lam, "kappa": logs.params.kappa,
                    "mu": logs.params.mu, "strategy": strategy, "evaluated_points": len(points),
                    "modified_sgd": bool(run.cfg.train.momentum or run.cfg.train.weight_decay
                                         or run.cfg.train.lr_schedule != "constant")},
    }
    if strategy != "paper":
        metrics["setting"]["pool_size"] = logs.params.pool_size
    return metrics, figures


def attacked_strategies(run_dir: str | Path) -> list[str]:
    """The strategies whose attack-stage output is complete under RUN/attack/, in registry order."""
    root = Path(run_dir) / "attack"
    return [s for s in STRATEGIES if all((root / s / name).is_file() for name in OUTPUTS)]


def compute_metrics(run_dir: str | Path, strategy: str | None = None) -> tuple[dict, dict]:
    """(metrics.json content, {strategy: arrays for the figures}) over every attacked strategy of the run.

    The main strategy (`strategy`, else the config's when it was attacked, else the first attacked) keeps today's
    top-level keys; `strategies` holds every strategy's metrics, the main one included."""
    run = TrainingRun.open(run_dir)
    found = attacked_strategies(run.run_dir)
    if strategy is None:
        strategy = run.cfg.forge.strategy if run.cfg.forge.strategy in found else (found or ["paper"])[0]
    names = [strategy] + [s for s in found if s != strategy]
    results = {s: strategy_metrics(run, s) for s in names}
    metrics = {**results[strategy][0], "strategies": {s: m for s, (m, _) in results.items()}}
    return metrics, {s: f for s, (_, f) in results.items()}
