"""The command line: thin wrappers over the library; every user error is one line and a non-zero exit."""

from __future__ import annotations

import functools
import sys
import time

import click

from rayforge.errors import RayforgeError


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RayforgeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a config value, e.g. --set train.epochs=2 (repeatable).")


def _run_path(ctx, param, value):
    """Run paths are absolute from here on (see rayforge.ray_utils.resolve_run_path: inside a Ray job a relative
    path would land in Ray's temporary working directory)."""
    if value is None:
        return None
    from rayforge.ray_utils import resolve_run_path

    try:
        return str(resolve_run_path(value))
    except RayforgeError as exc:  # one line, as from any command
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


run_dir_arg = click.argument("run_dir", type=click.Path(file_okay=False), callback=_run_path)
out_option = click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), callback=_run_path,
                          help="Run directory to create.")


@click.group()
@click.version_option(package_name="rayforge")
def main():
    """rayforge: Proofs of Repudiation forged from SGD training logs."""


@main.command()
def models():
    """List the registered models with their parameter counts."""
    from rayforge.models import build_model, model_names, param_count

    for name in model_names():
        shape = (1, 32, 32) if name == "lenet5" else (3, 32, 32)
        click.echo(f"{name:<14}{param_count(build_model(name, shape, 10)):>12,}  (input {shape})")


@main.command(name="train")
@click.argument("config", type=click.Path(dir_okay=False))
@out_option
@set_option
@user_errors
def train_cmd(config, out_dir, overrides):
    """Train per CONFIG and write the training log to --out (inside a Ray job: in a Ray task, see below)."""
    from rayforge.config import load_config
    from rayforge.ray_utils import in_ray_job

    cfg = load_config(config, overrides)
    if in_ray_job():  # the job's driver sits on the head node: train in a task placed where the config says
        from rayforge.pipeline import train_stage

        summary = train_stage(cfg, out_dir)
    else:
        from rayforge.train.trainer import train

        summary = train(cfg, out_dir)
    click.echo(f"trained {summary['steps']} steps: test_accuracy={summary['test_accuracy']:.4f} "
               f"wall={summary['train_wall_s']:.1f}s ({summary['seconds_per_step'] * 1e3:.2f} ms/step) -> {out_dir}")


@main.command()
@run_dir_arg
@click.option("--from", "start", type=int, required=True, help="Checkpoint step to start from.")
@click.option("--to", "stop", type=int, required=True, help="Checkpoint step to reproduce.")
@click.option("--threads", type=int, default=None, help="torch threads (default: the run's).")
@user_errors
def replay(run_dir, start, stop, threads):
    """Replay the log from checkpoint --from to --to; exit 0 only on an exact match."""
    from rayforge.train.replay import replay as do_replay
    from rayforge.train.run import TrainingRun

    result = do_replay(TrainingRun.open(run_dir), start, stop, threads)
    click.echo(f"max_abs_diff={result.max_abs_diff:g}")
    sys.exit(0 if result.exact else 1)


@main.command()
@run_dir_arg
@click.option("--strategy", default=None, help="Forging strategy (default: the config's, 'paper').")
@click.option("--kappa", type=int, default=None, help="Number of parts κ per step (default: the config's).")
@click.option("--mu", type=int, default=None, help="Candidate minibatches μ per (step, part).")
@click.option("--lam", type=int, default=None, help="Group size λ (points sharing one PoR).")
@click.option("--dsub", "dsub_size", type=int, default=None, help="|D_sub| (default: all of D \\ D_k).")
@click.option("--points", type=int, default=None,
              help="Sampling approximation: forge only what N sampled points' groups need (default: all).")
@click.option("--actors", type=int, default=None, help="Forging actors (default: the config's ray.actors).")
@user_errors
def forge(run_dir, strategy, kappa, mu, lam, dsub_size, points, actors):
    """Phase 1: forge a minibatch for every (step, part) of RUN's log, on Ray; resumes where it stopped."""
    from rayforge.forge.driver import run_forge
    from rayforge.forge.engine import ForgeParams
    from rayforge.train.run import TrainingRun

    cfg = TrainingRun.open(run_dir).cfg
    params = ForgeParams.from_config(cfg, strategy=strategy, kappa=kappa, mu=mu, lam=lam, dsub_size=dsub_size,
                                     points=points)
    summary = run_forge(run_dir, params, actors or cfg.ray.actors, cfg.ray, cfg.wandb)
    click.echo(f"forged {summary['rows']} (step, part) batches in {summary['forge_wall_s']:.1f}s: "
               f"{summary['grad_evals_per_step']:.0f} gradient evaluations/step, "
               f"{summary['candidates_per_s']:.0f} candidates/s, grad_error/grad_norm median "
               f"{summary['rel_error_median']:.4f} p90 {summary['rel_error_p90']:.4f}")


@main.command()
@run_dir_arg
@click.option("--strategy", default=None, help="Phase-1 output to rebuild from (default: the config's).")
@click.option("--actors", type=int, default=None, help="Rebuild actors (default: the config's ray.actors).")
@click.option("--method", type=click.Choice(["sequential", "batched"]), default="sequential",
              help="One model at a time (bit-exact with verify), or several stacked with torch.func.")
@click.option("--groups-per-unit", type=int, default=4, help="Groups per unit of work.")
@click.option("--save-models", type=int, default=0, help="Keep the forged models of the first K groups.")
@user_errors
def rebuild(run_dir, strategy, actors, method, groups_per_unit, save_models):
    """Phase 2: rebuild the forged model of every group and write its distance to the original."""
    from rayforge.rebuild.driver import RebuildParams, run_rebuild
    from rayforge.train.run import TrainingRun

    cfg = TrainingRun.open(run_dir).cfg
    params = RebuildParams(strategy or cfg.forge.strategy, method, groups_per_unit)
    s = run_rebuild(run_dir, params, actors or cfg.ray.actors, cfg.ray, cfg.wandb, save_models=save_models)
    click.echo(f"rebuilt {s['groups']} forged models: d_theta median {s['d_theta_median']:.3g} "
               f"p90 {s['d_theta_p90']:.3g}")


@main.command()
@run_dir_arg
@click.option("--strategy", default=None, help="Phase-1 output to evaluate (default: the config's).")
@click.option("--points", type=int, default=None,
              help="Sampling approximation: forge (if not yet done) for N sampled points only.")
@click.option("--actors", type=int, default=None, help="Actors (default: the config's ray.actors).")
@click.option("--save-models", type=int, default=0, help="Keep the forged models of the first K groups.")
@user_errors
def attack(run_dir, strategy, points, actors, save_models):
    """Shadows, the five MI attacks, and phase 2 with every forged model scored (phase 1 first if missing)."""
    from rayforge.pipeline import attack_stage
    from rayforge.train.run import TrainingRun

    cfg = TrainingRun.open(run_dir).cfg
    s = attack_stage(run_dir, cfg, strategy or cfg.forge.strategy, points, actors or cfg.ray.actors, save_models)
    click.echo(f"scored {s['evaluated_points']} points on {s['groups']} forged models with {', '.join(s['attacks'])}; "
               f"d_theta median {s['d_theta_median']:.3g}")


@main.command()
@run_dir_arg
@click.option("--strategy", default="paper", help="Strategy whose attack-stage output to report.")
@user_errors
def report(run_dir, strategy):
    """metrics.json, Tables I-IV (tables.md) and figures under RUN/report/."""
    from rayforge.report.render import write_report

    metrics = write_report(run_dir, strategy)
    summary = ", ".join(f"{a} c_diff={m['c_diff']:.2f}%" for a, m in metrics["attacks"].items())
    click.echo(f"report -> {run_dir}/report: {summary}; d_theta median {metrics['d_theta']['median']:.3g}")


@main.command()
@run_dir_arg
@click.option("--point", type=int, required=True, help="Index of the challenged training point.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="PoR directory to create.")
@click.option("--strategy", default=None, help="Phase-1 output to build from (default: the config's).")
@click.option("--mode", type=click.Choice(["group", "minimal"]), default="group",
              help="group: the point's group's forged log (phase 1 output); minimal: swap out only this point.")
@user_errors
def por(run_dir, point, out_dir, strategy, mode):
    """Build the Proof of Repudiation of training point --point (forged log, checkpoints, por.json)."""
    from rayforge.train.run import TrainingRun

    run = TrainingRun.open(run_dir)
    if mode == "minimal":
        from rayforge.por.minimal import export_minimal_por

        manifest = export_minimal_por(run, point, out_dir)
    else:
        from rayforge.por import export_por

        manifest = export_por(run, strategy or run.cfg.forge.strategy, point, out_dir)
    click.echo(f"PoR of point {point} -> {out_dir}: epsilon={manifest['epsilon']:.4g} "
               f"d_theta={manifest['d_theta']:.3g}")


@main.command()
@click.argument("por_dir", type=click.Path(file_okay=False))
@click.option("--data-root", default=None, help="Where the dataset lies (else $RAYFORGE_DATA).")
@click.option("--model", "model_path", default=None, help="The deployed model (safetensors) to compare with.")
@click.option("--steps", "selection", default="all", help="all | topq:Q | random:N segments to replay.")
@click.option("--tol", type=float, default=None, help="Replay tolerance, l2 over parameters.")
@click.option("--seed", type=int, default=None, help="Seed of random:N (printed when not given).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def verify(por_dir, data_root, model_path, selection, tol, seed, as_json):
    """Verify a PoR as a hostile artifact: exit 0 valid, 1 invalid (reasons listed), 2 malformed."""
    import json

    from rayforge.por import DEFAULT_TOL, verify_por

    report = verify_por(por_dir, data_root=data_root, model_path=model_path, steps=selection,
                        tol=DEFAULT_TOL if tol is None else tol, seed=seed)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for reason in report.reasons:
            click.echo(f"invalid: {reason}")
        worst = report.max_distance
        click.echo(f"{'VALID' if report.valid else 'INVALID'}: {len(report.segments)} segment(s) replayed"
                   + (f", worst l2 {worst:.3g}" if worst is not None else "")
                   + (f", seed {report.seed}" if report.seed is not None else ""))
    sys.exit(0 if report.valid else 1)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@out_option
@set_option
@user_errors
def run(config, out_dir, overrides):
    """The main job on Ray: every pipeline stage for CONFIG, into --out."""
    from rayforge.config import load_config
    from rayforge.pipeline import run_pipeline

    cfg = load_config(config, overrides)
    start = time.perf_counter()
    result = run_pipeline(cfg, out_dir)
    t, f, m = result["train"], result["forge"], result["report"]
    attacks = ", ".join(f"{a} c_diff={v['c_diff']:.2f}%" for a, v in m["attacks"].items())
    click.echo(f"run done in {time.perf_counter() - start:.1f}s: test_accuracy={t['test_accuracy']:.4f} "
               f"train_wall={t['train_wall_s']:.1f}s forge_wall={f['forge_wall_s']:.1f}s "
               f"grad_error/grad_norm median={f['rel_error_median']:.4f} "
               f"d_theta median={m['d_theta']['median']:.3g}; {attacks} -> {out_dir}/report")


if __name__ == "__main__":
    main()
