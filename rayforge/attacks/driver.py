"""The attack stage on Ray: shadow models trained by actors (once, stored under the run), then one task that fits
the attacks on the shadows and scores the original model, then phase 2 run with a consumer that scores every forged
model in the rebuild actor that built it (forged models never travel and are dropped after scoring unless asked to
keep them).

Only the driver reads and writes the run directory. Workers receive the run with its dataset (one `ray.put`) and the
shadows' states and cached logits through the object store, and compute on what Ray assigned them: shadow actors
train, the fitting task computes the shadows' logits for every view the attacks need (the driver stores them beside
the states, so a resumed stage never recomputes them), and rebuild actors prepare the attacks from those cached
logits themselves (deterministic, so every worker holds the same fitted attacks). The driver only builds the
population (data, no model) and writes files.

Outputs, under RUN/attack/:
  population.json                      who is in the attack population and where V and P came from (see
                                       rayforge.attacks.evaluate), the shadows' architecture and schedule
  shadow-parts/shadow-<kkk>.safetensors  shadow k's state, saved as it lands (so shadow training resumes)
  shadows/                             the complete shadow set: states, IN/OUT mask and cached logits
  control.json                         per attack: the exchangeable control (AUC when a shadow plays the target)
                                       beside the AUC on the original model
  <strategy>/original.parquet          every population point scored on the original model, per attack
  <strategy>/scores.parquet            per evaluated point and attack: its Diff/Common/Validation queries on its
                                       forged model (ids, scores, predictions)
  <strategy>/distances.parquet         d_θ per group (phase 2)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayforge.attacks.base import Attack, Population, build_attack
from rayforge.attacks.evaluate import ForgedModelScorer, attack_population, exchangeable_control, score_all
from rayforge.attacks.metrics import auc, tpr_at_fpr
from rayforge.attacks.shadows import (Query, ShadowSet, balanced_in_mask, shadow_model_name, shadow_seed,
                                      shadow_train_config, train_shadow)
from rayforge.config import Config, RayConfig, WandbConfig
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


def worker_population(run: TrainingRun) -> tuple[Population, int]:
    """In a worker: the attack population on the device the run computes on, and n."""
    pop, n, _ = attack_population(run.load_dataset(), run.cfg)
    device = run.device()
    return (pop if device.type == "cpu" else dataclasses.replace(pop, device=str(device))), n


class ShadowWorker(StageWorker):
    """A shadow-training actor: builds the population once from the run the driver sent, then trains shadow k on
    its half and returns the shadow's state."""

    def __init__(self, run: TrainingRun):
        use_threads(run.threads)
        self.run = run
        self.pop, _ = worker_population(run)

    def train(self, k: int) -> dict:
        cfg = self.run.cfg
        in_mask = balanced_in_mask(cfg.attack.shadows, len(self.pop), cfg.seed)
        model = train_shadow(self.pop, np.flatnonzero(in_mask[k]), shadow_model_name(cfg), shadow_train_config(cfg),
                             shadow_seed(cfg.seed, k))
        return state_tensors(model, None)


def train_shadows(run: TrainingRun, run_ref, actors: int | str, ray_cfg: RayConfig, progress: bool):
    """The states of the run's shadow models (those not yet on disk trained by actors, each saved as it lands),
    and where they ran."""
    count = run.cfg.attack.shadows
    parts = attack_root(run.run_dir) / "shadow-parts"
    parts.mkdir(parents=True, exist_ok=True)

    def part(k: int) -> Path:
        return parts / f"shadow-{k:03d}.safetensors"

    todo = [Unit((k,), "train", (k,)) for k in range(count) if not part(k).is_file()]
    result = run_units(todo, ShadowWorker, (run_ref,), ray_cfg, actors, lambda unit, t: save_tensors(part(unit[0]), t),
                       "shadows", count, progress, threads=run.threads)
    return [read_tensors(part(k), "shadow model") for k in range(count)], result.placement


def prepare_attacks(cfg: Config, pop, shadows: ShadowSet) -> dict[str, Attack]:
    """Every configured attack, fitted on the shadows only (the config refuses attacks that cannot run)."""
    attacks = {}
    for name in cfg.attack.attacks:
        attack = build_attack(name)
        attack.prepare(pop, shadows)
        attacks[name] = attack
    return attacks


def stored_attacks(run: TrainingRun, pop: Population) -> dict[str, Attack]:
    """The run's attacks fitted on its stored shadow set (RUN/attack/shadows, cached logits included): what
    benchmarks and tools score extra models with, exactly as the attack stage scored the forged ones."""
    return prepare_attacks(run.cfg, pop, ShadowSet.load(attack_root(run.run_dir) / "shadows", pop))


def shadow_set(run: TrainingRun, pop: Population, states: list[dict], logits: dict[str, np.ndarray]) -> ShadowSet:
    """The run's shadow set from states and cached logits (keyed by view); missing views are computed on use."""
    cfg = run.cfg
    return ShadowSet(pop, shadow_model_name(cfg), balanced_in_mask(cfg.attack.shadows, len(pop), cfg.seed), states,
                     {Query.from_key(key): arr for key, arr in logits.items()})


def fit_and_score_original(run: TrainingRun, states: list[dict], logits: dict, final_state: dict,
                           control: bool) -> dict:
    """A task: the attacks fitted on the shadows, every population point scored on the original model, the
    exchangeable control when asked; returns the shadows' logits per view (to store) and where it ran."""
    use_threads(run.threads)
    pop, n = worker_population(run)
    shadows = shadow_set(run, pop, states, logits)
    attacks = prepare_attacks(run.cfg, pop, shadows)
    model, _ = run.model_from_state(final_state, run.device(), "the final checkpoint")
    original = score_all(attacks, model, pop.ids)
    out = {"scores": original, "placement": placement(),
           "logits": shadows.cached_logits()}
    if control:
        out["control"] = control_record(run.cfg, pop, shadows, original, n)
    return out


def control_record(cfg: Config, pop, shadows: ShadowSet, original: dict, n: int) -> dict:
    """control.json: per attack, the exchangeable control (`evaluate.exchangeable_control`, shadows 0..control-1
    playing the target) and, beside it, the AUC and TPR at 0.1% FPR on the original model (D against V)."""
    control = exchangeable_control(cfg.attack.attacks, pop, shadows, range(cfg.attack.control))
    member = pop.ids < n
    for name, result in control.items():
        result["target_auc"] = auc(original[name]["score"], member)
        result["target_tpr_at_0.1_fpr"] = tpr_at_fpr(original[name]["score"], member, 0.001)
    return {"shadows_as_target": cfg.attack.control, "attacks": control}


def forged_model_scorer(run: TrainingRun, states: list[dict], logits: dict) -> ForgedModelScorer:
    """The consumer each rebuild actor builds once: scores every forged model it rebuilds."""
    pop, n = worker_population(run)
    attacks = prepare_attacks(run.cfg, pop, shadow_set(run, pop, states, logits))
    return ForgedModelScorer(attacks, n, len(pop), run.cfg.attack, run.cfg.seed)


def _scores_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)


def _write_population(root: Path, cfg: Config, record: dict) -> None:
    schedule = shadow_train_config(cfg)
    atomic_write_json(root / "population.json", {
        **record, "flip": cfg.data.flip, "shadows": cfg.attack.shadows, "shadow_model": shadow_model_name(cfg),
        "shadow_train": {"epochs": schedule.epochs, "lr": schedule.lr, "batch_size": schedule.batch_size,
                         "momentum": schedule.momentum, "weight_decay": schedule.weight_decay},
        "common_per_point": cfg.attack.common, "validation_per_point": cfg.attack.validation})


def _write_original(out: Path, pop: Population, n: int, original: dict) -> None:
    write_parquet(out / "original.parquet", pa.table({
        "id": np.tile(pop.ids, len(original)),
        "attack": np.repeat(list(original), len(pop)),
        "score": np.concatenate([v["score"] for v in original.values()]),
        "pred": np.concatenate([v["pred"] for v in original.values()]).astype(bool),
        "member": np.tile(pop.ids < n, len(original)),
    }, schema=ORIGINAL_SCHEMA))


def _stored_shadows(directory: Path, pop: Population) -> tuple[list[dict], dict] | None:
    if not (directory / "shadows.json").is_file():
        return None
    saved = ShadowSet.load(directory, pop)
    return saved.states, saved.cached_logits()


def run_attack(run_dir: str | Path, strategy: str, actors: int | str, ray_cfg: RayConfig, wandb_cfg: WandbConfig,
               progress: bool = True, max_units: int | None = None, save_models: int = 0,
               groups_per_unit: int = 4) -> dict | None:
    """Shadows, attacks, original scores, then rebuild + scoring of every forged model (resumable)."""
    run = TrainingRun.open(run_dir)
    cfg = run.cfg
    pop, n, record = attack_population(run.load_dataset(), cfg)
    root = attack_root(run.run_dir)
    root.mkdir(exist_ok=True)
    _write_population(root, cfg, record)
    out = root / strategy
    (out / "score-units").mkdir(parents=True, exist_ok=True)
    with ray_session(ray_cfg) as ray:
        run_ref = ray.put(run.detach())
        stored = _stored_shadows(root / "shadows", pop)
        shadow_placement = []
        if stored is None:
            states, shadow_placement = train_shadows(run, run_ref, actors, ray_cfg, progress)
            stored = (states, {})
        states_ref = ray.put(stored[0])
        task = ray.remote(fit_and_score_original).options(**actor_options(ray_cfg, run.threads), max_retries=0)
        try:
            fitted = ray.get(task.remote(run_ref, states_ref, stored[1], ray.put(run.checkpoint(run.total_steps)),
                                         not (root / "control.json").is_file()))
        except ray.exceptions.RayTaskError as exc:
            raise unwrap(exc) from None
        if set(fitted["logits"]) != set(stored[1]):  # newly trained, or views the stored set lacked
            shadow_set(run, pop, stored[0], fitted["logits"]).save(root / "shadows")
        original = fitted["scores"]
        _write_original(out, pop, n, original)
        if "control" in fitted:
            atomic_write_json(root / "control.json", fitted["control"])

        def on_consumed(first: int, outputs: list) -> None:
            write_parquet(out / "score-units" / f"groups-{first:08d}.parquet",
                          _scores_table([row for rows in outputs for row in rows]))

        params = RebuildParams(strategy=strategy, groups_per_unit=groups_per_unit)
        summary = run_rebuild(run.run_dir, params, actors, ray_cfg, wandb_cfg, save_models=save_models,
                              progress=progress, max_units=max_units, consumer_factory=forged_model_scorer,
                              consumer_args=(run_ref, states_ref, ray.put(fitted["logits"])),
                              on_consumed=on_consumed, stage="attack")
    if summary is None:
        return None
    units = sorted((out / "score-units").glob("groups-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in units]).sort_by([("point", "ascending"),
                                                                        ("attack", "ascending")]).combine_chunks()
    write_parquet(out / "scores.parquet", table)
    summary.update({
        "evaluated_points": int(len(np.unique(table.column("point").to_numpy()))), "attacks": sorted(original),
        "placement": ([{**p, "role": "shadows"} for p in shadow_placement]
                      + [{**fitted["placement"], "units": 1, "role": "original"}]
                      + [{**p, "role": "rebuild"} for p in summary["placement"]])})
    atomic_write_json(out / "summary.json", summary)
    return summary
