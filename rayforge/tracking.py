"""Metric logging from drivers only: always to `RUN/metrics/<stage>.jsonl`, and to W&B unless disabled.

W&B mode: `wandb.mode` in the config, else $WANDB_MODE, else online when an API key is configured, else offline
(so nothing is lost on machines without network access). Tests set WANDB_MODE=disabled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rayforge.config import WandbConfig


def resolve_wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode:
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricLogger:
    def __init__(self, run_dir: Path, stage: str, wandb_cfg: WandbConfig, config: dict | None = None,
                 run_name: str | None = None):
        self.path = Path(run_dir) / "metrics" / f"{stage}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._wandb = None
        mode = resolve_wandb_mode(wandb_cfg)
        if mode != "disabled":
            import wandb  # imported lazily: it is slow to import and unused when disabled

            self._wandb = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, mode=mode,
                                     dir=str(Path(run_dir)), name=f"{run_name or Path(run_dir).name}-{stage}",
                                     group=run_name or Path(run_dir).name, job_type=stage, config=config,
                                     reinit="finish_previous")

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        record = {"step": step, **metrics} if step is not None else dict(metrics)
        self._file.write(json.dumps(record, sort_keys=True, default=float) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def media(self, images: dict[str, Path], tables: dict[str, tuple[list[str], list[list]]]) -> None:
        """Figures (already on disk) and tables to W&B; on disk they are the report's own files."""
        if self._wandb is not None:
            import wandb

            payload = {name: wandb.Image(str(path)) for name, path in images.items()}
            payload.update({name: wandb.Table(columns=cols, data=rows) for name, (cols, rows) in tables.items()})
            self._wandb.log(payload)

    def summary(self, metrics: dict[str, Any]) -> None:
        self.log({"summary": metrics})
        if self._wandb is not None:
            self._wandb.summary.update(metrics)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
