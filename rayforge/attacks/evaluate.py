"""The paper's evaluation (Section IV-A) as plain functions: who is in the attack population, which points each
forged model is asked about (Diff, Common, Validation), and scoring a model with every prepared attack.

Attack population (documented here, recorded in RUN/attack/population.json):
  ids 0..n-1      the run's training set D (the target's members; the PoRs are about these points)
  ids n..n+h-1    h held-out points V from the dataset's test split (non-members of the target and of every forged
                  model; the paper's "validation" points). h = `attack.holdout`, default n, capped by the test split.
Shadow models train on seeded random halves of D ∪ V (every point IN for exactly half of them: the LiRA setup);
thresholds are fitted on shadows only (`Attack.prepare`) and never on the original or a forged model. Evaluated
points come from D; their Common points from D minus the evaluated point's whole group (members of both models),
their Validation points from V, so nothing being evaluated was used to fit an attack against the model under test.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from rayforge.attacks.base import Attack, Population
from rayforge.config import AttackConfig
from rayforge.data import Dataset, ImageArrays

EVAL_STREAM = 0xE7A1
KINDS = ("diff", "common", "validation")


def attack_population(ds: Dataset, flip: bool, holdout: int | None) -> tuple[Population, int]:
    """(population, n): the run's training points followed by h held-out test points."""
    n = len(ds.train)
    h = min(holdout or n, len(ds.test))
    images = ImageArrays(np.concatenate([ds.train.images, ds.test.images[:h]]),
                         np.concatenate([ds.train.labels, ds.test.labels[:h]]))
    return Population(images, ds.mean, ds.std, flip), n


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
    """{attack: {"score": float64 (P,), "pred": bool (P,)}} for `model` on population ids `points`."""
    out = {}
    for name, attack in attacks.items():
        scores = attack.score(model, points)
        out[name] = {"score": scores, "pred": attack.predict(scores, points)}
    return out


class ForgedModelScorer:
    """The phase-2 consumer: scores each forged model, as it is rebuilt, on its members' Diff/Common/Validation
    queries with every attack. Built once per rebuild actor from prepared (frozen) attacks."""

    def __init__(self, attacks: dict[str, Attack], n: int, n_population: int, cfg: AttackConfig, seed: int):
        self.attacks, self.n, self.n_population, self.cfg, self.seed = attacks, n, n_population, cfg, seed

    def __call__(self, group: int, members: np.ndarray, model: nn.Module) -> list[dict]:
        rows = []
        members = np.asarray(members, dtype=np.int64)
        for point in members:
            queries = evaluation_queries(int(point), members, self.n, self.n_population, self.cfg, self.seed)
            ids = np.concatenate([queries[k] for k in KINDS])
            kinds = np.concatenate([[k] * len(queries[k]) for k in KINDS])
            scored = score_all(self.attacks, model, ids)
            for name, result in scored.items():
                rows.append({"point": int(point), "group": int(group), "attack": name, "kind": kinds.tolist(),
                             "z": ids.tolist(), "score": result["score"].tolist(),
                             "pred": result["pred"].astype(bool).tolist()})
        return rows
