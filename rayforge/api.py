"""The public Python API: one thin function per pipeline stage over the same drivers the CLI uses.

    import rayforge as rf
    cfg = rf.load_config("configs/quickstart.yaml")
    rf.train(cfg, "runs/qs")
    rf.forge("runs/qs")                 # phase 1
    rf.rebuild("runs/qs")               # phase 2: d_θ per group
    rf.attack("runs/qs")                # shadows, the MI attacks, every forged model scored
    rf.report("runs/qs")
    rf.audit("runs/qs")                 # which points can be repudiated
    rf.export_por("runs/qs", point=123, out_dir="runs/qs-por-123")
    rf.export_include_por("runs/qs", "runs/qs-include", test_index=0)   # "x* was left out of D"
    rf.export_public_por("runs/qs", "public-data", "runs/qs-public")    # every batch from public data
    report = rf.verify_por("runs/qs-por-123")

Stages that run on Ray start a private local Ray unless one is running or `ray.address` names a cluster.
User errors raise `rayforge.errors.RayforgeError` (one line, what is wrong and where).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from rayforge.config import Config, config_from_dict
from rayforge.config import load_config as _load_config


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """The typed config of a YAML file, with `key=value` overrides (e.g. "train.epochs=2"). Unknown keys and
    wrong types raise RayforgeError."""
    return _load_config(path, overrides)


def _config(config: Config | str | Path | dict, overrides: Iterable[str]) -> Config:
    if isinstance(config, Config):
        return config_from_dict(config.to_dict(), overrides) if overrides else config
    if isinstance(config, dict):
        return config_from_dict(config, overrides)
    return _load_config(config, overrides)


def _run_config(run_dir, config: Config | None) -> Config:
    """`config` when given (the run's own with stage settings changed, as `rayforge <stage> --set` makes it), else
    RUN/config.yaml."""
    if config is not None:
        return config
    from rayforge.train.run import TrainingRun

    return TrainingRun.open(run_dir).cfg


def train(config: Config | str | Path | dict, out_dir: str | Path, overrides: Iterable[str] = (),
          progress: bool = True) -> dict:
    """Train per `config` (a Config, a YAML path or a dict) and write the training log into `out_dir`, which must
    not exist or be empty. Returns the summary: steps, train/test accuracy, wall time, seconds per step.
    Inside a Ray job (whose driver sits on the head node) training runs in a Ray task placed where the config says
    (`rayforge.pipeline.train_stage`); elsewhere in this process."""
    from rayforge.ray_utils import in_ray_job

    cfg = _config(config, overrides)
    if in_ray_job():
        from rayforge.pipeline import train_stage

        return train_stage(cfg, out_dir, progress=progress)
    from rayforge.train.trainer import train as _train

    return _train(cfg, out_dir, progress=progress)


def forge(run_dir: str | Path, strategy: str | None = None, kappa: int | None = None, mu: int | None = None,
          lam: int | None = None, dsub_size: int | None = None, points: int | None = None,
          actors: int | None = None, progress: bool = True, config: Config | None = None) -> dict | None:
    """Phase 1 on Ray: a forged minibatch for every (step, part) of the log (Algorithms 2/3, or the `swap` and
    `hybrid` strategies), written to RUN/forge/<strategy>/. Unset options come from the run's config (or
    `config`: the run's with forge/ray/wandb settings changed); `points` is the paper's sampling approximation.
    Resumes where a previous call stopped. Returns the summary."""
    from rayforge.forge.driver import run_forge
    from rayforge.forge.engine import ForgeParams

    cfg = _run_config(run_dir, config)
    params = ForgeParams.from_config(cfg, strategy=strategy, kappa=kappa, mu=mu, lam=lam, dsub_size=dsub_size,
                                     points=points)
    return run_forge(run_dir, params, actors or cfg.ray.actors, cfg.ray, cfg.wandb, progress=progress)


def rebuild(run_dir: str | Path, strategy: str | None = None, method: str = "auto",
            actors: int | None = None, groups_per_unit: int = 4, save_models: int = 0,
            progress: bool = True, config: Config | None = None) -> dict | None:
    """Phase 2 on Ray: replay every group's forged log and write d_θ = ‖θ* − θ'‖²/dim per group to
    RUN/rebuild/<strategy>/distances.parquet (`method`: "sequential" replays one model at a time, bit-exact with
    verify; "batched" replays several as one wide model; "auto" picks the device's measured default, see
    rayforge.rebuild.engine.DEFAULT_METHOD). Returns the summary (d_θ median and 90th percentile, the method run and
    models_steps_per_s)."""
    from rayforge.rebuild.driver import RebuildParams, run_rebuild

    cfg = _run_config(run_dir, config)
    params = RebuildParams(strategy or cfg.forge.strategy, method, groups_per_unit)  # threads: the log's
    return run_rebuild(run_dir, params, actors or cfg.ray.actors, cfg.ray, cfg.wandb, save_models=save_models,
                       progress=progress)


def attack(run_dir: str | Path, strategy: str | None = None, points: int | None = None,
           actors: int | None = None, save_models: int = 0, config: Config | None = None) -> dict | None:
    """The attack stage on Ray: phase 1 if missing, shadow models, the MI attacks (the paper's five and EnhancedMIA-R) fitted on them, the original
    model scored, and phase 2 with every forged model scored (RUN/attack/). Returns the summary."""
    from rayforge.pipeline import attack_stage

    cfg = _run_config(run_dir, config)
    return attack_stage(run_dir, cfg, strategy or cfg.forge.strategy, points, actors or cfg.ray.actors, save_models)


def report(run_dir: str | Path, strategy: str | None = None, config: Config | None = None) -> dict:
    """RUN/report/: metrics.json, the paper's Tables I-IV (tables.md) and figures, from the attack stage's output
    of every attacked strategy, `strategy` (default: the config's) the main one (and the audit's line and figure
    when `audit` ran); W&B per the run's (or `config`'s) wandb section. Returns the metrics."""
    from rayforge.report.render import write_report

    return write_report(run_dir, strategy, None if config is None else config.wandb)


def audit(run_dir: str | Path, strategy: str | None = None, pool: int | None = None,
          neighbours: int | None = None, epochs: int | None = None, points: int | None = None,
          actors: int | None = None, use_ray: bool = True, progress: bool = True,
          config: Config | None = None) -> dict:
    """The repudiability audit: for every training point (or the `points` sampled ones), can a PoR refute a
    membership claim on it? Writes RUN/audit/points.parquet (repudiable, score, reason and the evidence) and
    summary.json, plus RUN/report/audit_least_repudiable.png. `pool`: substitutes drawn per step (default 128),
    `neighbours`: nearest same-label points of each audited point added to them (default 3); `epochs`: audit that
    many evenly spaced epochs (default all). Phase-1/2 and attack outputs of `strategy`
    are used where present. `use_ray=False` computes in this process. Returns the summary."""
    from rayforge.audit import SubstitutionParams, run_audit
    from rayforge.audit.substitution import DEFAULT_NEIGHBOURS, DEFAULT_POOL

    cfg = _run_config(run_dir, config)
    params = SubstitutionParams(pool_size=pool or DEFAULT_POOL, seed=cfg.seed,
                                threads=max(1, int(cfg.ray.num_cpus_per_actor)), epochs=epochs, points=points,
                                neighbours=DEFAULT_NEIGHBOURS if neighbours is None else neighbours)
    return run_audit(run_dir, strategy, params, actors or cfg.ray.actors, cfg.ray, use_ray, progress, cfg.wandb)


def export_por(run_dir: str | Path, point: int, out_dir: str | Path, strategy: str | None = None,
               mode: str = "group", topq_windows: int = 1) -> dict:
    """Write the Proof of Repudiation of training point `point` into `out_dir` (must not exist or be empty):
    `mode` "group" replays its group's forged log from phase 1, "minimal" swaps out only the point. Returns
    por.json (ε = ‖θ' − θ*‖₂, d_θ, the hashes a verifier checks). `topq_windows`: one-step checkpoint windows per
    epoch around the largest updates, so `verify_por(steps="topq:Q")` with Q up to it replays single steps (0: the
    log's checkpoints only)."""
    from rayforge.train.run import TrainingRun

    run = TrainingRun.open(run_dir)
    if mode == "minimal":
        from rayforge.por.minimal import export_minimal_por

        return export_minimal_por(run, point, out_dir, topq_windows=topq_windows)
    if mode != "group":
        from rayforge.errors import RayforgeError

        raise RayforgeError(f"mode must be 'group' or 'minimal', got {mode!r}")
    from rayforge.por import export_por as _export

    return _export(run, strategy or run.cfg.forge.strategy, point, out_dir, topq_windows=topq_windows)


def export_include_por(run_dir: str | Path, out_dir: str | Path, image: str | Path | None = None,
                       label: int | None = None, test_index: int | None = None, iterations: int | None = None,
                       rate: float | None = None, pick: str = "best", topq_windows: int = 1) -> dict:
    """Write the include PoR (the claim "x* was left out of D") into `out_dir`: a log of D ∪ {x*}, x* (an image
    file with its `label`, or the run's test point `test_index`) being index n, admitted in |H| iterations
    (`iterations`, or `rate` x the log's steps; default one per epoch) picked per window of the log with the
    smallest gradient residual (`pick` "best") or at random (the paper's H); `topq_windows` as in `export_por`.
    Returns por.json."""
    from rayforge.por.include import export_include_por as _export
    from rayforge.train.run import TrainingRun

    manifest, _ = _export(TrainingRun.open(run_dir), out_dir, image=image, label=label, test_index=test_index,
                          iterations=iterations, rate=rate, pick=pick, topq_windows=topq_windows)
    return manifest


def export_public_por(run_dir: str | Path, public_dir: str | Path, out_dir: str | Path, strategy: str = "hybrid",
                      mu: int | None = None, pool: int | None = None, topq_windows: int = 1) -> dict:
    """Write the public-data PoR into `out_dir`: every minibatch of the log forged from the public dataset D_p in
    `public_dir` (`train/<class>/*`, images already of the model's input shape), D never named. `strategy`: paper
    (best of `mu` random batches), swap (greedy matching over `pool` D_p points) or hybrid (the better per step).
    `topq_windows` as in `export_por`. Returns por.json (with D_p's hash)."""
    from rayforge.por.public import export_public_por as _export
    from rayforge.train.run import TrainingRun

    return _export(TrainingRun.open(run_dir), public_dir, out_dir, strategy=strategy, mu=mu, pool_size=pool,
                   topq_windows=topq_windows)


def verify_por(por_dir: str | Path, data_root: str | Path | None = None, model: str | Path | None = None,
               steps: str = "all", tol: float | None = None, tol_rel: float | None = None, seed: int | None = None,
               threads: int | None = None, trust_model_code: bool = False, warn=None):
    """Verify a PoR as a hostile artifact (rayforge.por.verify): the dataset hash, the exclusion of the point,
    the declared training, the replay of the selected segments within `tol` (and `tol_rel` of each segment's
    update), and with `model` the deployed model's hash and distance. `steps`: all | topq:Q | random:N. A PoR of a
    `module:callable` model is only verified with `trust_model_code=True` (building it runs that code). Returns a
    VerifyReport (`.valid`, `.reasons`, `.to_text()`)."""
    from rayforge.por import DEFAULT_TOL
    from rayforge.por import verify_por as _verify

    return _verify(por_dir, data_root=data_root, model_path=model, steps=steps,
                   tol=DEFAULT_TOL if tol is None else tol, tol_rel=tol_rel, seed=seed, threads=threads,
                   trust_model_code=trust_model_code, warn=warn)
