"""The attack stage on Ray: shadow models trained by actors (once, stored under the run), then the original model
scored once and phase 2 run with a consumer that scores every forged model in the rebuild actor that built it
(forged models never travel and are dropped after scoring unless asked to keep them).

Only the driver reads and writes the run directory. Workers receive the run with its dataset (one `ray.put`) and the
shadows' states and logits through the object store, and compute on what Ray assigned them: shadow actors, the task
that scores the original model, and rebuild actors each rebuild the attack population and prepare the attacks from
the shadows themselves (deterministic, so every worker holds the same fitted attacks), which keeps the driver free of
model computation and the population off the head node.

Outputs, under RUN/attack/:
  population.json                      who is in the attack population (see rayforge.attacks.evaluate)
  shadows/shadow-<kkk>.safetensors     shadow k: its state (param/*, buffer/*) and its logits on the population
                                       (logits/plain, logits/flip); each saved as it lands, so shadows resume
  <strategy>/original.parquet          every population point scored on the original model, per attack
  <strategy>/scores.parquet            per evaluated point and attack: its Diff/Common/Validation queries on its
                                       forged model (ids, scores, predictions)
  <strategy>/distances.parquet         d_θ per group (phase 2)
  <strategy>/summary.json              phase 2's summary, with where every actor and task ran (placement)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rayforge.attacks.base import Attack, Population, build_attack, model_logits
from rayforge.attacks.evaluate import ForgedModelScorer, attack_population, score_all
from rayforge.attacks.shadows import ShadowSet, balanced_in_mask, shadow_seed, train_shadow
from rayforge.config import Config, RayConfig, WandbConfig
from rayforge.errors import RayforgeError
from rayforge.io import atomic_write_json, read_tensors, save_tensors, write_parquet
from rayforge.ray_utils import actor_options, placement, ray_session, unwrap
from rayforge.rebuild.driver import RebuildParams, run_rebuild
from rayforge.stage import StageWorker, Unit, run_units
from rayforge.train.log import state_tensors
from rayforge.train.run import TrainingRun, use_threads

SCORES_SCHEMA = pa.schema([
    ("point", pa.int64()), ("group", pa.int64()), ("attack", pa.string()), ("kind", pa.list_(pa.string())),
    ("z", pa.list_(pa.int64())), ("score", pa.list_(pa.float64())), ("pred", pa.list_(pa.bool_())),
])
ORIGINAL_SCHEMA = pa.schema([
    ("id", pa.int64()), ("attack", pa.string()), ("score", pa.float64()), ("pred", pa.bool_()),
    ("member", pa.bool_()),
])


def attack_root(run_dir: Path) -> Path:
    return Path(run_dir) / "attack"


def shadow_train_config(cfg: Config):
    return dataclasses.replace(cfg.train, epochs=cfg.attack.shadow_epochs or cfg.train.epochs)


def shadow_model_name(cfg: Config) -> str:
    return cfg.attack.shadow_model or cfg.model.name


class ShadowWorker(StageWorker):
    """A shadow-training actor: builds the population once from the run the driver sent, then trains shadow k on
    its half and returns the shadow's state and its logits on every population point."""

    def __init__(self, run: TrainingRun):
        use_threads(run.threads)
        self.run = run
        pop, _ = attack_population(run.load_dataset(), run.cfg.data.flip, run.cfg.attack.holdout)
        device = run.device()
        self.pop = pop if device.type == "cpu" else dataclasses.replace(pop, device=str(device))

    def train(self, k: int) -> dict:
        cfg = self.run.cfg
        in_mask = balanced_in_mask(cfg.attack.shadows, len(self.pop), cfg.seed)
        model = train_shadow(self.pop, np.flatnonzero(in_mask[k]), shadow_model_name(cfg), shadow_train_config(cfg),
                             shadow_seed(cfg.seed, k))
        logits = {f"logits/{name}": torch.from_numpy(model_logits(model, self.pop, flip=flip))
                  for name, flip in (("plain", False), ("flip", True))}
        return {**state_tensors(model, None), **logits}


def train_shadows(run: TrainingRun, run_ref, actors: int | str, ray_cfg: RayConfig, progress: bool):
    """Train the run's shadow models not yet on disk (each saved as it lands); their tensors, and where they ran."""
    directory = attack_root(run.run_dir) / "shadows"
    directory.mkdir(parents=True, exist_ok=True)
    count = run.cfg.attack.shadows

    def part(k: int) -> Path:
        return directory / f"shadow-{k:03d}.safetensors"

    todo = [Unit((k,), "train", (k,)) for k in range(count) if not part(k).is_file()]
    result = run_units(todo, ShadowWorker, (run_ref,), ray_cfg, actors, lambda unit, t: save_tensors(part(unit[0]), t),
                       "shadows", count, progress)
    return [read_tensors(part(k), "shadow model") for k in range(count)], result.placement


def attack_names(cfg: Config) -> list[str]:
    """Every configured attack that can run (MIDA only when the target trained with flips)."""
    return [name for name in cfg.attack.attacks if name != "mida" or cfg.data.flip]


def prepare_attacks(cfg: Config, pop: Population, shadows: ShadowSet) -> dict[str, Attack]:
    """Every configured attack that can run, fitted on the shadows only."""
    attacks = {}
    for name in attack_names(cfg):
        attack = build_attack(name)
        attack.prepare(pop, shadows)
        attacks[name] = attack
    return attacks


def attack_context(run: TrainingRun, shadow_tensors: list[dict]) -> tuple[Population, int, dict[str, Attack]]:
    """In a worker: the population, n, and the attacks prepared from the shadows the driver sent."""
    cfg = run.cfg
    pop, n = attack_population(run.load_dataset(), cfg.data.flip, cfg.attack.holdout)
    states = [{k: v for k, v in t.items() if not k.startswith("logits/")} for t in shadow_tensors]
    logits = {flip: np.stack([t[f"logits/{name}"].numpy() for t in shadow_tensors])
              for name, flip in (("plain", False), ("flip", True))}
    shadows = ShadowSet(pop, shadow_model_name(cfg), balanced_in_mask(cfg.attack.shadows, len(pop), cfg.seed),
                        states, logits)
    return pop, n, prepare_attacks(cfg, pop, shadows)


def forged_model_scorer(run: TrainingRun, shadow_tensors: list[dict]) -> ForgedModelScorer:
    """The consumer each rebuild actor builds once: scores every forged model it rebuilds."""
    pop, n, attacks = attack_context(run, shadow_tensors)
    return ForgedModelScorer(attacks, n, len(pop), run.cfg.attack, run.cfg.seed)


def score_original(run: TrainingRun, shadow_tensors: list[dict], final_state: dict) -> dict:
    """A task: every population point scored on the original model by every attack, and where that ran."""
    use_threads(run.threads)
    pop, n, attacks = attack_context(run, shadow_tensors)
    model, _ = run.model_from_state(final_state, run.device(), "the final checkpoint")
    return {"n": n, "size": len(pop), "scores": score_all(attacks, model, pop.ids), "placement": placement()}


def _scores_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)


def run_attack(run_dir: str | Path, strategy: str, actors: int | str, ray_cfg: RayConfig, wandb_cfg: WandbConfig,
               progress: bool = True, max_units: int | None = None, save_models: int = 0,
               groups_per_unit: int = 4) -> dict | None:
    """Shadows, original scores, then rebuild + scoring of every forged model (resumable)."""
    run = TrainingRun.open(run_dir)
    cfg = run.cfg
    if not attack_names(cfg):
        raise RayforgeError("attack: no attack to run (attack.attacks is empty, or only mida without flips)")
    root = attack_root(run.run_dir)
    out = root / strategy
    (out / "score-units").mkdir(parents=True, exist_ok=True)
    with ray_session(ray_cfg) as ray:
        run_ref = ray.put(run.detach())
        shadow_tensors, shadow_placement = train_shadows(run, run_ref, actors, ray_cfg, progress)
        shadows_ref = ray.put(shadow_tensors)
        task = ray.remote(score_original).options(**actor_options(ray_cfg), max_retries=0)
        try:
            original = ray.get(task.remote(run_ref, shadows_ref, ray.put(run.checkpoint(run.total_steps))))
        except ray.exceptions.RayTaskError as exc:
            raise unwrap(exc) from None
        _write_original(root, out, cfg, original)

        def on_consumed(first: int, outputs: list) -> None:
            write_parquet(out / "score-units" / f"groups-{first:08d}.parquet",
                          _scores_table([row for rows in outputs for row in rows]))

        params = RebuildParams(strategy=strategy, groups_per_unit=groups_per_unit)
        summary = run_rebuild(run.run_dir, params, actors, ray_cfg, wandb_cfg, save_models=save_models,
                              progress=progress, max_units=max_units, consumer_factory=forged_model_scorer,
                              consumer_args=(run_ref, shadows_ref), on_consumed=on_consumed, stage="attack")
    if summary is None:
        return None
    units = sorted((out / "score-units").glob("groups-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in units]).sort_by([("point", "ascending"),
                                                                        ("attack", "ascending")]).combine_chunks()
    write_parquet(out / "scores.parquet", table)
    summary.update({
        "evaluated_points": int(len(np.unique(table.column("point").to_numpy()))), "attacks": sorted(original["scores"]),
        "placement": ([{**p, "role": "shadows"} for p in shadow_placement]
                      + [{**original["placement"], "units": 1, "role": "original"}]
                      + [{**p, "role": "rebuild"} for p in summary["placement"]])})
    atomic_write_json(out / "summary.json", summary)
    return summary


def _write_original(root: Path, out: Path, cfg: Config, original: dict) -> None:
    """population.json, and every population point's scores on the original model (original.parquet)."""
    n, size, scores = original["n"], original["size"], original["scores"]
    atomic_write_json(root / "population.json", {
        "members": [0, n], "heldout_test_points": [n, size], "flip": cfg.data.flip,
        "shadows": cfg.attack.shadows, "shadow_model": shadow_model_name(cfg),
        "shadow_epochs": shadow_train_config(cfg).epochs, "common_per_point": cfg.attack.common,
        "validation_per_point": cfg.attack.validation})
    ids = np.arange(size, dtype=np.int64)
    write_parquet(out / "original.parquet", pa.table({
        "id": np.tile(ids, len(scores)),
        "attack": np.repeat(list(scores), size),
        "score": np.concatenate([v["score"] for v in scores.values()]),
        "pred": np.concatenate([v["pred"] for v in scores.values()]).astype(bool),
        "member": np.tile(ids < n, len(scores)),
    }, schema=ORIGINAL_SCHEMA))
