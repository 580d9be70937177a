"""One tiny attack world per session: a synthetic population (60 points with ids, 30 auxiliary non-members), 8 logreg
shadows, and two deliberately overfit targets (30 members of 60 points each, 60 epochs at lr 0.5), trained in about
two seconds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from rayforge.attacks import Population, ShadowSet, balanced_in_mask, train_shadow
from rayforge.attacks.shadows import shadow_seed
from rayforge.config import DataConfig, TrainConfig
from rayforge.data import build_dataset
from rayforge.train.log import state_tensors

N_POINTS = 60
N_AUX = 30
K_SHADOWS = 8
TRAIN = TrainConfig(epochs=60, batch_size=10, lr=0.5)


@dataclass
class World:
    pop: Population
    shadows: ShadowSet
    target: nn.Module  # trained on `members`
    members: np.ndarray  # bool (N,)
    other_target: nn.Module  # trained on a different half
    other_members: np.ndarray


def train_shadows(pop: Population, k: int, model_name: str, train_cfg: TrainConfig, seed: int) -> ShadowSet:
    """K shadows trained in-process exactly as the attack stage's actors train them."""
    in_mask = balanced_in_mask(k, len(pop), seed)
    states = [state_tensors(train_shadow(pop, np.flatnonzero(in_mask[j]), model_name, train_cfg,
                                         shadow_seed(seed, j)), None) for j in range(k)]
    return ShadowSet(pop, model_name, in_mask, states)


def _target(pop: Population, seed: int) -> tuple[nn.Module, np.ndarray]:
    ids = np.sort(np.random.default_rng(seed).permutation(len(pop))[: len(pop) // 2])
    members = np.zeros(len(pop), dtype=bool)
    members[ids] = True
    return train_shadow(pop, ids, "logreg", TRAIN, seed=1000 + seed), members


@pytest.fixture(scope="session")
def world() -> World:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves the other core to pytest's peers
    try:
        ds = build_dataset(DataConfig(dataset="synthetic", synthetic_train=N_POINTS, synthetic_test=N_AUX,
                                      synthetic_shape=[1, 8, 8]), seed=0)
        pop = Population(ds.train, ds.mean, ds.std, flip=True, aux=ds.test)
        shadows = train_shadows(pop, K_SHADOWS, "logreg", TRAIN, seed=1)
        target, members = _target(pop, 5)
        other, other_members = _target(pop, 6)
    finally:
        torch.set_num_threads(threads)
    return World(pop, shadows, target, members, other, other_members)
