"""One tiny attack world per session: a synthetic population, 8 logreg shadows, and two deliberately overfit
targets (30 members of 60 points each, 60 epochs at lr 0.5), trained in about two seconds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from rayforge.attacks import Population, ShadowSet, train_shadow
from rayforge.config import DataConfig, TrainConfig
from rayforge.data import build_dataset

N_POINTS = 60
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
        ds = build_dataset(DataConfig(dataset="synthetic", synthetic_train=N_POINTS, synthetic_test=10,
                                      synthetic_shape=[1, 8, 8]), seed=0)
        pop = Population(ds.train, ds.mean, ds.std, flip=True)
        shadows = ShadowSet.train(pop, K_SHADOWS, "logreg", TRAIN, seed=1)
        target, members = _target(pop, 5)
        other, other_members = _target(pop, 6)
    finally:
        torch.set_num_threads(threads)
    return World(pop, shadows, target, members, other, other_members)
