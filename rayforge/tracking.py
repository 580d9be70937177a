"""Metric logging from drivers only: always to `RUN/metrics/<stage>.jsonl` (the source of truth, one flushed line
per call), and to W&B for dashboards unless disabled.

W&B mode: `wandb.mode` in the config, else $WANDB_MODE, else online when an API key is configured, else offline
(so nothing is lost on machines without network access). Tests set WANDB_MODE=disabled.

One W&B run per (run directory, stage): its id is derived from the resolved run directory, the stage, the run's
config and dataset hash, and kept in `RUN/metrics/wandb.json`, so a rerun or a resumed stage continues the same W&B
run (`resume="allow"`) instead of adding a duplicate, and two run directories never share one. Every stage's run
carries the run's config, dataset (name, n, SHA-256), model and seed. Metrics logged with a step are plotted
against their own step axis (`forge/step` for `forge/*`, declared with `define_metric`), so units may land in any
order. Online mode first probes the W&B server for a few seconds; when it cannot be reached (or `wandb.init`
fails), the run is logged offline under `RUN/wandb` with one warning line, to upload later with `wandb sync`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import yaml

from rayforge.config import WandbConfig
from rayforge.io import atomic_write_json

PROBE_TIMEOUT_S = 3.0  # how long online mode waits for the W&B server before logging offline
INIT_TIMEOUT_S = 30.0  # wandb.init's own limit once the server answered (wandb's default: 90 s)
_reachable_cache: dict[str, bool] = {}
_warned: set[str] = set()  # fall-back warnings already given (one line each per process)


def resolve_wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode:
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def stage_run(run_dir: str | Path, stage: str, final_dir: str | Path | None = None) -> dict:
    """The W&B run of (run directory, stage): the one recorded in `RUN/metrics/wandb.json`, else a new one whose
    id hashes the resolved run directory (`final_dir` when the run is being built elsewhere), the stage, the
    run's config and its dataset hash."""
    run_dir = Path(run_dir)
    recorded = _read_json(run_dir / "metrics" / "wandb.json").get(stage)
    if recorded:
        return {k: recorded[k] for k in ("id", "name", "group")}
    where = Path(final_dir or run_dir).resolve()
    config = run_dir / "config.yaml"
    digest = _sha256("\0".join([str(where), stage, _sha256(config.read_bytes()) if config.is_file() else "",
                                _read_json(run_dir / "dataset.json").get("train_sha256", "")]))
    return {"id": f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stage)}-{digest[:16]}", "name": f"{where.name}-{stage}",
            "group": f"{where.name}-{_sha256(str(where))[:8]}"}


def run_config(run_dir: str | Path, params: dict | None = None, final_dir: str | Path | None = None) -> dict:
    """What every stage's W&B run carries: the run's config (model, seed, ...), its dataset (name, n, SHA-256 of
    the training tensor), the run directory, and the stage's own parameters when they differ from the config."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else {}
    info = _read_json(run_dir / "dataset.json")
    out = {**config, "run_dir": str(Path(final_dir or run_dir).resolve())}
    if info:
        out["dataset"] = {"name": info.get("dataset"), "n": info.get("n"), "sha256": info.get("train_sha256")}
    if params and params != config:
        out["params"] = params
    return out


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an HTTP server answers at `url` within `timeout` seconds (any HTTP status counts; DNS included,
    so the probe runs in a daemon thread). Remembered per process."""
    if url not in _reachable_cache:
        answered: list[bool] = []

        def probe() -> None:
            try:
                urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
                answered.append(True)
            except urllib.error.HTTPError:
                answered.append(True)  # the server answered, with an error status
            except Exception:  # noqa: BLE001 - refused, DNS failure, timeout, TLS: all mean "not reachable"
                answered.append(False)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout)
        _reachable_cache[url] = bool(answered and answered[0])
    return _reachable_cache[url]


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"rayforge: warning: {message}", file=sys.stderr, flush=True)


def _init_wandb(mode: str, wandb_cfg: WandbConfig, wandb_dir: Path, run: dict, config: dict, tags: list[str]):
    """`wandb.init` for one stage; online falls back to offline (one warning line per process and cause) when the
    server is out of reach or init fails. Returns (run, mode used)."""
    import wandb  # imported lazily: it is slow to import and unused when disabled

    kwargs = dict(project=wandb_cfg.project, entity=wandb_cfg.entity, dir=str(wandb_dir), id=run["id"],
                  name=run["name"], group=run["group"], job_type=run["stage"], config=config, tags=tags,
                  resume="allow", reinit="finish_previous")
    if mode != "online":
        return wandb.init(mode=mode, **kwargs), mode
    offline = f"logging offline under {wandb_dir / 'wandb'} (upload later: wandb sync {wandb_dir / 'wandb'})"
    base_url = wandb.setup().settings.base_url
    if not reachable(base_url):
        _warn_once(f"W&B server {base_url} unreachable within {PROBE_TIMEOUT_S:g} s; {offline}")
    else:
        try:
            return wandb.init(mode="online", settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S), **kwargs), mode
        except wandb.errors.Error as exc:
            _warn_once(f"W&B init failed ({' '.join(str(exc).split())[:200]}); {offline}")
            wandb.teardown()  # the failed attempt still holds the run id
    return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs), "offline"


class MetricLogger:
    """Log one stage's metrics. `config`: the stage's parameters (the run's own config is added from disk);
    `run_name`: the config's name, a W&B tag (runs are named from the run directory); `final_dir`: where the run
    directory will end up when it is being built elsewhere (training builds it in a temporary sibling).

    Drivers call `log` as units land (one flushed jsonl line, one non-blocking W&B call), `table` for per-group
    results (a W&B Table and histograms; on disk they are the stage's own Parquet), `summary` at the end."""

    def __init__(self, run_dir: str | Path, stage: str, wandb_cfg: WandbConfig, config: dict | None = None,
                 run_name: str | None = None, final_dir: str | Path | None = None):
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics" / f"{stage}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._wandb = None
        self._axes: set[str] = set()
        mode = resolve_wandb_mode(wandb_cfg)
        if mode != "disabled":
            run = {**stage_run(run_dir, stage, final_dir), "stage": stage}
            self._wandb, mode = _init_wandb(mode, wandb_cfg, run_dir, run, run_config(run_dir, config, final_dir),
                                            [run_name] if run_name else [])
            runs_path = run_dir / "metrics" / "wandb.json"
            runs = _read_json(runs_path)
            runs[stage] = {"id": run["id"], "name": run["name"], "group": run["group"], "mode": mode,
                           "project": wandb_cfg.project, "entity": wandb_cfg.entity}
            atomic_write_json(runs_path, runs)

    def _step_axis(self, key: str) -> str:
        """`forge/step` for `forge/*` (declared once with define_metric), `step` for keys without a prefix."""
        prefix = key.split("/", 1)[0] if "/" in key else None
        axis = f"{prefix}/step" if prefix else "step"
        if (prefix or key) not in self._axes:
            self._wandb.define_metric(axis)
            self._wandb.define_metric(f"{prefix}/*" if prefix else key, step_metric=axis)
            self._axes.add(prefix or key)
        return axis

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True, default=float) + "\n")
        self._file.flush()

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self._write({"step": step, **metrics} if step is not None else dict(metrics))
        if self._wandb is not None:
            payload = dict(metrics)
            if step is not None:
                payload.update({self._step_axis(key): step for key in metrics})
            self._wandb.log(payload)

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence], histograms: Sequence[str] = ()) -> None:
        """A W&B Table `key` and, for each column named in `histograms`, a histogram `key/<column>`."""
        if self._wandb is not None:
            import wandb

            columns = list(columns)
            payload = {key: wandb.Table(columns=columns, data=[list(row) for row in rows])}
            for name in histograms:
                i = columns.index(name)
                payload[f"{key}/{name}"] = wandb.Histogram([row[i] for row in rows if row[i] is not None])
            self._wandb.log(payload)

    def d_theta(self, rows: Sequence[dict]) -> None:
        """d_θ per group, rows as in `distances.parquet` (group, members, d_theta, first_step, forged_steps): the
        W&B Table `d_theta/groups` with histograms of d_θ and log10 d_θ (the paper's Fig. 3 axis)."""
        if self._wandb is None:
            return
        columns = ["group", "members", "d_theta", "log10_d_theta", "first_step", "forged_steps"]
        self.table("d_theta/groups", columns,
                   [[r["group"], len(r["members"]), r["d_theta"], math.log10(r["d_theta"]) if r["d_theta"] > 0 else None,
                     r["first_step"], r["forged_steps"]] for r in rows], histograms=("d_theta", "log10_d_theta"))

    def media(self, images: dict[str, Path], tables: dict[str, tuple[list[str], list[list]]]) -> None:
        """Figures (already on disk) and tables to W&B; on disk they are the report's own files."""
        if self._wandb is not None:
            import wandb

            payload = {name: wandb.Image(str(path)) for name, path in images.items()}
            payload.update({name: wandb.Table(columns=cols, data=rows) for name, (cols, rows) in tables.items()})
            self._wandb.log(payload)

    def summary(self, metrics: dict[str, Any]) -> None:
        self._write({"summary": metrics})
        if self._wandb is not None:
            self._wandb.summary.update(metrics)

    def close(self, exit_code: int = 0) -> None:
        self._file.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish(exit_code=exit_code)
            self._wandb = None
            # Stop W&B's service with the stage's run: its exit hook fails in a Ray worker that Ray ends.
            wandb.teardown(exit_code)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(exit_code=1 if exc_type else 0)
