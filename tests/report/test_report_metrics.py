"""Report metrics against hand-computed values and independent computations."""

import math

import numpy as np
import pytest

from rayforge.report.metrics import (Z95, iid_uniformity, prediction_changes, uniformity_over, valid_por,
                                     wilson_interval)
from rayforge.report.render import tables_md


def test_uniformity_over_the_pors_dataset():
    # D' = {0, 1, 2} (point 3 excluded): counts 2, 1, 1 -> 0.5, 0.25, 0.25 against 1/3 each
    value = uniformity_over([np.array([0, 1]), np.array([0, 2])], 4, np.array([3]))
    assert value == pytest.approx(1 / 6 + 2 * (1 / 3 - 1 / 4))
    # an original log that uses every point equally often is exactly uniform
    assert uniformity_over([np.array([0, 1]), np.array([2, 3])], 4, np.array([], dtype=np.int64)) == 0.0


def _wilson_by_bisection(k, n, z=Z95):
    """The Wilson interval as its definition: the p with |k/n - p| <= z sqrt(p (1 - p) / n), ends by bisection."""
    inside = lambda p: abs(k / n - p) <= z * math.sqrt(p * (1 - p) / n)  # noqa: E731

    def edge(lo, hi):  # lo inside, hi outside (or the other way round)
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(mid) == inside(lo) else (lo, mid)
        return (lo + hi) / 2

    p = k / n
    low = 0.0 if k == 0 else edge(p, 0.0)
    high = 1.0 if k == n else edge(p, 1.0)
    return [100 * low, 100 * high]


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 500), (63, 10000), (250, 500), (499, 500), (7, 7)])
def test_wilson_interval_solves_its_definition(k, n):
    assert wilson_interval(k, n) == pytest.approx(_wilson_by_bisection(k, n), abs=1e-9)
    low, high = wilson_interval(k, n)
    assert 0 <= low <= 100 * k / n <= high <= 100


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx([0.0, 27.75], abs=0.01)  # the textbook 0/10 case
    assert wilson_interval(0, 500)[0] == 0.0 and wilson_interval(500, 500)[1] == 100.0
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_iid_uniformity_matches_the_papers_standard_sgd_and_a_simulation():
    # The paper's Table IV caption: standard SGD gives up to 0.177 at n=10K, b=100, tau=2K.
    ref = iid_uniformity(10_000, [100] * 2000)
    assert ref["with_replacement"] == pytest.approx(0.177, abs=0.001)
    assert ref["without_replacement"] == pytest.approx(0.177, abs=0.001)
    # A small setting where the two samplers differ, against a seeded simulation of each.
    n, sizes = 40, [30] * 20 + [10] * 5
    rng = np.random.default_rng(0)
    sims = {"with_replacement": [], "without_replacement": []}
    for _ in range(4000):
        sims["with_replacement"].append(uniformity_over([rng.integers(0, n, s) for s in sizes], n, np.array([], int)))
        sims["without_replacement"].append(
            uniformity_over([rng.choice(n, s, replace=False) for s in sizes], n, np.array([], int)))
    exact = iid_uniformity(n, sizes)
    for key, values in sims.items():
        assert exact[key] == pytest.approx(np.mean(values), rel=0.02)
    assert exact["without_replacement"] < exact["with_replacement"]


def _row(point, kinds, z, pred):
    return {"point": point, "kind": kinds, "z": z, "pred": pred}


def test_prediction_changes_and_valid_por():
    orig = {0: True, 1: True, 2: False, 3: True, 10: False, 11: False}
    kinds = ["diff", "common", "common", "validation", "validation"]
    rows = [_row(0, kinds, [0, 1, 3, 10, 11], [True, True, True, False, False]),   # nothing changes
            _row(1, kinds, [1, 0, 3, 10, 11], [False, True, True, False, False]),  # Diff changes
            _row(2, kinds, [2, 0, 1, 10, 11], [False, True, True, False, True])]   # a Validation point changes
    origin, forged = prediction_changes(rows, orig, "diff")
    assert origin.tolist() == [[True], [True], [False]] and forged.tolist() == [[True], [False], [False]]
    origin, forged = prediction_changes(rows, orig, "validation")
    assert np.any(origin != forged, axis=1).tolist() == [False, False, True]

    changed = {"lira": np.array([False, True, False]), "enhanced": np.array([False, False, False]),
               "xent": np.array([False, False, True])}
    out = valid_por(changed, np.array([0, 1, 2]))
    assert out["valid_por_percent"]["all"] == pytest.approx(100 / 3)
    assert out["valid_por_percent"]["lira_enhanced"] == pytest.approx(200 / 3)
    assert out["valid_por_attacks"] == {"all": ["enhanced", "lira", "xent"], "lira_enhanced": ["lira", "enhanced"]}
    assert out["valid_por_ci"]["all"] == pytest.approx(wilson_interval(1, 3))
    none = valid_por({"xent": np.array([True])}, np.array([0]))
    assert none["valid_por_percent"] == {"all": 0.0, "lira_enhanced": None}


def _strategy_metrics(strategy, c_diff):
    attack = {"auc": 0.7, "tpr_at_0.1_fpr": 0.01, "s_median": 0.1,
              **{f"c_{k}": c_diff for k in ("diff", "common", "validation")},
              **{f"c_{k}_ci": [0.0, c_diff + 1] for k in ("diff", "common", "validation")}}
    return {"attacks": {"lira": dict(attack), "mida": dict(attack)},
            "valid_por_percent": {"all": 90.0, "lira_enhanced": 95.0},
            "valid_por_ci": {"all": [85.0, 93.0], "lira_enhanced": [91.0, 97.0]},
            "valid_por_attacks": {"all": ["lira", "mida"], "lira_enhanced": ["lira"]},
            "d_theta": {"mean": 2e-6, "median": 1e-6, "p90": 3e-6},
            "uniformity_l1": {"mean": 0.02, "stderr": 0.001, "pors": 100, "original": 0.0,
                              "iid_with_replacement": 0.126, "iid_without_replacement": 0.119},
            "setting": {"dataset": "cifar10", "model": "lenet5", "n": 500, "tau": 400, "lam": 1, "kappa": 2,
                        "mu": 16, "strategy": strategy, "evaluated_points": 500, "modified_sgd": False}}


def test_tables_put_strategies_side_by_side():
    main = _strategy_metrics("paper", 5.0)
    metrics = {**main, "strategies": {"paper": main, "swap": _strategy_metrics("swap", 1.5)}}
    metrics["attacks"]["lira"]["control_auc"] = 0.61
    text = tables_md(metrics)
    assert "| Attack | paper | swap |" in text
    assert "| LiRA | 5.00% [0.00, 6.00] | 1.50% [0.00, 2.50] |" in text
    assert "| LiRA | 0.7000 | 0.6100 | 0.0100 |" in text and "| MIDA | 0.7000 | – | 0.0100 |" in text
    assert "0.1260 (0.1190)" in text and "90.00% [85.00, 93.00]" in text


def test_control_aucs_read_from_the_attack_stage(tmp_path):
    import json

    from rayforge.errors import MalformedArtifact
    from rayforge.report.metrics import control_aucs

    assert control_aucs(tmp_path) == {}  # not written (older runs): nothing shown
    (tmp_path / "control.json").write_text(json.dumps({"shadows_as_target": 4, "attacks": {
        "lira": {"auc": 0.61, "target_auc": 0.7}, "mida": {"auc": None, "error": "too few shadows"}}}))
    assert control_aucs(tmp_path) == {"lira": 0.61}
    (tmp_path / "control.json").write_text("[1, 2]")
    with pytest.raises(MalformedArtifact):
        control_aucs(tmp_path)
