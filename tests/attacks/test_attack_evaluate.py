"""The evaluation around the attacks: where V and the population data come from (seeded, outside D, class-checked),
group scoring of forged models, and the exchangeable control."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rayforge.attacks import ModelViews, build_attack
from rayforge.attacks.evaluate import (ForgedModelScorer, attack_population, check_classes, evaluation_queries,
                                       exchangeable_control, homogeneity_p, score_all)
from rayforge.attacks.metrics import auc
from rayforge.config import config_from_dict
from rayforge.data import Dataset, ImageArrays, build_dataset, training_split
from rayforge.errors import RayforgeError


def _cfg(subset=60, attacks=None, train=200, test=50, seed=0, **attack):
    raw = {"seed": seed, "data": {"dataset": "synthetic", "synthetic_train": train, "synthetic_test": test,
                                  "synthetic_shape": [1, 8, 8], "subset": subset, "flip": True},
           "model": {"name": "logreg"}, "attack": {"shadows": 4, **attack}}
    if attacks is not None:
        raw["attack"]["attacks"] = attacks
    return config_from_dict(raw)


def test_v_and_population_data_are_seeded_draws_from_the_training_split_outside_d():
    cfg = _cfg()
    ds = build_dataset(cfg.data, cfg.seed)
    pop, n, record = attack_population(ds, cfg)
    v, p = np.array(record["heldout"]["indices"]), np.array(record["population_data"]["indices"])
    assert n == 60 and record["heldout"]["source"] == record["population_data"]["source"] == "train"
    assert len(v) == 60 and len(p) == 60 and len(pop) == 120 and record["heldout_points"] == [60, 120]
    d = set(ds.subset_indices.tolist())
    assert not d & set(v) and not d & set(p) and not set(v) & set(p)  # D, V, P pairwise disjoint
    full = training_split(cfg.data, cfg.seed)
    np.testing.assert_array_equal(pop.images.images[:n], ds.train.images)
    np.testing.assert_array_equal(pop.images.images[n:], full.images[v])
    np.testing.assert_array_equal(pop.labels[n:], full.labels[v])
    np.testing.assert_array_equal(pop.aux.images, full.images[p])
    assert record["heldout"]["class_counts"] == np.bincount(full.labels[v], minlength=10).tolist()
    assert record["heldout"]["chi2_p"] > 1e-3
    again = attack_population(ds, cfg)[2]
    assert again == record  # seeded
    other = _cfg(seed=1)
    assert attack_population(build_dataset(other.data, 1), other)[2]["heldout"]["indices"] != v.tolist()


def test_pool_too_small_shrinks_v_and_p_in_proportion():
    cfg = _cfg(subset=180)  # 20 points outside D for the 60 + 60 asked
    pop, n, record = attack_population(build_dataset(cfg.data, cfg.seed), cfg)
    assert len(record["heldout"]["indices"]) == 10 and len(record["population_data"]["indices"]) == 10
    cfg = _cfg(subset=180, attacks=["lira", "xent"])  # no EnhancedMIA: no population data, V takes the pool
    pop, n, record = attack_population(build_dataset(cfg.data, cfg.seed), cfg)
    assert pop.aux is None and record["population_data"] is None and len(pop) - n == 20


def _class_sorted(labels_per_class: int, classes=range(10)) -> ImageArrays:
    """A split ordered by class, as the CIFAR-10 image-folder loader returns it."""
    labels = np.repeat(np.array(list(classes), dtype=np.int64), labels_per_class)
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 1, 4, 4), dtype=np.uint8)
    return ImageArrays(images, labels)


def test_v_from_a_class_sorted_test_split_spans_the_classes():
    """Without a subset, V comes from the test split: a random draw, never its first h (one class) points."""
    train = ImageArrays(*(lambda a: (a.images, np.random.default_rng(1).permutation(a.labels)))(_class_sorted(10)))
    ds = Dataset("synthetic", train, _class_sorted(30), None, (0.5,), (0.25,))
    cfg = _cfg(subset=None, attacks=["lira"])
    pop, n, record = attack_population(ds, cfg)
    assert record["heldout"]["source"] == "test" and n == 100
    held = pop.labels[n:]
    assert len(np.unique(held)) == 10 and np.bincount(held).max() < 25  # the first 100 would be classes 0-3
    assert record["heldout"]["chi2_p"] > 1e-3


def test_a_test_split_of_other_classes_is_refused():
    ds = Dataset("synthetic", _class_sorted(10), _class_sorted(30, classes=range(5)), None, (0.5,), (0.25,))
    with pytest.raises(RayforgeError, match="class histogram unlike D's.*data.subset"):
        attack_population(ds, _cfg(subset=None, attacks=["lira"]))


def test_class_check_warns_for_the_training_split_and_passes_alike_histograms():
    members = np.repeat(np.arange(10), 20)
    with pytest.warns(UserWarning, match="class histogram unlike D's"):
        check_classes("V", np.zeros(50, dtype=np.int64), members, "train", 10)
    record = check_classes("V", np.repeat(np.arange(10), 5), members, "test", 10)
    assert record == {"class_counts": [5] * 10, "chi2_p": 1.0}


def test_homogeneity_p_by_hand():
    # 2x2 table [[10, 0], [0, 10]]: chi2 = 20 with 1 degree of freedom, p = erfc(sqrt(10))
    assert homogeneity_p(np.array([10, 0]), np.array([0, 10])) == pytest.approx(math.erfc(math.sqrt(10)))
    assert homogeneity_p(np.array([4, 6, 0]), np.array([2, 3, 0])) == pytest.approx(1.0)
    # [[3, 1], [1, 3]]: expected 2 everywhere, chi2 = 4 * 1/2 = 2, p = erfc(1)
    assert homogeneity_p(np.array([3, 1]), np.array([1, 3])) == pytest.approx(math.erfc(1.0))


def test_mnist_held_out_points_are_padded_like_the_run(tmp_path):
    import struct

    rng = np.random.default_rng(0)
    for prefix, size in (("train", 40), ("t10k", 10)):
        images, labels = rng.integers(0, 256, (size, 28, 28), dtype=np.uint8), np.arange(size, dtype=np.uint8) % 10
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            header = struct.pack(f">I{arr.ndim}I", 0x0800 | arr.ndim, *arr.shape)
            (tmp_path / f"{prefix}-{kind}-ubyte").write_bytes(header + arr.tobytes())
    cfg = config_from_dict({"data": {"dataset": "mnist", "data_root": str(tmp_path), "subset": 20},
                            "attack": {"shadows": 4, "attacks": ["lira"]}})
    ds = build_dataset(cfg.data, cfg.seed)
    pop, n, record = attack_population(ds, cfg)
    assert record["heldout"]["source"] == "train" and pop.in_shape == (1, 32, 32) and len(pop) == 40
    v = record["heldout"]["indices"]
    full = training_split(cfg.data, cfg.seed)
    np.testing.assert_array_equal(pop.images.images[n:, :, 2:30, 2:30], full.images[v])


# ---- scoring forged models, and the exchangeable control --------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(world):
    attacks = {}
    for name, kw in (("lira", {}), ("enhanced", {}), ("enhanced_ref", {}), ("xent", {}), ("mentr", {}),
                     ("mida", {"shift": 0})):
        attacks[name] = build_attack(name, **kw)
        attacks[name].prepare(world.pop, world.shadows)
    return attacks


def test_a_group_is_scored_in_one_pass_with_per_point_results(world, prepared):
    cfg = _cfg().attack
    n = 40  # ids 0..39 play D, 40..59 V
    members = np.array([3, 17, 25])
    rows = ForgedModelScorer(prepared, n, len(world.pop), cfg, seed=5)(7, members, world.target)
    assert len(rows) == len(members) * len(prepared)
    for row in rows:
        q = evaluation_queries(row["point"], members, n, len(world.pop), cfg, 5)
        z = np.concatenate([q["diff"], q["common"], q["validation"]])
        assert row["z"] == z.tolist() and row["group"] == 7
        assert not set(q["common"]) & set(members) and all(v >= n for v in q["validation"])
        alone = score_all({row["attack"]: prepared[row["attack"]]}, world.target, z)[row["attack"]]
        np.testing.assert_allclose(row["score"], alone["score"], rtol=0, atol=1e-9)
        assert row["pred"] == alone["pred"].tolist()


def test_exchangeable_control_scores_a_held_out_shadow(world):
    names = ["lira", "enhanced", "enhanced_ref", "xent", "mentr", "mida"]
    result = exchangeable_control(names, world.pop, world.shadows, targets=[0, 3])
    sh = world.shadows
    for name in names:
        r = result[name]
        assert r["shadows"] == [0, 3] and len(r["auc_each"]) == 2 and "error" not in r
        assert r["auc"] == pytest.approx(np.mean(r["auc_each"]))
        # the same number by hand: prepared on the other shadows, shadow 3 run as a model, its own mask as truth
        attack = build_attack(name)
        attack.prepare(world.pop, sh.without(3))
        scores = attack.score_views(ModelViews(sh.model(3), world.pop, world.pop.ids))
        assert r["auc_each"][1] == pytest.approx(auc(scores, sh.in_mask[3]), abs=1e-12)
    assert result["lira"]["auc"] > 0.6  # these shadows overfit: a working attack separates a held-out one


def test_exchangeable_control_reports_why_an_attack_cannot_run(world):
    two = world.shadows.without(0).without(0).without(0).without(0).without(0).without(0)
    result = exchangeable_control(["enhanced_ref", "lira"], world.pop, two, targets=[0])
    assert result["enhanced_ref"]["auc"] is None and "OUT shadow" in result["enhanced_ref"]["error"]
    assert result["lira"]["auc"] is None and "shadows" in result["lira"]["error"]
