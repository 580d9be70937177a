"""The attack stage on Ray: shadow models trained by actors (once, stored under the run), attacks prepared from
them, the original model scored once, then phase 2 run with a consumer that scores every forged model in the
rebuild actor that built it (forged models never travel and are dropped after scoring unless asked to keep them).

Outputs, under RUN/attack/:
  population.json                      who is in the attack population (see rayforge.attacks.evaluate)
  shadows/                             the shadow models, their IN/OUT mask and cached logits (safetensors, JSON)
  <strategy>/original.parquet          every population point scored on the original model, per attack
  <strategy>/scores.parquet            per evaluated point and attack: its Diff/Common/Validation queries on its
                                       forged model (ids, scores, predictions)
  <strategy>/distances.parquet         d_θ per group (phase 2)
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayforge.attacks.base import Attack, build_attack
from rayforge.attacks.evaluate import ForgedModelScorer, attack_population, score_all
from rayforge.attacks.shadows import ShadowSet, balanced_in_mask, shadow_seed, train_shadow
from rayforge.config import Config, RayConfig, WandbConfig
from rayforge.errors import RayforgeError
from rayforge.rebuild.driver import RebuildParams, run_rebuild
from rayforge.stage import run_units
from rayforge.train.log import state_tensors
from rayforge.io import atomic_write_json, read_tensors, save_tensors, write_parquet
from rayforge.train.run import TrainingRun

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
    import dataclasses

    return dataclasses.replace(cfg.train, epochs=cfg.attack.shadow_epochs or cfg.train.epochs)


class ShadowWorker:
    """A shadow-training actor: holds the population once, trains shadow k on its half."""

    def __init__(self, run_dir: str):
        self.run = TrainingRun.open(run_dir)
        import torch

        torch.set_num_threads(max(1, int(self.run.cfg.ray.num_cpus_per_actor)))
        self.pop, _ = attack_population(self.run.load_dataset(), self.run.cfg.data.flip, self.run.cfg.attack.holdout)

    def train(self, k: int) -> dict:
        cfg = self.run.cfg
        in_mask = balanced_in_mask(cfg.attack.shadows, len(self.pop), cfg.seed)
        model = train_shadow(self.pop, np.flatnonzero(in_mask[k]), cfg.attack.shadow_model or cfg.model.name,
                             shadow_train_config(cfg), shadow_seed(cfg.seed, k))
        return state_tensors(model, None)


def train_shadows(run: TrainingRun, pop, actors: int, progress: bool) -> ShadowSet:
    """Train (or load) the run's shadow models; each finished shadow is saved at once, so this stage resumes."""
    cfg = run.cfg
    directory = attack_root(run.run_dir) / "shadows"
    if (directory / "shadows.json").is_file():
        return ShadowSet.load(directory, pop)
    parts = attack_root(run.run_dir) / "shadow-parts"
    parts.mkdir(parents=True, exist_ok=True)

    def part(k: int) -> Path:
        return parts / f"shadow-{k:03d}.safetensors"

    def save(unit, state) -> None:
        save_tensors(part(unit[0]), state)

    todo = [(k,) for k in range(cfg.attack.shadows) if not part(k).is_file()]
    run_units(todo, ShadowWorker, (str(run.run_dir),), "train", cfg.ray, actors, save, "shadows",
              cfg.attack.shadows, progress)
    states = [read_tensors(part(k)) for k in range(cfg.attack.shadows)]
    shadows = ShadowSet(pop, cfg.attack.shadow_model or cfg.model.name,
                        balanced_in_mask(cfg.attack.shadows, len(pop), cfg.seed), states)
    shadows.save(directory)
    return shadows


def prepare_attacks(cfg: Config, pop, shadows: ShadowSet) -> dict[str, Attack]:
    """Every configured attack, fitted on the shadows only (MIDA only when the target trained with flips)."""
    attacks = {}
    for name in cfg.attack.attacks:
        if name == "mida" and not cfg.data.flip:
            continue
        attack = build_attack(name)
        attack.prepare(pop, shadows)
        attacks[name] = attack
    return attacks


def _scores_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)


def run_attack(run_dir: str | Path, strategy: str, actors: int, ray_cfg: RayConfig, wandb_cfg: WandbConfig,
               progress: bool = True, max_units: int | None = None, save_models: int = 0,
               groups_per_unit: int = 4) -> dict | None:
    """Shadows, attacks, original scores, then rebuild + scoring of every forged model (resumable)."""
    run = TrainingRun.open(run_dir)
    cfg = run.cfg
    ds = run.load_dataset()
    pop, n = attack_population(ds, cfg.data.flip, cfg.attack.holdout)
    root = attack_root(run.run_dir)
    root.mkdir(exist_ok=True)
    atomic_write_json(root / "population.json", {
        "members": [0, n], "heldout_test_points": [n, len(pop)], "flip": cfg.data.flip,
        "shadows": cfg.attack.shadows, "shadow_model": cfg.attack.shadow_model or cfg.model.name,
        "shadow_epochs": shadow_train_config(cfg).epochs, "common_per_point": cfg.attack.common,
        "validation_per_point": cfg.attack.validation})
    shadows = train_shadows(run, pop, actors, progress)
    attacks = prepare_attacks(cfg, pop, shadows)
    if not attacks:
        raise RayforgeError("attack: no attack to run (attack.attacks is empty, or only mida without flips)")
    out = root / strategy
    (out / "score-units").mkdir(parents=True, exist_ok=True)
    original_model, _ = run.model_at(run.total_steps, run.device())
    original = score_all(attacks, original_model, pop.ids)
    write_parquet(out / "original.parquet", pa.table({
        "id": np.tile(pop.ids, len(original)),
        "attack": np.repeat(list(original), len(pop)),
        "score": np.concatenate([v["score"] for v in original.values()]),
        "pred": np.concatenate([v["pred"] for v in original.values()]).astype(bool),
        "member": np.tile(pop.ids < n, len(original)),
    }, schema=ORIGINAL_SCHEMA))

    def on_consumed(first: int, outputs: list) -> None:
        write_parquet(out / "score-units" / f"groups-{first:08d}.parquet",
                      _scores_table([row for rows in outputs for row in rows]))

    factory = functools.partial(ForgedModelScorer, attacks, n, len(pop), cfg.attack, cfg.seed)
    params = RebuildParams(strategy=strategy, groups_per_unit=groups_per_unit,
                           threads=max(1, int(cfg.ray.num_cpus_per_actor)))
    summary = run_rebuild(run.run_dir, params, actors, ray_cfg, wandb_cfg, save_models=save_models,
                          progress=progress, max_units=max_units, consumer_factory=factory,
                          on_consumed=on_consumed, stage="attack")
    if summary is None:
        return None
    units = sorted((out / "score-units").glob("groups-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in units]).sort_by([("point", "ascending"),
                                                                        ("attack", "ascending")])
    write_parquet(out / "scores.parquet", table)
    summary.update({"evaluated_points": int(len(np.unique(table.column("point").to_numpy()))),
                    "attacks": sorted(attacks)})
    return summary
