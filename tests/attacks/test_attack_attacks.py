"""The five attacks on a deliberately overfit target: they separate members, and they are frozen after prepare."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from rayforge.attacks import ATTACKS, Attack, ShadowSet, build_attack
from rayforge.attacks.metrics import auc
from rayforge.errors import RayforgeError

VARIANTS = [
    ("lira", {}),
    ("lira", {"online": False}),
    ("lira", {"global_variance": True}),
    ("enhanced", {}),
    ("xent", {}),
    ("mentr", {}),
    ("mida", {}),
]


def _prepared(world, name, kw) -> Attack:
    attack = build_attack(name, **kw)
    attack.prepare(world.pop, world.shadows)
    return attack


def test_registry():
    assert set(ATTACKS) == {"lira", "enhanced", "xent", "mentr", "mida"}
    for name in ATTACKS:
        assert build_attack(name).name == name
    with pytest.raises(RayforgeError, match="unknown attack"):
        build_attack("nope")
    with pytest.raises(RayforgeError, match="bad options"):
        build_attack("xent", not_an_option=1)


@pytest.mark.parametrize("name,kw", VARIANTS)
def test_attack_separates_members_of_overfit_target(world, name, kw):
    attack = _prepared(world, name, kw)
    pts = world.pop.ids
    for target, members in ((world.target, world.members), (world.other_target, world.other_members)):
        scores = attack.score(target, pts)
        assert scores.shape == (len(pts),) and scores.dtype == np.float64 and np.all(np.isfinite(scores))
        assert auc(scores, members) > 0.6, (name, kw)
        pred = attack.predict(scores, pts)
        assert pred.dtype == bool and pred.shape == (len(pts),)
        assert 0 < pred.sum() < len(pts)  # thresholds land inside the score range


def _state_digest(attack: Attack) -> str:
    """A hash of everything the attack holds except the (shared, immutable) population."""
    h = hashlib.sha256()

    def feed(value):
        if isinstance(value, np.ndarray):
            h.update(str((value.dtype, value.shape)).encode())
            h.update(np.ascontiguousarray(value).tobytes())
        elif hasattr(value, "__dataclass_fields__"):
            for f in value.__dataclass_fields__:
                feed(getattr(value, f))
        else:
            h.update(repr(value).encode())

    for key in sorted(vars(attack)):
        if key != "pop":
            h.update(key.encode())
            feed(vars(attack)[key])
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_thresholds_never_see_the_model_under_test(world, name):
    pts = world.pop.ids
    a, b = _prepared(world, name, {}), _prepared(world, name, {})
    frozen = _state_digest(a)
    assert frozen == _state_digest(b)  # prepare depends on the shadows only: same shadows, same state
    # Score different targets first on each copy: an attack that (re)fitted lazily from the first model it scores
    # would now disagree between the copies, or change its state.
    a_first = a.score(world.target, pts)
    b.score(world.other_target, pts)
    assert _state_digest(a) == frozen and _state_digest(b) == frozen
    np.testing.assert_array_equal(b.score(world.target, pts), a_first)
    np.testing.assert_array_equal(a.predict(a_first, pts), b.predict(a_first, pts))
    # scoring is per point: a subset in another order gets the same scores
    sub = pts[::-3]
    np.testing.assert_allclose(a.score(world.target, sub), a_first[sub], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_prepare_uses_only_the_shadows(world, name):
    """Shadows built from the target-free shadow set only: replacing every shadow's logits changes the fitted state,
    while which target exists does not (a fresh prepare after scoring gives the same state)."""
    a = _prepared(world, name, {})
    a.score(world.target, world.pop.ids)
    again = _prepared(world, name, {})
    assert _state_digest(again) == _state_digest(a)
    sh = world.shadows
    swapped = ShadowSet(world.pop, sh.model_name, sh.in_mask, sh.states,
                        {f: sh.all_logits(f)[::-1].copy() for f in (False, True)})  # logits of other shadows
    c = build_attack(name)
    c.prepare(world.pop, swapped)
    assert _state_digest(c) != _state_digest(a)


def test_label_specific_thresholds_use_point_labels(world):
    attack = _prepared(world, "xent", {})
    assert attack.thresholds.shape == (10,)
    pts = world.pop.ids
    scores = attack.score(world.target, pts)
    expected = scores >= attack.thresholds[world.pop.labels]
    np.testing.assert_array_equal(attack.predict(scores, pts), expected)


def test_enhanced_predicts_at_fpr(world):
    attack = _prepared(world, "enhanced", {})
    scores = np.array([0.5, 0.89, 0.91, 1.0])
    np.testing.assert_array_equal(attack.predict(scores, np.arange(4)), [False, False, True, True])
    # on the OUT shadows themselves, the per-example test flags about 10% (fitted Gaussian, K/2 = 4 samples)
    from rayforge.attacks.signals import gaussian_cdf, logit_confidence
    v = np.mean([logit_confidence(world.shadows.all_logits(f), world.pop.labels[None]) for f in (False, True)], 0)
    flagged = gaussian_cdf(v, attack.mu, attack.sd) > 0.9
    rate = flagged[~world.shadows.in_mask].mean()
    assert 0.02 < rate < 0.3


def test_mida_chooses_a_reduction(world):
    attack = _prepared(world, "mida", {})
    assert attack.reduction in ("mean", "min", "max")
    fixed = _prepared(world, "mida", {"reduction": "max"})
    assert fixed.reduction == "max"
    with pytest.raises(RayforgeError):
        build_attack("mida", reduction="median")


def test_misuse_is_reported(world):
    attack = build_attack("lira")
    with pytest.raises(RayforgeError, match="prepare"):
        attack.score(world.target, world.pop.ids)
    attack.prepare(world.pop, world.shadows)
    with pytest.raises(RayforgeError):
        attack.score(world.target, np.array([0, len(world.pop)]))
    with pytest.raises(RayforgeError):
        attack.predict(np.zeros(3), np.arange(4))
    with pytest.raises(RayforgeError):
        attack.score(world.target, np.array([0.5]))
