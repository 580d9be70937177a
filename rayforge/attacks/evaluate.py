"""The paper's evaluation (Section IV-A) as plain functions: who is in the attack population, which points each
forged model is asked about (Diff, Common, Validation), scoring a model with every prepared attack, and the
exchangeable control.

Attack population (documented here, recorded in RUN/attack/population.json):
  ids 0..n-1      the run's training set D (the target's members; the PoRs are about these points)
  ids n..n+h-1    h held-out points V: non-members of the target and of every forged model (the paper's
                  "validation" points)
  no ids (aux)    p further non-members P: EnhancedMIA's population data (attack P's threshold), used nowhere else
Where V and P come from: one seeded uniform draw without replacement (V first, then P) from
  * the training split minus D, when `data.subset` leaves points out. D is itself a uniform draw from that split,
    so D, V and P are exchangeable: membership is the only thing that tells them apart;
  * else (D is the whole training split) the test split. A test split may differ from the training split in more
    than its labels (MNIST's test digits come from other writers), which attacks can mistake for membership; the
    exchangeable control below shows how much.
h = attack.holdout (default n), p = attack.population_data (default h; 0 when `enhanced` is not run); when the
pool holds fewer than h + p points, both shrink in proportion.
Class check: V's (and P's) class histogram against D's, by a chi-square test of homogeneity over the classes
present. A p-value below CLASS_CHECK_P is beyond sampling noise: refused when the points come from the test split
(the splits really differ), a one-line warning when they come from the training split (then only chance can do it).

Shadow models train on seeded random halves of D ∪ V (every point IN for exactly half of them: the LiRA setup);
thresholds are fitted on shadows only (`Attack.prepare`) and never on the original or a forged model. Evaluated
points come from D; their Common points from D minus the evaluated point's whole group (members of both models),
their Validation points from V, so nothing being evaluated was used to fit an attack against the model under test.

Exchangeable control: for each attack, shadow k plays the target -- the attack is prepared afresh on the other K-1
shadows and scores shadow k on every population point, with shadow k's own IN/OUT mask as the truth. Target and
"shadows" are then alike by construction, so the AUC says what the attack can do when the target is like its
shadows; beside the target's AUC it shows how much of that comes from membership rather than from a difference
between the target and the shadows (or between D and V).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn

from rayforge.attacks.base import Attack, Population, build_attack
from rayforge.attacks.metrics import auc, tpr_at_fpr
from rayforge.attacks.shadows import ShadowSet
from rayforge.attacks.views import ModelViews, ShadowViews
from rayforge.config import AttackConfig, Config
from rayforge.data import Dataset, ImageArrays, prepare_points, training_split
from rayforge.errors import RayforgeError

EVAL_STREAM = 0xE7A1
HELDOUT_STREAM = 0x4E1D
KINDS = ("diff", "common", "validation")
CLASS_CHECK_P = 1e-3


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def homogeneity_p(a: np.ndarray, b: np.ndarray) -> float:
    """p-value of the chi-square test that class counts `a` and `b` come from one distribution (classes seen in
    either; 1.0 when fewer than two are)."""
    table = np.stack([a, b]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 1.0
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    df = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def check_classes(what: str, labels: np.ndarray, member_labels: np.ndarray, source: str, num_classes: int) -> dict:
    """The class check of the module docstring; returns its record for population.json."""
    counts, members = class_counts(labels, num_classes), class_counts(member_labels, num_classes)
    p = homogeneity_p(members, counts)
    if p < CLASS_CHECK_P:
        message = (f"{what} ({len(labels)} points from the {source} split) has a class histogram unlike D's "
                   f"(chi-square p={p:.2g}): {counts.tolist()} vs {members.tolist()}")
        if source == "test":
            raise RayforgeError(f"{message}; set data.subset below the training split's size so it is drawn from "
                                f"the training split instead")
        warnings.warn(message, stacklevel=2)
    return {"class_counts": counts.tolist(), "chi2_p": p}


def _sizes(want_h: int, want_p: int, pool: int) -> tuple[int, int]:
    if want_h + want_p <= pool:
        return want_h, want_p
    h = min(want_h, max(1, want_h * pool // (want_h + want_p)))
    return h, min(want_p, pool - h)


def attack_population(ds: Dataset, cfg: Config) -> tuple[Population, int, dict]:
    """(population, n, record): D, then h held-out points V, plus the population data P (see the module docstring);
    the record (for population.json) says where V and P came from."""
    n = len(ds.train)
    if ds.subset_indices is not None and len(ds.subset_indices) > 0:
        full = training_split(cfg.data, cfg.seed)
        pool_idx, source = np.setdiff1d(np.arange(len(full)), ds.subset_indices), "train"
        if len(pool_idx) == 0:
            full, pool_idx, source = None, np.arange(len(ds.test)), "test"
    else:
        full, pool_idx, source = None, np.arange(len(ds.test)), "test"
    want_p = (cfg.attack.population_data or cfg.attack.holdout or n) if "enhanced" in cfg.attack.attacks else 0
    h, p = _sizes(cfg.attack.holdout or n, want_p, len(pool_idx))
    if h < 1 or (want_p and p < 1):
        raise RayforgeError(f"attack: the {source} split has {len(pool_idx)} points outside D, too few for the "
                            f"held-out points V and EnhancedMIA's population data")
    drawn = np.random.default_rng([cfg.seed, HELDOUT_STREAM]).permutation(pool_idx)
    v_idx, p_idx = np.sort(drawn[:h]), np.sort(drawn[h:h + p])

    def take(idx: np.ndarray) -> ImageArrays:
        return ds.test.take(idx) if full is None else prepare_points(cfg.data.dataset, full.take(idx))

    held, aux = take(v_idx), (take(p_idx) if p else None)
    num_classes = ds.num_classes
    record = {"members": [0, n], "heldout_points": [n, n + h],
              "members_class_counts": class_counts(ds.train.labels, num_classes).tolist(),
              "heldout": {"source": source, "indices": v_idx.tolist(),
                          **check_classes("V", held.labels, ds.train.labels, source, num_classes)},
              "population_data": None if aux is None else {
                  "source": source, "indices": p_idx.tolist(),
                  **check_classes("EnhancedMIA's population data", aux.labels, ds.train.labels, source,
                                  num_classes)}}
    images = ImageArrays(np.concatenate([ds.train.images, held.images]),
                         np.concatenate([ds.train.labels, held.labels]))
    return Population(images, ds.mean, ds.std, cfg.data.flip, num_classes=num_classes, aux=aux), n, record


def evaluation_queries(point: int, excluded: np.ndarray, n: int, n_population: int, cfg: AttackConfig,
                       seed: int) -> dict[str, np.ndarray]:
    """The population ids an evaluated point's forged model is asked about, per kind (seeded by the point)."""
    rng = np.random.default_rng([seed, EVAL_STREAM, point])
    common_pool = np.setdiff1d(np.arange(n), excluded)
    return {
        "diff": np.array([point], dtype=np.int64),
        "common": np.sort(rng.choice(common_pool, size=min(cfg.common, len(common_pool)), replace=False)),
        "validation": np.sort(rng.choice(np.arange(n, n_population), size=min(cfg.validation, n_population - n),
                                         replace=False)),
    }


def score_all(attacks: dict[str, Attack], model: nn.Module, points: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """{attack: {"score": float64 (P,), "pred": bool (P,)}} for `model` on population ids `points`; each view of
    the model is computed once for all attacks."""
    if not attacks:
        return {}
    views = ModelViews(model, next(iter(attacks.values()))._require_prepared(), points)
    out = {}
    for name, attack in attacks.items():
        scores = attack.score_views(views)
        out[name] = {"score": scores, "pred": attack.predict(scores, views.points)}
    return out


class ForgedModelScorer:
    """The phase-2 consumer: scores each forged model, as it is rebuilt, on its members' Diff/Common/Validation
    queries with every attack. Built once per rebuild actor from prepared (frozen) attacks."""

    def __init__(self, attacks: dict[str, Attack], n: int, n_population: int, cfg: AttackConfig, seed: int):
        self.attacks, self.n, self.n_population, self.cfg, self.seed = attacks, n, n_population, cfg, seed

    def __call__(self, group: int, members: np.ndarray, model: nn.Module) -> list[dict]:
        members = np.asarray(members, dtype=np.int64)
        asked = [evaluation_queries(int(p), members, self.n, self.n_population, self.cfg, self.seed) for p in members]
        ids = [np.concatenate([queries[k] for k in KINDS]) for queries in asked]
        every = np.unique(np.concatenate(ids))
        scored = score_all(self.attacks, model, every)  # one pass per view for the whole group
        rows = []
        for point, queries, z in zip(members, asked, ids):
            kinds = np.concatenate([[k] * len(queries[k]) for k in KINDS]).tolist()
            at = np.searchsorted(every, z)
            for name, result in scored.items():
                rows.append({"point": int(point), "group": int(group), "attack": name, "kind": kinds,
                             "z": z.tolist(), "score": result["score"][at].tolist(),
                             "pred": result["pred"][at].astype(bool).tolist()})
        return rows


def exchangeable_control(names: Sequence[str], pop: Population, shadows: ShadowSet,
                         targets: Sequence[int]) -> dict[str, dict]:
    """Per attack name: the AUC and TPR at 0.1% FPR when each shadow in `targets` plays the target (see the module
    docstring), their means, and why not when the attack cannot be prepared on K-1 shadows."""
    per: dict[str, dict] = {name: {"shadows": list(map(int, targets)), "auc_each": [], "tpr_at_0.1_fpr_each": []}
                            for name in names}
    for k in targets:
        others, views, truth = shadows.without(int(k)), ShadowViews(shadows, int(k)), shadows.in_mask[int(k)]
        for name in names:
            if "error" in per[name]:
                continue
            attack = build_attack(name)
            try:
                attack.prepare(pop, others)
            except RayforgeError as exc:
                per[name]["error"] = str(exc)
                continue
            scores = attack.score_views(views)
            per[name]["auc_each"].append(auc(scores, truth))
            per[name]["tpr_at_0.1_fpr_each"].append(tpr_at_fpr(scores, truth, 0.001))
    for result in per.values():
        done = "error" not in result and result["auc_each"]
        result["auc"] = float(np.mean(result["auc_each"])) if done else None
        result["tpr_at_0.1_fpr"] = float(np.mean(result["tpr_at_0.1_fpr_each"])) if done else None
    return per
