"""The audit's figure and its line in the report: the least repudiable points' images with their scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayforge.io import atomic_path
from rayforge.train.run import TrainingRun

FIGURE = "audit_least_repudiable.png"
SHOWN = 16


def least_repudiable(points: pa.Table, count: int = SHOWN) -> np.ndarray:
    """Row numbers of the `count` highest scores (ties by point index)."""
    score = points.column("score").to_numpy()
    return np.lexsort((points.column("point").to_numpy(), -score))[:count]


def least_repudiable_figure(run: TrainingRun, points: pa.Table, out_dir: Path, count: int = SHOWN) -> Path | None:
    """A grid of the least repudiable training images, each titled with its index, label and score."""
    if len(points) == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = least_repudiable(points, count)
    train = run.load_dataset().train
    cols = min(8, len(rows))
    lines = -(-len(rows) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(1.6 * cols, 2.2 * lines + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, r in zip(axes.ravel(), rows):
        i = int(points.column("point")[int(r)].as_py())
        image = train.images[i]
        ax.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255)
        mark = "" if points.column("repudiable")[int(r)].as_py() else " ✗"
        ax.set_title(f"#{i} y={int(train.labels[i])}\ns={points.column('score')[int(r)].as_py():.2f}{mark}",
                     fontsize=8)
    fig.suptitle("Least repudiable training points (score > 1: no PoR, ✗)", fontsize=9)
    fig.tight_layout(h_pad=1.2)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / FIGURE) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out_dir / FIGURE


def audit_report(run_dir: str | Path) -> str:
    """The report's audit line (empty when `rayforge audit` has not run), refreshing the figure beside it."""
    audit = Path(run_dir) / "audit"
    if not (audit / "summary.json").is_file() or not (audit / "points.parquet").is_file():
        return ""
    s = json.loads((audit / "summary.json").read_text())
    least_repudiable_figure(TrainingRun.open(run_dir), pq.read_table(audit / "points.parquet"),
                            Path(run_dir) / "report")
    worst = ", ".join(f"#{p['point']} ({p['score']:.2f})" for p in s["least_repudiable"][:5])
    return (f"Repudiability audit: {s['share_repudiable']:.1%} of {s['points']} points repudiable "
            f"({s['not_repudiable']} not; strategy `{s['strategy']}`); least repudiable: {worst} ({FIGURE})\n")
