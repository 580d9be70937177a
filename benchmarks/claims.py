"""The PoRs of the three claims on one run, side by side: d_θ, and MI-equivalence with the attacks of the report.

    python benchmarks/claims.py RUN --out DIR --points P [P ...] --tests I [I ...] [--grow 1 5 20]
        [--public DPDIR [--strategy hybrid] [--mu M] [--pool P]] [--attacks] [--actors A] [--json FILE]

  exclude  "x* was in D": the minimal PoR of each training point P, D \\ {P}  (`rayforge por RUN --point P --mode
           minimal`)
  include  "x* was left out of D": the include PoR of each test point I, D ∪ {I}, |H| = epochs, per window the
           iteration with the smallest residual (`rayforge por RUN --include-test I`), and the paper's random H of
           the same size (`--pick random`)
  grow     d_θ of the include PoR of the first test point for every |H| in --grow, best and random (one walk of
           the original trajectory serves them all)
  public   the public-data PoR from the image folder DPDIR (`rayforge por RUN --public DPDIR`)

PoR directories already under DIR are reused (the run is resumable). With --attacks, the attacks of the report
(shadows trained on Ray as `rayforge attack` does, or reused from RUN/attack/shadows) score the original model θ*
and each PoR's model θ': for exclude the excluded point (population id P), for include x* (test point I must be one of
the population's held-out points V, i.e. V drawn from the test split, which holds when D is the whole training
split; otherwise the row says so), and for public every population point (members D and held-out points V). A
PoR is MI-equivalent for an attack when the attack's membership prediction on the point does not change between
θ* and θ' (the paper's c_A^Diff, per point); |Δ score| says by how much the score moved.
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


def include_rows(run: TrainingRun, tests: list[int], grow: list[int], out: Path) -> list[dict]:
    """|H| = epochs (best, random) for every test point; every |H| of `grow` for the first one."""
    set_determinism(run.cfg.train.threads)
    ds, device, n, tau = run.load_dataset(), run.device(), int(run.info["n"]), run.total_steps
    rows = []
    for k, i in enumerate(tests):
        xstar = xstar_from_test(ds, i)
        check_not_in(ds.train, xstar, run.cfg.data.flip)
        data = union_data(ds, xstar, device)
        counts = sorted(set([run.cfg.train.epochs] + (grow if k == 0 else [])))
        wanted = [(count, pick, out / f"include-{i}-{pick}-{count}") for count in counts for pick in PICKS]
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
            rows.append(_row("include", f"D ∪ {{test {i}}}", por, seconds, test=i, pick=pick, H=count,
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


def mi_equivalence(run: TrainingRun, rows: list[dict], actors: int) -> None:
    """Add, per row and attack: predictions and scores of the PoR's point(s) on θ* and θ'."""
    from rayforge.attacks.driver import prepare_attacks, train_shadows
    from rayforge.attacks.evaluate import attack_population, score_all

    pop, n, record = attack_population(run.load_dataset(), run.cfg)
    heldout = record["heldout"]
    test_ids = {int(t): n + k for k, t in enumerate(heldout["indices"])} if heldout["source"] == "test" else {}
    attacks = prepare_attacks(run.cfg, pop, train_shadows(run, pop, actors, progress=True))
    original, _ = run.model_at(run.total_steps, torch.device("cpu"))
    for row in rows:
        if row["kind"] == "include" and row["test"] not in test_ids:
            row["mi"] = f"test point {row['test']} is not a held-out point of the attack population"
            continue
        ids = {"exclude": lambda: np.array([row.get("point", 0)]), "include": lambda: np.array([test_ids[row["test"]]]),
               "public": lambda: pop.ids}[row["kind"]]()
        before, after = score_all(attacks, original, ids), score_all(attacks, _final_model(run, Path(row["dir"])), ids)
        members = ids < n
        row["mi"] = {name: {
            "pred_original": before[name]["pred"].astype(bool).tolist() if len(ids) == 1 else None,
            "pred_forged": after[name]["pred"].astype(bool).tolist() if len(ids) == 1 else None,
            "flipped_members": float(np.mean(before[name]["pred"][members] != after[name]["pred"][members]))
            if members.any() else None,
            "flipped_heldout": float(np.mean(before[name]["pred"][~members] != after[name]["pred"][~members]))
            if (~members).any() else None,
            "score_shift_median": float(np.median(np.abs(after[name]["score"] - before[name]["score"]))),
        } for name in attacks}


# ---------------------------------------------------------------------------------------------- output

def table(rows: list[dict]) -> str:
    lines = [f"{'kind':<8}{'por':<26}{'pick':>7}{'|H|':>6}{'d_theta':>11}{'epsilon':>11}{'seconds':>9}  MI"]
    for r in rows:
        mi = r.get("mi")
        if isinstance(mi, dict):
            mi = ", ".join(f"{a}: " + (f"{'M' if v['pred_original'][0] else 'N'}->{'M' if v['pred_forged'][0] else 'N'}"
                                       if v["pred_original"] is not None else
                                       f"flip {v['flipped_members']:.1%}/{v['flipped_heldout']:.1%}")
                           + f" |ds| {v['score_shift_median']:.2g}" for a, v in mi.items())
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"{r['kind']:<8}{r['por']:<26}{r.get('pick', ''):>7}{r.get('H', r.get('steps', '')):>6}"
                     f"{r['d_theta']:>11.3g}{r['epsilon']:>11.4g}{seconds:>9}  {mi or ''}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="Directory of the PoRs (created; reused if there).")
    parser.add_argument("--points", type=int, nargs="*", default=[], help="Training points (exclude PoRs).")
    parser.add_argument("--tests", type=int, nargs="*", default=[], help="Test points (include PoRs).")
    parser.add_argument("--grow", type=int, nargs="*", default=[], help="|H| values for the first test point.")
    parser.add_argument("--public", type=Path, default=None, help="D_p's image folder (public PoR).")
    parser.add_argument("--strategy", default="hybrid")
    parser.add_argument("--mu", type=int, default=None)
    parser.add_argument("--pool", type=int, default=None)
    parser.add_argument("--attacks", action="store_true", help="Also measure MI-equivalence (trains shadows).")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    run = TrainingRun.open(args.run)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = exclude_rows(run, args.points, args.out) + include_rows(run, args.tests, args.grow, args.out)
    if args.public is not None:
        rows += public_rows(run, args.public, args.out, args.strategy, args.mu, args.pool)
    if args.attacks:
        mi_equivalence(run, rows, args.actors)
    print(table(rows))
    if args.json:
        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
