"""Eq. (5) and (6): equal disjoint parts at every step, each group inside one part, re-derivable from the seed."""

import numpy as np
import pytest

from rayforge.errors import RayforgeError
from rayforge.forge.splits import Splits, check_split_params


@pytest.mark.parametrize("n,lam,kappa", [(60, 1, 2), (60, 3, 5), (100, 10, 5), (40, 4, 10)])
def test_eq5_and_eq6_hold_at_every_step(n, lam, kappa):
    splits = Splits(n, lam, kappa, seed=7)
    assert sorted(splits.groups.ravel().tolist()) == list(range(n))  # groups partition D
    for step in range(30):
        parts = splits.point_parts(step)
        sizes = np.bincount(parts, minlength=kappa)
        assert np.all(sizes == n // kappa)  # eq. 5: equal sizes, disjoint by construction (one part per point)
        for members in splits.groups:  # eq. 6: every group inside one part
            assert len(set(parts[members].tolist())) == 1


def test_splits_are_rederived_exactly_and_vary_by_step():
    a, b = Splits(60, 2, 3, seed=1), Splits(60, 2, 3, seed=1)
    assert np.array_equal(a.groups, b.groups)
    assert all(np.array_equal(a.point_parts(t), b.point_parts(t)) for t in range(10))
    assert not np.array_equal(a.point_parts(0), a.point_parts(1))
    assert not np.array_equal(a.groups, Splits(60, 2, 3, seed=2).groups)


def test_bad_split_parameters():
    with pytest.raises(RayforgeError, match="must divide"):
        check_split_params(10, 3, 2)
    with pytest.raises(RayforgeError, match="kappa"):
        check_split_params(10, 5, 3)
