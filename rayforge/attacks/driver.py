"""The attack stage on Ray: shadow models trained by actors (once, stored under the run), attacks prepared from
them, the original model scored once, then phase 2 run with a consumer that scores every forged model in the
rebuild actor that built it (forged models never travel and are dropped after scoring unless asked to keep them).

Outputs, under RUN/attack/:
  population.json                      who is in the attack population and where V and P came from (see
                                       rayforge.attacks.evaluate), the shadows' architecture and schedule
  shadows/                             the shadow models, their IN/OUT mask and cached logits (safetensors, JSON)
  control.json                         per attack: the exchangeable control (AUC when a shadow plays the target)
                                       beside the AUC on the original model
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
from rayforge.attacks.evaluate import ForgedModelScorer, attack_population, exchangeable_control, score_all
from rayforge.attacks.metrics import auc, tpr_at_fpr
from rayforge.attacks.shadows import (ShadowSet, balanced_in_mask, shadow_model_name, shadow_seed,
                                      shadow_train_config, train_shadow)
from rayforge.config import Config, RayConfig, WandbConfig
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


class ShadowWorker:
    """A shadow-training actor: holds the population once, trains shadow k on its half."""

    def __init__(self, run_dir: str):
        self.run = TrainingRun.open(run_dir)
        import torch

        torch.set_num_threads(max(1, int(self.run.cfg.ray.num_cpus_per_actor)))
        self.pop, _, _ = attack_population(self.run.load_dataset(), self.run.cfg)

    def train(self, k: int) -> dict:
        cfg = self.run.cfg
        in_mask = balanced_in_mask(cfg.attack.shadows, len(self.pop), cfg.seed)
        model = train_shadow(self.pop, np.flatnonzero(in_mask[k]), shadow_model_name(cfg), shadow_train_config(cfg),
                             shadow_seed(cfg.seed, k))
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
    shadows = ShadowSet(pop, shadow_model_name(cfg), balanced_in_mask(cfg.attack.shadows, len(pop), cfg.seed), states)
    shadows.save(directory)
    return shadows


def prepare_attacks(cfg: Config, pop, shadows: ShadowSet) -> dict[str, Attack]:
    """Every configured attack, fitted on the shadows only (the config refuses attacks that cannot run)."""
    attacks = {}
    for name in cfg.attack.attacks:
        attack = build_attack(name)
        attack.prepare(pop, shadows)
        attacks[name] = attack
    return attacks


def write_control(path: Path, cfg: Config, pop, shadows: ShadowSet, original: dict, n: int) -> None:
    """control.json: per attack, the exchangeable control (`evaluate.exchangeable_control`, shadows 0..control-1
    playing the target) and, beside it, the AUC and TPR at 0.1% FPR on the original model (D against V)."""
    control = exchangeable_control(cfg.attack.attacks, pop, shadows, range(cfg.attack.control))
    member = pop.ids < n
    for name, result in control.items():
        result["target_auc"] = auc(original[name]["score"], member)
        result["target_tpr_at_0.1_fpr"] = tpr_at_fpr(original[name]["score"], member, 0.001)
    atomic_write_json(path, {"shadows_as_target": cfg.attack.control, "attacks": control})


def _scores_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)


def run_attack(run_dir: str | Path, strategy: str, actors: int, ray_cfg: RayConfig, wandb_cfg: WandbConfig,
               progress: bool = True, max_units: int | None = None, save_models: int = 0,
               groups_per_unit: int = 4) -> dict | None:
    """Shadows, attacks, original scores, then rebuild + scoring of every forged model (resumable)."""
    run = TrainingRun.open(run_dir)
    cfg = run.cfg
    ds = run.load_dataset()
    pop, n, record = attack_population(ds, cfg)
    root = attack_root(run.run_dir)
    root.mkdir(exist_ok=True)
    schedule = shadow_train_config(cfg)
    atomic_write_json(root / "population.json", {
        **record, "flip": cfg.data.flip, "shadows": cfg.attack.shadows, "shadow_model": shadow_model_name(cfg),
        "shadow_train": {"epochs": schedule.epochs, "lr": schedule.lr, "batch_size": schedule.batch_size,
                         "momentum": schedule.momentum, "weight_decay": schedule.weight_decay},
        "common_per_point": cfg.attack.common, "validation_per_point": cfg.attack.validation})
    shadows = train_shadows(run, pop, actors, progress)
    attacks = prepare_attacks(cfg, pop, shadows)
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
    if not (root / "control.json").is_file():
        write_control(root / "control.json", cfg, pop, shadows, original, n)

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
