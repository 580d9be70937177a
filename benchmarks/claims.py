"""The PoRs of the three claims on one run, side by side: d_θ, and MI-equivalence with the attacks of the report.

    python benchmarks/claims.py RUN --out DIR --points P [P ...] [--tests I [I ...]] [--heldout K [K ...]]
        [--grow 1 5 20] [--public DPDIR [--strategy hybrid] [--mu M] [--pool P]] [--attacks] [--actors A]
        [--json FILE]

  exclude  "x* was in D": the minimal PoR of each training point P, D \\ {P}  (`rayforge por RUN --point P --mode
           minimal`)
  include  "x* was left out of D": the include PoR of each test point I (`rayforge por RUN --include-test I`) and
           of each held-out point K of the attack population (V's K-th point, population id n + K, whatever split
           V was drawn from; exported as its image, as `rayforge por RUN --include IMAGE --label L` would take it),
           D ∪ {x*}, |H| = epochs, per window the iteration with the smallest residual, and the paper's random H of
           the same size (`--pick random`)
  grow     d_θ of the include PoR of the first x* for every |H| in --grow, best and random (one walk of the
           original trajectory serves them all)
  public   the public-data PoR from the image folder DPDIR (`rayforge por RUN --public DPDIR`)

PoR directories already under DIR are reused (the run is resumable). With --attacks, the attacks of the report
(fitted on the run's stored shadows RUN/attack/shadows, or on shadows trained on Ray as `rayforge attack` does)
score every population point on the original model θ* and on each PoR's model θ'. Per PoR and attack, as the report
does per forged model:
  Diff        the PoR's own point: the excluded member P, or x* (a test point counts only when V was drawn from the
              test split, i.e. D is the whole training split; otherwise the row says so); its prediction on θ*
              and θ' and |Δ score|. Public PoRs have no point of their own.
  Common      the members of D (but P): the share whose prediction flips between θ* and θ'
  Validation  the held-out points V (but x*): the share whose prediction flips
A PoR is MI-equivalent for an attack on its point when the prediction does not change (the paper's c_A^Diff, per
point): the attack says the same of x* whether x* was trained on (include PoR) or not (exclude PoR).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("WANDB_MODE", "disabled")

from rayforge.attacks.evaluate import attack_population, score_all  # noqa: E402
from rayforge.data import ImageArrays  # noqa: E402
from rayforge.errors import RayforgeError  # noqa: E402
from rayforge.io import atomic_write_json  # noqa: E402
from rayforge.por.include import (PICKS, admissions, best_steps, check_not_in, random_steps,  # noqa: E402
                                  union_data, write_include_por, xstar_from_test)
from rayforge.por.minimal import export_minimal_por  # noqa: E402
from rayforge.por.public import export_public_por  # noqa: E402
from rayforge.train.log import ckpt_name, load_state, read_checkpoint  # noqa: E402
from rayforge.train.run import TrainingRun, new_model, set_determinism  # noqa: E402


def _row(kind: str, label: str, por: Path, seconds: float | None, **extra) -> dict:
    m = json.loads((por / "por.json").read_text())
    return {"kind": kind, "por": label, "dir": str(por), "d_theta": m["d_theta"], "epsilon": m["epsilon"],
            "seconds": seconds, **extra}


def _timed(por: Path, build) -> float | None:
    """Build `por` unless it is already there; the seconds it took (None when reused)."""
    if (por / "por.json").is_file():
        return None
    start = time.perf_counter()
    build()
    return time.perf_counter() - start


def exclude_rows(run: TrainingRun, points: list[int], out: Path) -> list[dict]:
    rows = []
    for p in points:
        por = out / f"exclude-{p}"
        rows.append(_row("exclude", f"D \\ {{{p}}}", por, _timed(por, lambda: export_minimal_por(run, p, por)),
                         point=p, steps=sum(int(p in b) for b in run.steps.batch)))
    return rows


def heldout_point(run: TrainingRun, k: int) -> ImageArrays:
    """V's k-th point (population id n + k) as x*: its pixels as the model takes them (what an image file of it
    passed to `rayforge por --include` becomes)."""
    pop, n, _ = attack_population(run.load_dataset(), run.cfg)
    if isinstance(k, bool) or not 0 <= k < len(pop) - n:
        raise RayforgeError(f"--heldout must be an index into the held-out points V [0, {len(pop) - n}), got {k!r}")
    return pop.images.take(np.array([n + k]))


def include_rows(run: TrainingRun, points: list[tuple[str, int, ImageArrays]], grow: list[int],
                 out: Path) -> list[dict]:
    """|H| = epochs (best, random) for every x* (`(source, index, pixels)`, source "test" or "heldout"); every |H|
    of `grow` for the first one."""
    set_determinism(run.cfg.train.threads)
    ds, device, n, tau = run.load_dataset(), run.device(), int(run.info["n"]), run.total_steps
    rows = []
    for k, (source, i, xstar) in enumerate(points):
        check_not_in(ds.train, xstar, run.cfg.data.flip)
        data = union_data(ds, xstar, device)
        counts = sorted(set([run.cfg.train.epochs] + (grow if k == 0 else [])))
        tag = {"test": f"{i}", "heldout": f"v{i}"}[source]
        wanted = [(count, pick, out / f"include-{tag}-{pick}-{count}") for count in counts for pick in PICKS]
        table, walk_s = None, None
        if any(not (por / "por.json").is_file() for *_, por in wanted):  # one walk serves every |H| and pick
            start = time.perf_counter()
            table = admissions(run, data, n, range(tau), device)
            walk_s = time.perf_counter() - start
        for count, pick, por in wanted:
            def build(count=count, pick=pick, por=por):
                steps = best_steps(table, tau, count) if pick == "best" else random_steps(tau, count, run.cfg.seed)
                write_include_por(run, por, xstar, data, [table[int(t)] for t in steps], device)

            seconds = _timed(por, build)
            steps = json.loads((por / "por.json").read_text())["include"]["steps"]
            residual = None if table is None else float(sum(table[t].residual for t in steps))
            name = {"test": f"test {i}", "heldout": f"V {i}"}[source]
            rows.append(_row("include", f"D ∪ {{{name}}}", por, seconds, **{source: i}, pick=pick, H=count,
                             residual_sum=residual, walk_s=walk_s))
    return rows


def public_rows(run: TrainingRun, public: Path, out: Path, strategy: str, mu: int | None, pool: int | None) -> list:
    por, summary = out / f"public-{strategy}", {}
    seconds = _timed(por, lambda: export_public_por(run, public, por, strategy=strategy, mu=mu, pool_size=pool,
                                                    summary=summary))
    errors = summary.get("relative_errors")
    return [_row("public", f"D_p ({strategy})", por, seconds, strategy=strategy, mu=mu or run.cfg.forge.mu,
                 pool=pool or run.cfg.forge.pool_size,
                 rel_error_median=None if errors is None else float(np.median(errors)))]


# ---------------------------------------------------------------------------------------------- MI-equivalence

def _final_model(run: TrainingRun, por_dir: Path) -> torch.nn.Module:
    model = new_model(run.cfg, run.info["shape"], torch.device("cpu"), run.num_classes)
    load_state(read_checkpoint(por_dir / ckpt_name(run.total_steps)), model, None)
    return model.eval()


def fitted_attacks(run: TrainingRun, pop, actors: int) -> dict:
    """The report's attacks fitted on the run's shadows: the stored set (RUN/attack/shadows, with its cached
    logits) when there is one, else shadows trained on Ray as `rayforge attack` does."""
    from rayforge.attacks.driver import attack_root, prepare_attacks, shadow_set, stored_attacks, train_shadows
    from rayforge.ray_utils import ray_session

    if (attack_root(run.run_dir) / "shadows" / "shadows.json").is_file():
        return stored_attacks(run, pop)
    with ray_session(run.cfg.ray) as ray:
        states, _ = train_shadows(run, ray.put(run.detach()), actors, run.cfg.ray, True)
    return prepare_attacks(run.cfg, pop, shadow_set(run, pop, states, {}))


def point_id(row: dict, n: int, test_ids: dict[int, int]) -> int | str | None:
    """The population id of a row's own point (None for public PoRs), or why it has none."""
    if row["kind"] == "exclude":
        return row["point"]
    if row["kind"] == "public":
        return None
    if "heldout" in row:
        return n + row["heldout"]
    return test_ids.get(row["test"], f"test point {row['test']} is not a held-out point of the attack population "
                                     f"(V was drawn from the {'training' if not test_ids else 'test'} split)")


def changes(before: dict, after: dict, point: int | None, n: int) -> dict:
    """Per attack: the point's prediction and score on θ* and θ' (Diff), and the shares of the other members
    (Common) and held-out points (Validation) whose prediction flips."""
    ids = np.arange(len(next(iter(before.values()))["pred"]))
    others = ids != point
    common, validation = others & (ids < n), others & (ids >= n)
    out = {}
    for name in before:
        b, a = before[name], after[name]
        flipped = b["pred"].astype(bool) != a["pred"].astype(bool)
        out[name] = {
            "common_flipped": float(flipped[common].mean()),
            "validation_flipped": float(flipped[validation].mean()),
            "common_score_shift_median": float(np.median(np.abs(a["score"] - b["score"])[common])),
        }
        if point is not None:
            out[name].update(pred_original=bool(b["pred"][point]), pred_forged=bool(a["pred"][point]),
                             score_original=float(b["score"][point]), score_forged=float(a["score"][point]))
    return out


def mi_equivalence(run: TrainingRun, rows: list[dict], actors: int) -> None:
    """Add, per row and attack, what changes between θ* and the PoR's θ' (`changes`), under "mi"."""
    pop, n, record = attack_population(run.load_dataset(), run.cfg)
    heldout = record["heldout"]
    test_ids = {int(t): n + k for k, t in enumerate(heldout["indices"])} if heldout["source"] == "test" else {}
    attacks = fitted_attacks(run, pop, actors)
    original, _ = run.model_at(run.total_steps, torch.device("cpu"))
    before = score_all(attacks, original, pop.ids)
    for row in rows:
        point = point_id(row, n, test_ids)
        if isinstance(point, str):
            row["mi"] = point
            continue
        row["mi"] = changes(before, score_all(attacks, _final_model(run, Path(row["dir"])), pop.ids), point, n)


# ---------------------------------------------------------------------------------------------- output

def _mi_text(mi) -> str:
    if not isinstance(mi, dict):
        return mi or ""
    def one(v: dict) -> str:
        diff = (f"{'M' if v['pred_original'] else 'N'}->{'M' if v['pred_forged'] else 'N'} " if "pred_original" in v
                else "")
        return f"{diff}C {v['common_flipped']:.0%} V {v['validation_flipped']:.0%}"
    return ", ".join(f"{a}: {one(v)}" for a, v in mi.items())


def table(rows: list[dict]) -> str:
    lines = [f"{'kind':<8}{'por':<26}{'pick':>7}{'|H|':>6}{'d_theta':>11}{'epsilon':>11}{'seconds':>9}  "
             f"MI (x*: θ*->θ', Common/Validation flipped)"]
    for r in rows:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"{r['kind']:<8}{r['por']:<26}{r.get('pick', ''):>7}{r.get('H', r.get('steps', '')):>6}"
                     f"{r['d_theta']:>11.3g}{r['epsilon']:>11.4g}{seconds:>9}  {_mi_text(r.get('mi'))}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="Directory of the PoRs (created; reused if there).")
    parser.add_argument("--points", type=int, nargs="*", default=[], help="Training points (exclude PoRs).")
    parser.add_argument("--tests", type=int, nargs="*", default=[], help="Test points (include PoRs).")
    parser.add_argument("--heldout", type=int, nargs="*", default=[],
                        help="Held-out points of the attack population, by index into V (include PoRs).")
    parser.add_argument("--grow", type=int, nargs="*", default=[], help="|H| values for the first x*.")
    parser.add_argument("--public", type=Path, default=None, help="D_p's image folder (public PoR).")
    parser.add_argument("--strategy", default="hybrid")
    parser.add_argument("--mu", type=int, default=None)
    parser.add_argument("--pool", type=int, default=None)
    parser.add_argument("--attacks", action="store_true", help="Also measure MI-equivalence (trains shadows).")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    try:
        run_claims(args)
    except RayforgeError as exc:
        raise SystemExit(f"error: {exc}") from None


def run_claims(args: argparse.Namespace) -> None:
    run = TrainingRun.open(args.run)
    args.out.mkdir(parents=True, exist_ok=True)
    ds = run.load_dataset()
    xstars = ([("test", i, xstar_from_test(ds, i)) for i in args.tests]
              + [("heldout", k, heldout_point(run, k)) for k in args.heldout])
    rows = exclude_rows(run, args.points, args.out) + include_rows(run, xstars, args.grow, args.out)
    if args.public is not None:
        rows += public_rows(run, args.public, args.out, args.strategy, args.mu, args.pool)
    if args.attacks:
        mi_equivalence(run, rows, args.actors)
    print(table(rows))
    if args.json:
        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
