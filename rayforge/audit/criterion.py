"""Which training points can be repudiated: the per-point criterion of `rayforge audit`, and its evidence.

A point's `score` is the largest of the criteria below that apply, each in units of its threshold (higher = harder
to repudiate); the point is repudiable exactly when score <= 1.

1. Unmatched influence (always; the mechanism of Theorem 1, `rayforge.audit.substitution`). At every audited step
   t that trained on x_i, the best substitute j* from the rest of D leaves the residual g_i − g_j* of its
   per-sample gradient. Its first-order effect on the point's own loss, summed over those steps (TracIn's
   self-influence, with the substitute subtracted), is

       unmatched_influence = Σ_t lr_t / |B_t| · ⟨g_i(θ_t), g_i(θ_t) − g_j*(θ_t)⟩       (nats)

   how much less the forged model has learned x_i than θ*: what MI attacks look for. It is compared with the
   mean over the audited points of `self_influence` Σ_t lr_t/|B_t|·‖g_i‖², the first-order loss increase of
   leaving a point out entirely: the average membership signal (to first order the train/test loss gap that
   loss-based attacks exploit); the component is their ratio. So a point is not repudiable when even its
   best-substituted forged log forgets it more than leaving out an average point would. No constant is tuned:
   the threshold is the run's own average point (calibrated on the run itself).
   The share of the gradient that has no substitute,

       unmatched = sqrt( Σ_t lr_t² · min_j ‖g_i − g_j‖²  /  Σ_t lr_t² · ‖g_i‖² ),

   is reported as evidence: Theorem 1's quantity (for its x₁ every step has min_j ‖g₁ − g_j‖ >=
   ‖p₁ − y₁‖·dist(x̃₁, Γ̃), so unmatched >= dist(x̃₁, Γ̃)/‖x̃₁‖ with x̃ = (x, 1)). It does not decide alone: a
   point nothing can stand in for but whose gradient stays small leaves nothing an attack can see (departure
   from the theorem's exact, zero-error notion of a valid PoR; the measurements are in README "Repudiability
   audit": on a run with planted out-of-distribution images, the score ranks the attacks' member-score drop on
   x* under its minimal PoR with Spearman 0.73, `unmatched` alone 0.54).
2. Attacks (when `rayforge attack` ran): the paper's Diff criterion (Section IV-A, Table I) counts a PoR as failed
   when an attack's member prediction on x* differs between θ* and θ'. The audit departs from it in two ways:
   only a claim can be refuted, so only a flip from member (on θ*) to non-member (on θ') counts; and only when
   the shift of that attack's score on x* exceeds ATTACK_NOISE_QUANTILE of the shifts the same forged models
   cause on Common points (members of both models: their shifts are forging noise, not evidence about x*). The
   component is |shift| / that quantile for such a flip. `attack_flips` lists every flip either way, so the
   paper's own count stays available (summary.json "paper_diff_share").

Evidence that does not decide: phase 1's grad_error/grad_norm of the point's group's forged batches
(`forge_rel_error`) and phase 2's d_θ of its forged model: both are about the whole forged batch or model (on the
planted run d_θ of phase 1's group PoRs ranks the attacks' drop on x* with Spearman 0.21, against 0.83 for minimal
PoRs, which swap only x*).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayforge.forge.engine import forge_dir
from rayforge.train.run import TrainingRun

ATTACK_NOISE_QUANTILE = 0.99  # of the Common points' |score shift|: forging noise (see the module docstring)

BASE_SCHEMA = [
    ("point", pa.int64()),
    ("repudiable", pa.bool_()),
    ("score", pa.float64()),
    ("reason", pa.string()),
    ("appearances", pa.int64()),  # audited steps that trained on the point
    ("unmatched_influence", pa.float64()),  # criterion 1 (nats, first order)
    ("self_influence", pa.float64()),  # Σ_t lr_t/b ‖g_i‖² (TracIn self-influence over the audited steps)
    ("unmatched", pa.float64()),  # the share of its gradient without a substitute (Theorem 1's quantity)
    ("swap_rel_error", pa.float64()),  # mean over those steps of min_j‖g_i − g_j‖ / (b ‖∇B_t‖): the relative batch
    # gradient error of the best single substitution (the minimal PoR's), comparable to phase 1's grad_error/norm
    ("forge_rel_error", pa.float64()),  # phase 1: mean grad_error/grad_norm of the forged batches of its group
    ("d_theta", pa.float64()),  # phase 2: d_θ of its group's forged model
    ("attack_flips", pa.string()),  # attacks whose prediction on x* differs between θ* and θ' (paper's Diff)
]


def mechanism(rows: pa.Table, points: np.ndarray) -> dict[str, np.ndarray]:
    """Per audited point (in `points` order): appearances, unmatched_influence, self_influence, unmatched,
    swap_rel_error."""
    pos = np.searchsorted(points, rows.column("point").to_numpy())
    col = {name: rows.column(name).to_numpy() for name in ("lr", "batch_size", "grad_norm", "residual", "dot",
                                                           "batch_grad_norm")}

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(pos, weights=values, minlength=len(points))

    lr2 = col["lr"] ** 2
    count = np.bincount(pos, minlength=len(points))
    own = total(lr2 * col["grad_norm"] ** 2)
    unmatched = np.sqrt(np.divide(total(lr2 * col["residual"] ** 2), own, out=np.zeros(len(points)), where=own > 0))
    rel = col["residual"] / col["batch_size"] / np.maximum(col["batch_grad_norm"], 1e-30)
    step = col["lr"] / col["batch_size"]
    return {"appearances": count, "unmatched": unmatched, "unmatched_influence": total(step * col["dot"]),
            "self_influence": total(step * col["grad_norm"] ** 2),
            "swap_rel_error": np.divide(total(rel), count, out=np.full(len(points), np.nan), where=count > 0)}


def phase1_evidence(run: TrainingRun, strategy: str, points: np.ndarray) -> np.ndarray:
    """Mean grad_error/grad_norm over the forged batches each point's group uses (NaN where phase 1 has none)."""
    out = np.full(len(points), np.nan)
    if not (forge_dir(run.run_dir, strategy) / "forged.parquet").is_file():
        return out
    from rayforge.rebuild.forged_log import ForgedLogs

    logs = ForgedLogs(run, strategy)
    table = pq.read_table(forge_dir(run.run_dir, strategy) / "forged.parquet")
    kappa = logs.params.kappa
    keys = table.column("step").to_numpy() * kappa + table.column("part").to_numpy()
    rel = table.column("grad_error").to_numpy() / np.maximum(table.column("grad_norm").to_numpy(), 1e-30)
    for group in np.unique(logs.splits.group_of[points]):
        steps = logs.appearances(int(group))
        wanted = np.array([t * kappa + logs.part(int(t), int(group)) for t in steps], dtype=np.int64)
        row = np.searchsorted(keys, wanted)
        found = (row < len(keys)) & (keys[np.minimum(row, len(keys) - 1)] == wanted)
        if found.any():
            out[logs.splits.group_of[points] == group] = float(rel[row[found]].mean())
    return out


def phase2_evidence(run: TrainingRun, strategy: str, points: np.ndarray) -> np.ndarray:
    """d_θ of each point's group's forged model (NaN where phase 2 did not rebuild it)."""
    for stage in ("rebuild", "attack"):
        path = Path(run.run_dir) / stage / strategy / "distances.parquet"
        if path.is_file():
            table = pq.read_table(path)
            members, d = table.column("members").to_pylist(), table.column("d_theta").to_numpy()
            where = {int(m): float(v) for ms, v in zip(members, d) for m in ms}
            return np.array([where.get(int(p), np.nan) for p in points])
    return np.full(len(points), np.nan)


def attack_evidence(run: TrainingRun, strategy: str, points: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """{attack: {"shift": score(x*, θ') − score(x*, θ*), "flip": the prediction differs, "refuted": member on θ*
    and non-member on θ', "noise": the Common-shift quantile}} for the points the attack stage evaluated (NaN /
    False elsewhere)."""
    out_dir = Path(run.run_dir) / "attack" / strategy
    if not ((out_dir / "scores.parquet").is_file() and (out_dir / "original.parquet").is_file()):
        return {}
    original = pq.read_table(out_dir / "original.parquet").to_pydict()
    orig = {(a, i): (s, p) for i, a, s, p in zip(original["id"], original["attack"], original["score"],
                                                  original["pred"])}
    result: dict[str, dict] = {}
    common_shifts: dict[str, list[float]] = {}
    index = {int(p): k for k, p in enumerate(points)}
    for r in pq.read_table(out_dir / "scores.parquet").to_pylist():
        a = r["attack"]
        entry = result.setdefault(a, {"shift": np.full(len(points), np.nan), "flip": np.zeros(len(points), bool),
                                      "refuted": np.zeros(len(points), bool)})
        for z, kind, score, pred in zip(r["z"], r["kind"], r["score"], r["pred"]):
            o_score, o_pred = orig[(a, z)]
            if kind == "common":
                common_shifts.setdefault(a, []).append(abs(score - o_score))
            elif kind == "diff" and z in index:
                entry["shift"][index[z]] = score - o_score
                entry["flip"][index[z]] = bool(pred) != bool(o_pred)
                entry["refuted"][index[z]] = bool(o_pred) and not bool(pred)  # the claim "member" is dropped
    for a, entry in result.items():
        shifts = common_shifts.get(a, [])
        entry["noise"] = float(np.quantile(shifts, ATTACK_NOISE_QUANTILE)) if shifts else 0.0
    return result


def audit_points(run: TrainingRun, rows: pa.Table, strategy: str) -> pa.Table:
    """points.parquet: one row per audited point (all training points, or the sampled ones), sorted by point."""
    points = np.unique(rows.column("point").to_numpy()) if len(rows) else np.zeros(0, np.int64)
    mech = mechanism(rows, points)
    forge_rel = phase1_evidence(run, strategy, points)
    d_theta = phase2_evidence(run, strategy, points)
    attacks = attack_evidence(run, strategy, points)

    typical = float(np.mean(mech["self_influence"])) if len(points) else 0.0
    influence = mech["unmatched_influence"] / max(typical, 1e-300)
    components = [influence]
    flips = [[] for _ in points]
    attack_parts = {}
    for a, ev in sorted(attacks.items()):
        ratio = np.nan_to_num(np.abs(ev["shift"]) / max(ev["noise"], 1e-12), nan=0.0)
        attack_parts[a] = np.where(ev["refuted"], ratio, 0.0)
        components.append(attack_parts[a])
        for k in np.flatnonzero(ev["flip"]):
            flips[k].append(a)
    score = np.max(np.stack(components), axis=0) if len(points) else np.zeros(0)

    reasons = []
    for k in range(len(points)):
        why = []
        if influence[k] > 1:
            why.append(f"its forged log forgets it {influence[k]:.2f}x as much as leaving out an average point "
                       f"would: {mech['unmatched'][k]:.0%} of its gradient has no substitute in the rest of D "
                       f"(Theorem 1)")
        for a, part in attack_parts.items():
            if part[k] > 1:
                why.append(f"{a} calls it a member of θ* and a non-member of the forged model (score shift "
                           f"{attacks[a]['shift'][k]:+.3g}, {part[k]:.1f}x the forging noise on common members)")
        reasons.append("; ".join(why))

    columns = {
        "point": points.astype(np.int64), "repudiable": score <= 1.0, "score": score.astype(np.float64),
        "reason": reasons, "appearances": mech["appearances"].astype(np.int64),
        "unmatched_influence": mech["unmatched_influence"], "self_influence": mech["self_influence"],
        "unmatched": mech["unmatched"], "swap_rel_error": mech["swap_rel_error"],
        "forge_rel_error": forge_rel, "d_theta": d_theta, "attack_flips": [",".join(f) for f in flips],
    }
    fields = list(BASE_SCHEMA)
    for a, ev in sorted(attacks.items()):
        columns[f"shift_{a}"] = ev["shift"]
        fields.append((f"shift_{a}", pa.float64()))
    schema = pa.schema(fields)
    return pa.table({name: pa.array(columns[name], type=schema.field(name).type) for name in schema.names},
                    schema=schema)


def summarize(points: pa.Table, strategy: str, params) -> dict:
    """summary.json: counts, the repudiable share, what evidence was used, and the least repudiable points."""
    rep = points.column("repudiable").to_numpy(zero_copy_only=False)
    score = points.column("score").to_numpy()
    reasons = points.column("reason").to_pylist()
    flips = points.column("attack_flips").to_pylist()
    n = len(rep)
    order = np.lexsort((points.column("point").to_numpy(), -score))[:10]
    attacked = [c[len("shift_"):] for c in points.column_names if c.startswith("shift_")]
    evaluated = ~np.isnan(points.column(f"shift_{attacked[0]}").to_numpy()) if attacked else np.zeros(n, bool)
    return {
        "points": n,
        "repudiable": int(rep.sum()),
        "not_repudiable": int(n - rep.sum()),
        "share_repudiable": float(rep.mean()) if n else None,
        "strategy": strategy,
        "criterion": {"mean_self_influence": float(np.mean(points.column("self_influence").to_numpy()))
                      if n else None, "attack_noise_quantile": ATTACK_NOISE_QUANTILE},
        "substitution": params.to_json(),
        "evidence": {
            "mechanism": n,
            "phase1": int(np.isfinite(points.column("forge_rel_error").to_numpy()).sum()),
            "phase2": int(np.isfinite(points.column("d_theta").to_numpy()).sum()),
            "attacks": {"names": attacked, "evaluated_points": int(evaluated.sum())},
        },
        "reasons": {
            "unmatched_influence": sum("forgets it" in r for r in reasons),
            "attacks": sum("non-member of the forged model" in r for r in reasons),
        },
        # Section IV-A's Diff criterion on the evaluated points: no attack's prediction on x* flips.
        "paper_diff_share": float(np.mean([not f for f, e in zip(flips, evaluated) if e])) if evaluated.any()
        else None,
        "least_repudiable": [{"point": int(points.column("point")[k].as_py()), "score": float(score[k]),
                              "reason": reasons[k]} for k in order],
        "score_quantiles": {q: float(np.quantile(score, float(q))) for q in ("0.5", "0.9", "0.99")} if n else {},
    }
