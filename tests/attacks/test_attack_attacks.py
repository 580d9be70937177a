"""The attacks on a deliberately overfit target: they separate members, and they are frozen after prepare."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from rayforge.attacks import ATTACKS, Attack, ShadowSet, Xent, build_attack
from rayforge.attacks.metrics import auc
from rayforge.attacks.thresholds import per_label_thresholds
from rayforge.config import ATTACK_NAMES
from rayforge.errors import RayforgeError

VARIANTS = [
    ("lira", {}),
    ("lira", {"online": False}),
    ("lira", {"global_variance": True}),
    ("enhanced", {}),
    ("enhanced_ref", {}),
    ("xent", {}),
    ("mentr", {}),
    ("mida", {"shift": 0}),  # on these 8x8 images a one-pixel shift is a different picture: copies without it
]


def _prepared(world, name, kw) -> Attack:
    attack = build_attack(name, **kw)
    attack.prepare(world.pop, world.shadows)
    return attack


def test_registry():
    assert set(ATTACKS) == set(ATTACK_NAMES) == {"lira", "enhanced", "enhanced_ref", "mentr", "xent", "mida"}
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


def _frozen_violations(world, make) -> list[str]:
    """What goes wrong when two identically prepared copies of an attack score different targets first.

    An attack that (re)fitted anything from a model it scores -- lazily on the first call, or on every call -- would
    change its state or make the copies disagree afterwards; an honest attack shows neither.
    """
    pts = world.pop.ids
    a, b = make(), make()
    a.prepare(world.pop, world.shadows)
    b.prepare(world.pop, world.shadows)
    problems = []
    frozen = _state_digest(a)
    if frozen != _state_digest(b):
        problems.append("prepare is not a function of the shadows")
    a_first = a.score(world.target, pts)
    b.score(world.other_target, pts)
    if _state_digest(a) != frozen or _state_digest(b) != frozen:
        problems.append("score changed the attack state")
    if not np.array_equal(b.score(world.target, pts), a_first):
        problems.append("scores depend on which model was scored before")
    if not np.array_equal(a.predict(a_first, pts), b.predict(a_first, pts)):
        problems.append("predictions depend on which model was scored before")
    return problems


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_thresholds_never_see_the_model_under_test(world, name):
    assert _frozen_violations(world, lambda: build_attack(name)) == []
    # scoring is per point: a subset in another order gets the same scores
    attack = _prepared(world, name, {})
    pts = world.pop.ids
    sub = pts[::-3]
    np.testing.assert_allclose(attack.score(world.target, sub), attack.score(world.target, pts)[sub],
                               rtol=1e-12, atol=1e-12)


class _LeakyXent(Xent):
    """A wrong attack that refits its thresholds from the scores of each model it is asked about (labelling a fixed
    half of the points as members): the check above must catch it."""

    def score(self, model, points):
        scores = super().score(model, points)
        self.thresholds, self.global_threshold = per_label_thresholds(scores, np.arange(len(scores)) % 2 == 0,
                                                                      self.pop.labels[points], 10)
        return scores


def test_the_frozen_check_catches_an_attack_that_fits_on_the_target(world):
    assert "score changed the attack state" in _frozen_violations(world, _LeakyXent)


@pytest.mark.parametrize("name", sorted(set(ATTACKS) - {"enhanced"}))
def test_prepare_uses_only_the_shadows(world, name):
    """The fitted state is a function of the shadows alone: a fresh prepare after scoring a target reproduces it
    exactly, while handing the same points other shadows (rows permuted against the in_mask) changes it."""
    a = _prepared(world, name, {})
    a.score(world.target, world.pop.ids)
    again = _prepared(world, name, {})
    assert _state_digest(again) == _state_digest(a)
    sh = world.shadows
    swapped = ShadowSet(world.pop, sh.model_name, sh.in_mask, sh.states[::-1])  # each row now another shadow's
    c = build_attack(name)
    c.prepare(world.pop, swapped)
    assert _state_digest(c) != _state_digest(a)


def test_attack_p_holds_no_fitted_state(world):
    """Attack P uses no shadow: prepare only binds the population, which must carry population data."""
    a = _prepared(world, "enhanced", {})
    assert {k for k in vars(a) if k != "pop"} == {"fpr"}
    from rayforge.attacks import Population

    bare = Population(world.pop.images, world.pop.mean, world.pop.std, world.pop.flip)
    with pytest.raises(RayforgeError, match="population data"):
        build_attack("enhanced").prepare(bare, ShadowSet(bare, "logreg", world.shadows.in_mask, world.shadows.states))


def test_label_specific_thresholds_use_point_labels(world):
    attack = _prepared(world, "xent", {})
    assert attack.thresholds.shape == (10,)
    pts = world.pop.ids
    scores = attack.score(world.target, pts)
    expected = scores >= attack.thresholds[world.pop.labels]
    np.testing.assert_array_equal(attack.predict(scores, pts), expected)


def test_enhanced_ref_predicts_at_fpr(world):
    attack = _prepared(world, "enhanced_ref", {})
    scores = np.array([0.5, 0.89, 0.91, 1.0])
    np.testing.assert_array_equal(attack.predict(scores, np.arange(4)), [False, False, True, True])
    # on the OUT shadows themselves, the per-example test flags about 10% (fitted Gaussian, K/2 = 4 samples)
    from rayforge.attacks import MIRROR, PLAIN
    from rayforge.attacks.signals import gaussian_cdf, logit_confidence
    v = np.mean([logit_confidence(world.shadows.all_logits(q), world.pop.labels[None]) for q in (PLAIN, MIRROR)], 0)
    flagged = gaussian_cdf(v, attack.mu, attack.sd) > 0.9
    rate = flagged[~world.shadows.in_mask].mean()
    assert 0.02 < rate < 0.3


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
