"""The command line: thin wrappers over the library.

Every error a user can cause is one line on stderr and a non-zero exit, from every command: a RayforgeError (its
exit code), a usage error such as a numeric option out of range (2), Ctrl-C (130, as shells report SIGINT).
"""

from __future__ import annotations

import math
import sys
import time

import click

from rayforge.errors import RayforgeError

INTERRUPTED = 130  # 128 + SIGINT


class RayforgeGroup(click.Group):
    """Runs the subcommand and turns what the user caused into one line on stderr, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RayforgeError as exc:
            _fail(str(exc), exc.exit_code)
        except click.UsageError as exc:  # also parameter errors: the subcommand's options are parsed in here
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _fail(f"{exc.format_message()}{hint}", exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", INTERRUPTED)


def _fail(message: str, code: int):
    from rayforge.progress import close_bars

    close_bars()
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _run_path(ctx, param, value):
    """Run paths are absolute from here on (see rayforge.ray_utils.resolve_run_path: inside a Ray job a relative
    path would land in Ray's temporary working directory)."""
    if value is None:
        return None
    from rayforge.ray_utils import resolve_run_path

    return str(resolve_run_path(value))


run_dir_arg = click.argument("run_dir", type=click.Path(file_okay=False), callback=_run_path)
out_option = click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), callback=_run_path,
                          help="Run directory to create.")


# ---------------------------------------------------------------------------------------------- option types

class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf (which pass every range comparison or bound nothing)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


class ActorCount(click.ParamType):
    """A positive number of actors, or 'auto' (passed on as ray.actors, so the config decides whether it may)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        text = str(value).strip()
        if text == "auto":
            return text
        if text.isdigit() and int(text) >= 1:
            return int(text)
        self.fail(f"{value!r} is not a positive integer or 'auto'", param, ctx)


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)
TOLERANCE = FiniteFloat(min=0.0)


def set_option(fn):
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override a config value, e.g. --set train.epochs=2 (repeatable).")(fn)


def actors_option(fn):
    return click.option("--actors", type=ActorCount(), default=None,
                        help="Actors, a positive integer (default: the config's ray.actors).")(fn)


def run_config(run_dir, overrides, settable: tuple[str, ...], actors=None):
    """RUN's config (RUN/config.yaml) with the --set overrides a stage command honours (keys starting with one of
    `settable`) and --actors; any other key is refused: the log fixes it, or the stage reads it from the run."""
    from rayforge.config import config_from_dict, parse_overrides
    from rayforge.train.run import TrainingRun

    for key, _ in parse_overrides(overrides):
        if not key.startswith(settable):
            raise RayforgeError(f"--set {key}: this command can set only {', '.join(s + '*' for s in settable)}; "
                                f"the rest is fixed by the run ({run_dir}/config.yaml)")
    extra = [] if actors is None else [f"ray.actors={actors}"]
    return config_from_dict(TrainingRun.open(run_dir).cfg.to_dict(), [*overrides, *extra])


STAGE_KEYS = ("forge.", "ray.", "wandb.")


# ---------------------------------------------------------------------------------------------- commands

@click.group(cls=RayforgeGroup)
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
def train_cmd(config, out_dir, overrides):
    """Train per CONFIG and write the training log to --out."""
    import rayforge as rf

    summary = rf.train(config, out_dir, overrides)
    click.echo(f"trained {summary['steps']} steps: test_accuracy={summary['test_accuracy']:.4f} "
               f"wall={summary['train_wall_s']:.1f}s ({summary['seconds_per_step'] * 1e3:.2f} ms/step) -> {out_dir}")


@main.command()
@run_dir_arg
@click.option("--from", "start", type=NON_NEGATIVE, required=True, help="Checkpoint step to start from.")
@click.option("--to", "stop", type=NON_NEGATIVE, required=True, help="Checkpoint step to reproduce.")
@click.option("--threads", type=POSITIVE, default=None, help="torch threads (default: the run's).")
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
@click.option("--kappa", type=POSITIVE, default=None, help="Number of parts κ per step (default: the config's).")
@click.option("--mu", type=POSITIVE, default=None, help="Candidate minibatches μ per (step, part).")
@click.option("--lam", type=POSITIVE, default=None, help="Group size λ (points sharing one PoR).")
@click.option("--dsub", "dsub_size", type=POSITIVE, default=None, help="|D_sub| (default: all of D \\ D_k).")
@click.option("--points", type=POSITIVE, default=None,
              help="Sampling approximation: forge only what N sampled points' groups need (default: all).")
@actors_option
@set_option
def forge(run_dir, strategy, kappa, mu, lam, dsub_size, points, actors, overrides):
    """Phase 1: forge a minibatch for every (step, part) of RUN's log, on Ray; resumes where it stopped."""
    import rayforge as rf

    cfg = run_config(run_dir, overrides, STAGE_KEYS, actors)
    summary = rf.forge(run_dir, strategy=strategy, kappa=kappa, mu=mu, lam=lam, dsub_size=dsub_size, points=points,
                       config=cfg)
    click.echo(f"forged {summary['rows']} (step, part) batches in {summary['forge_wall_s']:.1f}s: "
               f"{summary['grad_evals_per_step']:.0f} gradient evaluations/step, "
               f"{summary['candidates_per_s']:.0f} candidates/s, grad_error/grad_norm median "
               f"{summary['rel_error_median']:.4f} p90 {summary['rel_error_p90']:.4f}")


@main.command()
@run_dir_arg
@click.option("--strategy", default=None, help="Phase-1 output to rebuild from (default: the config's).")
@actors_option
@click.option("--method", type=click.Choice(["auto", "sequential", "batched"]), default="auto",
              help="One model at a time (bit-exact with verify), several as one wide model, or the device's "
                   "measured default (auto).")
@click.option("--groups-per-unit", type=POSITIVE, default=4, help="Groups per unit of work.")
@click.option("--save-models", type=NON_NEGATIVE, default=0, help="Keep the forged models of the first K groups.")
@set_option
def rebuild(run_dir, strategy, actors, method, groups_per_unit, save_models, overrides):
    """Phase 2: rebuild the forged model of every group and write its distance to the original."""
    import rayforge as rf

    cfg = run_config(run_dir, overrides, ("forge.strategy", "ray.", "wandb."), actors)
    s = rf.rebuild(run_dir, strategy=strategy, method=method, groups_per_unit=groups_per_unit,
                   save_models=save_models, config=cfg)
    click.echo(f"rebuilt {s['groups']} forged models: d_theta median {s['d_theta_median']:.3g} "
               f"p90 {s['d_theta_p90']:.3g}")


@main.command()
@run_dir_arg
@click.option("--strategy", default=None, help="Phase-1 output to evaluate (default: the config's).")
@click.option("--points", type=POSITIVE, default=None,
              help="Sampling approximation: forge (if not yet done) for N sampled points only.")
@actors_option
@click.option("--save-models", type=NON_NEGATIVE, default=0, help="Keep the forged models of the first K groups.")
@set_option
def attack(run_dir, strategy, points, actors, save_models, overrides):
    """Shadows, the MI attacks (the paper's five and EnhancedMIA-R), and phase 2 with every forged model scored (phase 1 first if missing)."""
    import rayforge as rf

    cfg = run_config(run_dir, overrides, STAGE_KEYS, actors)
    s = rf.attack(run_dir, strategy=strategy, points=points, save_models=save_models, config=cfg)
    click.echo(f"scored {s['evaluated_points']} points on {s['groups']} forged models with {', '.join(s['attacks'])}; "
               f"d_theta median {s['d_theta_median']:.3g}")


@main.command()
@run_dir_arg
@click.option("--strategy", default=None,
              help="Main strategy (default: the config's); every attacked strategy of the run is reported beside it.")
@set_option
def report(run_dir, strategy, overrides):
    """metrics.json, Tables I-IV (tables.md) and figures under RUN/report/, for every attacked strategy."""
    import rayforge as rf

    cfg = run_config(run_dir, overrides, ("wandb.",))
    metrics = rf.report(run_dir, strategy, config=cfg)
    for name, m in metrics["strategies"].items():
        summary = ", ".join(f"{a} c_diff={v['c_diff']:.2f}%" for a, v in m["attacks"].items())
        click.echo(f"{name}: {summary}; valid PoRs {m['valid_por_percent']['all']:.2f}% (all attacks); "
                   f"d_theta mean {m['d_theta']['mean']:.3g}")
    click.echo(f"report -> {run_dir}/report")


KIND_OPTIONS = {  # the options each kind of PoR takes (besides RUN and --out)
    "exclude": {"point", "strategy", "mode"},
    "include": {"include_image", "include_test", "label", "iterations", "rate", "pick"},
    "public": {"public_dir", "strategy", "mu", "pool"},
}
OPTION_NAMES = {"point": "--point", "strategy": "--strategy", "mode": "--mode", "include_image": "--include",
                "include_test": "--include-test", "label": "--label", "iterations": "--iterations", "rate": "--rate",
                "pick": "--pick", "public_dir": "--public", "mu": "--mu", "pool": "--pool"}


def por_kind(given: dict) -> str:
    """The kind of PoR the options ask for: exactly one of --point, --include/--include-test, --public, and only
    options that kind takes."""
    kinds = {kind for kind, key in (("exclude", "point"), ("include", "include_image"), ("include", "include_test"),
                                    ("public", "public_dir")) if given.get(key) is not None}
    if len(kinds) != 1 or (given.get("include_image") is not None and given.get("include_test") is not None):
        raise click.UsageError("give exactly one of --point I (exclude), --include IMAGE or --include-test I "
                               "(include), --public DIR (public)")
    kind = kinds.pop()
    stray = [OPTION_NAMES[k] for k, v in given.items() if v is not None and k not in KIND_OPTIONS[kind]]
    if stray:
        raise click.UsageError(f"{', '.join(stray)} do(es) not apply to a {kind} PoR")
    return kind


@main.command()
@run_dir_arg
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="PoR directory to create.")
@click.option("--point", type=NON_NEGATIVE, default=None,
              help="Exclude PoR (the claim 'x* was in D'): index of the challenged training point.")
@click.option("--strategy", default=None,
              help="exclude: phase-1 output to build from (default: the config's); public: paper, swap or hybrid "
                   "(default hybrid).")
@click.option("--mode", type=click.Choice(["group", "minimal"]), default=None,
              help="exclude: group (default; the point's group's forged log, phase 1 output) or minimal (swap out "
                   "only this point).")
@click.option("--include", "include_image", type=click.Path(dir_okay=False), default=None,
              help="Include PoR (the claim 'x* was left out of D'): x* as an image file (PNG/JPEG), with --label.")
@click.option("--include-test", type=NON_NEGATIVE, default=None,
              help="Include PoR: x* is this point of the run's test split.")
@click.option("--label", type=NON_NEGATIVE, default=None, help="include: x*'s class.")
@click.option("--iterations", type=POSITIVE, default=None,
              help="include: |H|, the iterations whose batch admits x* (default: one per epoch).")
@click.option("--rate", type=FiniteFloat(min=0.0, max=1.0, min_open=True), default=None,
              help="include: |H| = rate x the log's steps instead.")
@click.option("--pick", type=click.Choice(["best", "random"]), default=None,
              help="include: best (default; per window of the log, the iteration x* enters with the smallest "
                   "gradient residual) or random (the paper's H).")
@click.option("--public", "public_dir", type=click.Path(file_okay=False), default=None,
              help="Public-data PoR: every batch forged from the public dataset D_p in DIR/train/<class>/*.")
@click.option("--mu", type=POSITIVE, default=None, help="public: candidate batches per step (default: forge.mu).")
@click.option("--pool", type=POSITIVE, default=None,
              help="public: D_p points per step for swap matching (default: forge.pool_size).")
@click.option("--topq-windows", type=NON_NEGATIVE, default=1, show_default=True,
              help="One-step checkpoint windows per epoch around the largest updates, so `verify --steps topq:Q` "
                   "(Q up to this) replays single steps; 0: the log's checkpoints only.")
def por(run_dir, out_dir, topq_windows, **given):
    """Build a Proof of Repudiation from RUN's log (forged log, checkpoints, por.json): --point (exclude),
    --include/--include-test (include) or --public (public data)."""
    import rayforge as rf

    kind = por_kind(given)
    if kind == "include":
        manifest = rf.export_include_por(run_dir, out_dir, image=given["include_image"], label=given["label"],
                                         test_index=given["include_test"], iterations=given["iterations"],
                                         rate=given["rate"], pick=given["pick"] or "best",
                                         topq_windows=topq_windows)
        inc = manifest["include"]
        what = f"include PoR of x* (index {inc['index']}, label {inc['label']}) in {len(inc['steps'])} iterations"
    elif kind == "public":
        manifest = rf.export_public_por(run_dir, given["public_dir"], out_dir, strategy=given["strategy"] or "hybrid",
                                        mu=given["mu"], pool=given["pool"], topq_windows=topq_windows)
        what = f"public-data PoR ({manifest['public']['n']} public points)"
    else:
        manifest = rf.export_por(run_dir, given["point"], out_dir, strategy=given["strategy"],
                                 mode=given["mode"] or "group", topq_windows=topq_windows)
        what = f"PoR of point {given['point']}"
    click.echo(f"{what} -> {out_dir}: epsilon={manifest['epsilon']:.4g} d_theta={manifest['d_theta']:.3g}")


@main.command()
@click.argument("por_dir", type=click.Path(file_okay=False))
@click.option("--data-root", default=None,
              help="Where the dataset lies, searched alone (default: $RAYFORGE_DATA, then the download cache); for a "
                   "public-data PoR, the public dataset's image folder (required).")
@click.option("--model", "model_path", default=None, help="The deployed model (safetensors) to compare with.")
@click.option("--steps", "selection", default="all", help="all | topq:Q | random:N segments to replay.")
@click.option("--tol", type=TOLERANCE, default=None, help="Replay tolerance per segment, l2 over the parameters "
                                                          "(default 1e-4).")
@click.option("--tol-rel", type=TOLERANCE, default=None,
              help="Also bound each segment's l2 deviation by this fraction of its update norm |θ_end − θ_start|.")
@click.option("--seed", type=NON_NEGATIVE, default=None, help="Seed of random:N (printed when not given).")
@click.option("--threads", type=POSITIVE, default=None,
              help="torch threads for the replay (default: the PoR's, capped at the local cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--trust-model-code", is_flag=True,
              help="Allow a PoR whose model is module:callable: building it imports and runs that code.")
def verify(por_dir, data_root, model_path, selection, tol, tol_rel, seed, threads, as_json, trust_model_code):
    """Verify a PoR as a hostile artifact: exit 0 valid, 1 invalid (reasons listed), 2 malformed or unusable
    input (checked before any replay)."""
    import json

    import rayforge as rf

    report = rf.verify_por(por_dir, data_root=data_root, model=model_path, steps=selection, tol=tol,
                           tol_rel=tol_rel, seed=seed, threads=threads, trust_model_code=trust_model_code,
                           warn=lambda message: click.echo(f"warning: {message}", err=True))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else "\n".join(report.to_text()))
    sys.exit(0 if report.valid else 1)


@main.command()
@run_dir_arg
@click.option("--strategy", default=None, help="Whose phase-1/2 and attack outputs to use (default: the config's).")
@click.option("--pool", type=POSITIVE, default=None, help="Substitutes drawn per step (default 128).")
@click.option("--neighbours", type=NON_NEGATIVE, default=None,
              help="Nearest same-label points of each audited point added to the pool (default 3).")
@click.option("--epochs", type=POSITIVE, default=None, help="Audit this many evenly spaced epochs (default: all).")
@click.option("--points", type=POSITIVE, default=None, help="Sampling approximation: audit N sampled points only.")
@actors_option
@set_option
def audit(run_dir, strategy, pool, neighbours, epochs, points, actors, overrides):
    """Which training points a PoR can repudiate: RUN/audit/points.parquet, summary.json and a figure."""
    import rayforge as rf

    cfg = run_config(run_dir, overrides, STAGE_KEYS, actors)
    s = rf.audit(run_dir, strategy=strategy, pool=pool, neighbours=neighbours, epochs=epochs, points=points,
                 config=cfg)
    worst = ", ".join(f"#{p['point']} ({p['score']:.2f})" for p in s["least_repudiable"][:5])
    click.echo(f"audit: {s['repudiable']} of {s['points']} points repudiable ({s['share_repudiable']:.1%}); "
               f"least repudiable: {worst} -> {run_dir}/audit")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@out_option
@set_option
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
