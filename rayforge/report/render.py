"""`rayforge report`: metrics.json, Tables I-IV in markdown, and the figures (Fig. 3-5 box plots, ROC curves)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rayforge.audit.figure import audit_report
from rayforge.config import WandbConfig
from rayforge.io import atomic_write, atomic_write_json, atomic_write_text
from rayforge.report.metrics import compute_metrics
from rayforge.tracking import MetricLogger
from rayforge.train.run import TrainingRun

ATTACK_TITLES = {"lira": "LiRA", "enhanced": "EnhancedMIA", "enhanced_ref": "EnhancedMIA-R", "mentr": "MEntr",
                 "xent": "Xent", "mida": "MIDA"}
ORDER = ["lira", "enhanced", "enhanced_ref", "mentr", "xent", "mida"]


def tables_md(metrics: dict) -> str:
    s = metrics["setting"]
    names = [a for a in ORDER if a in metrics["attacks"]]
    dagger = "†" if s["modified_sgd"] else ""
    head = "| Dataset | Model | n | λ | κ | " + " | ".join(ATTACK_TITLES[a] for a in names) + " |"
    rule = "|" + "---|" * (5 + len(names))
    lead = f"| {s['dataset']} | {s['model']} | {s['n']}{dagger} | {s['lam']} | {s['kappa']} | "
    out = [f"# Report: {s['dataset']} {s['model']}, strategy `{s['strategy']}`, μ={s['mu']}, τ={s['tau']}, "
           f"{s['evaluated_points']} evaluated points\n"]
    for number, kind, title in (("I", "diff", "Diff"), ("II", "common", "Common"), ("III", "validation", "Validation")):
        out += [f"## Table {number}: % data points with different MI predictions in the {title} setting\n", head, rule,
                lead + " | ".join(f"{metrics['attacks'][a][f'c_{kind}']:.2f}%" for a in names) + " |", ""]
    u = metrics["uniformity_l1"]
    out += ["## Table IV: uniformity of forged minibatches (ℓ1 to uniform)\n",
            "| Dataset | Model | n | λ | κ | ℓ1 distance (PoRs) | original log |", "|---|---|---|---|---|---|---|",
            lead + f"{u['mean']:.4f} ± {u['stderr']:.4f} ({u['pors']} PoRs) | {u['original']:.4f} |", ""]
    out += ["## Attack quality on the original model and score differences\n",
            "| Attack | AUC | TPR @ 0.1% FPR | median s_A |", "|---|---|---|---|"]
    out += [f"| {ATTACK_TITLES[a]} | {metrics['attacks'][a]['auc']:.4f} | "
            f"{metrics['attacks'][a]['tpr_at_0.1_fpr']:.4f} | {metrics['attacks'][a]['s_median']:.3g} |" for a in names]
    d = metrics["d_theta"]
    out += ["", f"d_θ = ‖θ* − θ'‖²/dim: median {d['median']:.3g}, p90 {d['p90']:.3g} "
                f"(log10 median {np.log10(d['median']):.2f})" if d["median"] > 0 else "", ""]
    return "\n".join(out)


def figures(figs: dict, out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def boxplot(path: Path, groups: list, labels: list[str], ylabel: str, title: str, width: float) -> Path:
        fig, ax = plt.subplots(figsize=(width, 4))
        ax.boxplot(groups, showfliers=False)  # outliers hidden, as in the paper's figures
        ax.set_xticks(range(1, len(labels) + 1), labels)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        plt.close(fig)
        return path

    names = [a for a in ORDER if a in figs["s"]]
    paths = [
        boxplot(out / "fig3_d_theta.png", [np.log10(np.maximum(figs["d_theta"], 1e-300))], [title],
                r"$\log_{10}(\|\theta_*-\theta_{-i}\|_2^2/\dim\theta)$", "Fig. 3: model distance d_θ", 4),
        boxplot(out / "fig4_score_differences.png", [figs["s"][a] for a in names], [ATTACK_TITLES[a] for a in names],
                r"$s_A = |score(x_i,\theta_{-i}) - score(x_i,\theta_*)|$", "Fig. 4-5: membership score differences",
                1.4 * len(names) + 2),
    ]

    fig, ax = plt.subplots(figsize=(5, 5))
    for a in names:
        fpr, tpr, _ = figs["roc"][a]
        ax.plot(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), label=ATTACK_TITLES[a])
    ax.plot([1e-5, 1], [1e-5, 1], "k:", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC on the original model")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "roc.png")
    atomic_write(paths[-1], lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return paths


def write_report(run_dir: str | Path, strategy: str = "paper", wandb_cfg: WandbConfig | None = None) -> dict:
    """metrics.json, tables.md and the figures under RUN/report/; W&B per `wandb_cfg` (default: the run's)."""
    metrics, figs = compute_metrics(run_dir, strategy)
    out = Path(run_dir) / "report"
    out.mkdir(exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "tables.md", tables_md(metrics) + audit_report(run_dir))  # "" until `rayforge audit`
    s = metrics["setting"]
    paths = figures(figs, out, f"{s['dataset']} {s['model']} λ={s['lam']}")
    run = TrainingRun.open(run_dir)
    columns = ["attack", "auc", "tpr_at_0.1_fpr", "c_diff", "c_common", "c_validation", "s_median"]
    rows = [[a] + [m[c] for c in columns[1:]] for a, m in metrics["attacks"].items()]
    wandb_cfg = wandb_cfg or run.cfg.wandb
    with MetricLogger(run.run_dir, f"report-{strategy}", wandb_cfg, run.cfg.to_dict(), run_name=run.cfg.name) as log:
        log.media({p.stem: p for p in paths}, {"attacks": (columns, rows)})
        log.summary({"d_theta_median": metrics["d_theta"]["median"], "d_theta_p90": metrics["d_theta"]["p90"],
                     "uniformity_l1": metrics["uniformity_l1"]["mean"],
                     **{f"{a}/{k}": v for a, m in metrics["attacks"].items() for k, v in m.items()}})
    return metrics
