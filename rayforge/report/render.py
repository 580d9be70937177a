"""`rayforge report`: metrics.json, Tables I-IV in markdown, and the figures (Fig. 3-5 box plots, ROC curves, the
prediction changes with their intervals), one column (or box) per attacked forging strategy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rayforge.audit.figure import audit_report
from rayforge.config import WandbConfig
from rayforge.io import atomic_write, atomic_write_json, atomic_write_text
from rayforge.report.metrics import KINDS, compute_metrics
from rayforge.tracking import MetricLogger
from rayforge.train.run import TrainingRun

ATTACK_TITLES = {"lira": "LiRA", "enhanced": "EnhancedMIA", "enhanced_ref": "EnhancedMIA (ref.)", "mentr": "MEntr",
                 "xent": "Xent", "mida": "MIDA"}
ORDER = list(ATTACK_TITLES)
KIND_TITLES = {"diff": ("I", "Diff"), "common": ("II", "Common"), "validation": ("III", "Validation")}


def attack_names(attacks) -> list[str]:
    """The run's attacks, the paper's order first, any other after (by name)."""
    return [a for a in ORDER if a in attacks] + sorted(a for a in attacks if a not in ORDER)


def title(attack: str) -> str:
    return ATTACK_TITLES.get(attack, attack)


def percent(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}% [{ci[0]:.2f}, {ci[1]:.2f}]"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def tables_md(metrics: dict) -> str:
    s = metrics["setting"]
    per = metrics.get("strategies") or {s["strategy"]: metrics}
    strategies = list(per)
    names = attack_names(metrics["attacks"])
    dagger = "†" if s["modified_sgd"] else ""
    out = [f"# Report: {s['dataset']} {s['model']}, n={s['n']}{dagger}, τ={s['tau']}, "
           f"strategies {', '.join(strategies)} (main: {s['strategy']})\n",
           "c_A^U cells: percent of evaluated points with a changed prediction, [Wilson 95 % interval].\n"]
    settings = [[st, str(m["setting"]["lam"]), str(m["setting"]["kappa"]), str(m["setting"]["mu"]),
                 str(m["setting"].get("pool_size", "–")), str(m["setting"]["evaluated_points"])]
                for st, m in per.items()]
    out += _table(["Strategy", "λ", "κ", "μ", "swap pool", "evaluated points"], settings) + [""]
    for kind in KINDS:
        number, name = KIND_TITLES[kind]
        out += [f"## Table {number}: % data points with different MI predictions in the {name} setting\n"]
        rows = [[title(a)] + [percent(per[st]["attacks"][a][f"c_{kind}"], per[st]["attacks"][a][f"c_{kind}_ci"])
                              if a in per[st]["attacks"] else "–" for st in strategies] for a in names]
        out += _table(["Attack"] + strategies, rows) + [""]
    out += ["## Membership-equivalent PoRs: % of evaluated points with no Diff, Common or Validation change\n"]
    rows = []
    for key, label in (("all", "all attacks"), ("lira_enhanced", "LiRA and EnhancedMIA")):
        used = ", ".join(title(a) for a in metrics["valid_por_attacks"][key]) or "none run"
        rows.append([f"{label} ({used})"] + [percent(per[st]["valid_por_percent"][key], per[st]["valid_por_ci"][key])
                                             for st in strategies])
    out += _table(["Attacks"] + strategies, rows) + [""]
    out += ["## Table IV: uniformity of forged minibatches (ℓ1 to uniform)\n",
            "Reference: the expected ℓ1 of an i.i.d. SGD log with the same n − λ points, batch sizes and τ (every "
            "sample drawn uniformly with replacement, the paper's \"standard SGD\"; without replacement within a "
            "batch in brackets).\n"]
    rows = [[st, str(m["setting"]["lam"]), f"{m['uniformity_l1']['mean']:.4f} ± {m['uniformity_l1']['stderr']:.4f} "
             f"({m['uniformity_l1']['pors']} PoRs)", f"{m['uniformity_l1']['original']:.4f}",
             f"{m['uniformity_l1']['iid_with_replacement']:.4f} ({m['uniformity_l1']['iid_without_replacement']:.4f})"]
            for st, m in per.items()]
    out += _table(["Strategy", "λ", "ℓ1 distance", "original log", "i.i.d. SGD"], rows) + [""]
    out += ["## Model distance d_θ = ‖θ* − θ'‖²/dim(θ)\n"]
    rows = [[st, f"{m['d_theta']['mean']:.3g}", f"{m['d_theta']['median']:.3g}", f"{m['d_theta']['p90']:.3g}",
             f"{np.log10(m['d_theta']['mean']):.2f}" if m["d_theta"]["mean"] > 0 else "–"] for st, m in per.items()]
    out += _table(["Strategy", "mean", "median", "p90", "log10 mean"], rows) + [""]
    out += ["## Attack quality on the original model and score differences\n",
            "Control AUC: one shadow model plays the target (target and shadows exchangeable).\n"]
    rows = []
    for a in names:
        m = metrics["attacks"][a]
        control = f"{m['control_auc']:.4f}" if "control_auc" in m else "–"
        rows.append([title(a), f"{m['auc']:.4f}", control, f"{m['tpr_at_0.1_fpr']:.4f}"]
                    + [f"{per[st]['attacks'][a]['s_median']:.3g}" if a in per[st]["attacks"] else "–"
                       for st in strategies])
    out += _table(["Attack", "AUC", "control AUC", "TPR @ 0.1% FPR"] + [f"median s_A ({st})" for st in strategies],
                  rows) + [""]
    return "\n".join(out)


def figures(metrics: dict, figs: dict, out: Path, label: str) -> list[Path]:
    """Fig. 3 (d_θ), Fig. 4-5 (s_A), the prediction changes with intervals (one box/bar per strategy) and the
    original model's ROC curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(figs)
    names = attack_names(figs[strategies[0]]["s"])
    width = 0.8 / len(strategies)
    offsets = [(j - (len(strategies) - 1) / 2) * width for j in range(len(strategies))]

    def save(fig, path: Path) -> Path:
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        plt.close(fig)
        return path

    fig, ax = plt.subplots(figsize=(1.2 * len(strategies) + 3, 4))
    ax.boxplot([np.log10(np.maximum(figs[st]["d_theta"], 1e-300)) for st in strategies], showfliers=False)
    ax.set_xticks(range(1, len(strategies) + 1), strategies)
    ax.set_ylabel(r"$\log_{10}(\|\theta_*-\theta_{-i}\|_2^2/\dim\theta)$")
    ax.set_title(f"Fig. 3: model distance d_θ ({label})")
    paths = [save(fig, out / "fig3_d_theta.png")]

    fig, ax = plt.subplots(figsize=(1.4 * len(names) * max(1, len(strategies) / 2) + 2, 4))
    for j, st in enumerate(strategies):
        at = [i + 1 + offsets[j] for i in range(len(names))]
        # outliers hidden, as in the paper's figures
        box = ax.boxplot([figs[st]["s"][a] for a in names], positions=at, widths=width * 0.9, showfliers=False,
                         patch_artist=True)
        for patch in box["boxes"]:
            patch.set_facecolor(f"C{j}")
        ax.plot([], [], color=f"C{j}", lw=6, label=st)
    ax.set_xticks(range(1, len(names) + 1), [title(a) for a in names])
    ax.set_ylabel(r"$s_A = |score(x_i,\theta_{-i}) - score(x_i,\theta_*)|$")
    ax.set_title("Fig. 4-5: membership score differences")
    ax.legend()
    paths.append(save(fig, out / "fig4_score_differences.png"))

    per = metrics.get("strategies") or {strategies[0]: metrics}
    fig, axes = plt.subplots(1, len(KINDS), figsize=(4 * len(KINDS) + 1, 4), sharey=True)
    for ax, kind in zip(axes, KINDS):
        for j, st in enumerate(strategies):
            values = np.array([per[st]["attacks"][a][f"c_{kind}"] for a in names])
            ci = np.array([per[st]["attacks"][a][f"c_{kind}_ci"] for a in names]).reshape(-1, 2)
            ax.bar(np.arange(len(names)) + offsets[j], values, width, yerr=[values - ci[:, 0], ci[:, 1] - values],
                   capsize=3, color=f"C{j}", label=st)
        ax.set_xticks(range(len(names)), [title(a) for a in names], rotation=30)
        ax.set_title(f"Table {KIND_TITLES[kind][0]}: {KIND_TITLES[kind][1]}")
    axes[0].set_ylabel("% points with a changed prediction (Wilson 95 %)")
    axes[0].legend()
    paths.append(save(fig, out / "fig_prediction_changes.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    main = figs[strategies[0]]["roc"]
    for a in names:
        fpr, tpr, _ = main[a]
        ax.plot(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), label=title(a))
    ax.plot([1e-5, 1], [1e-5, 1], "k:", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC on the original model")
    ax.legend()
    paths.append(save(fig, out / "roc.png"))
    return paths


def write_report(run_dir: str | Path, strategy: str | None = None, wandb_cfg: WandbConfig | None = None) -> dict:
    """metrics.json, tables.md and the figures under RUN/report/ for every attacked strategy of the run, `strategy`
    (default: the config's) the main one; W&B per `wandb_cfg` (default: the run's)."""
    metrics, figs = compute_metrics(run_dir, strategy)
    out = Path(run_dir) / "report"
    out.mkdir(exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "tables.md", tables_md(metrics) + audit_report(run_dir))  # "" until `rayforge audit`
    s = metrics["setting"]
    paths = figures(metrics, figs, out, f"{s['dataset']} {s['model']} n={s['n']}")
    run = TrainingRun.open(run_dir)
    columns = ["strategy", "attack", "auc", "tpr_at_0.1_fpr", "c_diff", "c_common", "c_validation", "s_median"]
    rows = [[st, a] + [m[c] for c in columns[2:]] for st, sm in metrics["strategies"].items()
            for a, m in sm["attacks"].items()]
    summary = {}
    for st, sm in metrics["strategies"].items():
        prefix = "" if st == s["strategy"] else f"{st}/"
        summary.update({f"{prefix}d_theta_{k}": v for k, v in sm["d_theta"].items()})
        summary.update({f"{prefix}valid_por_{k}": v for k, v in sm["valid_por_percent"].items()})
        summary[f"{prefix}uniformity_l1"] = sm["uniformity_l1"]["mean"]
        summary.update({f"{prefix}{a}/{k}": v for a, m in sm["attacks"].items() for k, v in m.items()
                        if not k.endswith("_ci")})
    with MetricLogger(run.run_dir, "report", wandb_cfg or run.cfg.wandb, run.cfg.to_dict(), run_name=run.cfg.name) as log:
        log.media({p.stem: p for p in paths}, {"attacks": (columns, rows)})
        log.summary(summary)
    return metrics
