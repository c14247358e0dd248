"""evaluation.calibration and evaluation.selective: ECE by hand, Brier, temperature scaling,
and a confidence threshold that only val can move."""

from __future__ import annotations

import numpy as np
import pytest

from featsvm.evaluation import calibration as cal
from featsvm.evaluation import selective as sel
from featsvm.evaluation.trust import run_blocks
from featsvm.labels import LABELS


def test_ece_against_a_hand_computed_case() -> None:
    proba = np.array([
        [0.90, 0.05, 0.03, 0.02],  # true benign: right, confidence 0.90 -> bin 14 (13/15, 14/15]
        [0.90, 0.04, 0.04, 0.02],  # true pre_b: wrong, confidence 0.90 -> bin 14
        [0.62, 0.18, 0.10, 0.10],  # true benign: right, confidence 0.62 -> bin 10 (9/15, 10/15]
    ])
    t = np.array([0, 2, 0])
    conf, right = cal.confidence(proba), cal.correct(proba, t)
    assert right.tolist() == [True, False, True]
    # bin 14: 2 images, accuracy 0.5, confidence 0.9 -> |0.5 - 0.9| = 0.4, weight 2/3
    # bin 10: 1 image, accuracy 1.0, confidence 0.62 -> 0.38, weight 1/3
    assert cal.ece(conf, right) == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.38)
    bins = cal.reliability_bins(conf, right)
    assert len(bins) == 15
    assert bins[13]["count"] == 2 and bins[13]["accuracy"] == 0.5
    assert bins[9]["count"] == 1 and bins[9]["confidence"] == pytest.approx(0.62)
    assert sum(b["count"] for b in bins) == 3 and bins[0]["accuracy"] is None
    # Brier: squared distance to the one-hot label, averaged
    want = np.mean([(0.9 - 1) ** 2 + 0.05**2 + 0.03**2 + 0.02**2,
                    0.9**2 + 0.04**2 + (0.04 - 1) ** 2 + 0.02**2,
                    (0.62 - 1) ** 2 + 0.18**2 + 0.1**2 + 0.1**2])
    assert cal.brier(proba, t) == pytest.approx(want)
    # perfectly calibrated: confidence 0.75, right 3 of 4 times
    p = np.tile([0.75, 0.25 / 3, 0.25 / 3, 0.25 / 3], (4, 1))
    assert cal.ece(cal.confidence(p), np.array([1, 1, 1, 0], bool)) == pytest.approx(0.0)


def test_bins_are_right_closed_and_weights_give_one_value_per_resample() -> None:
    assert cal.bin_index(np.array([0.0, 1 / 15, 1 / 15 + 1e-9, 0.5, 1.0])).tolist() == \
        [0, 0, 1, 7, 14]
    conf = np.array([0.9, 0.9, 0.62])
    right = np.array([True, False, True])
    w = np.array([[1, 1, 1], [2, 0, 1], [0, 0, 3]], float)
    vals = cal.ece(conf, right, weights=w)
    assert vals[0] == pytest.approx(cal.ece(conf, right))
    assert vals[1] == pytest.approx((2 * 0.1 + 0.38) / 3)  # 2 right at 0.9, 1 right at 0.62
    assert vals[2] == pytest.approx(0.38)


def test_temperature_recovers_the_true_one_and_keeps_the_arg_max() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (4000, 4))
    p_true = cal.softmax(z / 2.5)
    y = np.array([rng.choice(4, p=row) for row in p_true])
    t = cal.fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.1)
    over = cal.softmax(z)  # over-confident by a factor 2.5
    fixed = cal.apply_temperature(over, t)
    assert (fixed.argmax(1) == over.argmax(1)).all()
    np.testing.assert_allclose(fixed.sum(1), 1.0)
    before = cal.ece(cal.confidence(over), cal.correct(over, y))
    after = cal.ece(cal.confidence(fixed), cal.correct(fixed, y))
    assert after < before / 3
    assert cal.brier(fixed, y) < cal.brier(over, y)
    # probabilities as input: log p stands in for the logits
    assert cal.fit_temperature(cal.log_proba(over), y) == pytest.approx(t, rel=1e-4)
    np.testing.assert_allclose(cal.apply_temperature(over, 1.0), over, atol=1e-12)


def test_threshold_meets_the_target_on_val_with_the_largest_coverage() -> None:
    conf = np.array([0.99, 0.98, 0.97, 0.96, 0.90, 0.80, 0.70, 0.60])
    right = np.array([1, 1, 1, 1, 0, 1, 0, 1], bool)
    c = sel.choose_threshold(conf, right, target_error=0.0)
    assert c["threshold"] == 0.96 and c["feasible"] and c["val_coverage"] == 0.5
    c = sel.choose_threshold(conf, right, target_error=0.2)  # 1 error in 6 at 0.80
    assert c["threshold"] == 0.80 and c["val_risk"] == pytest.approx(1 / 6)
    c = sel.choose_threshold(conf, right, target_error=0.5)
    assert c["threshold"] == 0.60 and c["val_coverage"] == 1.0
    none = sel.choose_threshold(np.array([0.9, 0.8]), np.array([False, True]), 0.01)
    assert not none["feasible"] and none["threshold"] > 0.9
    assert sel.abstain_mask(np.array([0.9, 0.8]), none["threshold"]).all()
    # ties: the tied images are accepted or abstained on together
    tied = sel.choose_threshold(np.array([0.9, 0.9, 0.8]), np.array([True, False, True]), 0.0)
    assert not tied["feasible"]
    curve = sel.coverage_risk_curve(conf, right)
    assert curve["coverage"][-1] == 1.0 and curve["risk"][-1] == pytest.approx(2 / 8)
    at = sel.selective_at(conf, right, 0.80, weights=np.ones((5, 8)))
    assert at["coverage"] == 0.75 and at["risk"] == pytest.approx(1 / 6)
    assert at["ci95"]["coverage"] == [0.75, 0.75]


def _blocks(val_proba: np.ndarray, test_proba: np.ndarray, val_y: list[str],
            test_y: list[str]) -> tuple[dict, dict, dict]:
    return run_blocks(
        (val_y, None, val_proba, list(range(len(val_y)))),
        (test_y, None, test_proba, list(range(len(test_y)))),
        temperature=None, method="none", target_error=0.05, n_boot=50, seed=0)


def test_threshold_is_chosen_on_val_only() -> None:
    """Changing every test prediction and label leaves the threshold where val put it."""
    rng = np.random.default_rng(1)
    val_p = cal.softmax(rng.normal(0, 2, (60, 4)))
    val_y = [LABELS[i] if rng.random() < 0.8 else LABELS[(i + 1) % 4]
             for i in val_p.argmax(1)]
    test_a = cal.softmax(rng.normal(0, 2, (40, 4)))
    test_b = cal.softmax(rng.normal(0, 5, (40, 4)))
    ya = [LABELS[i] for i in rng.integers(0, 4, 40)]
    yb = [LABELS[i] for i in rng.integers(0, 4, 40)]
    _, sel_a, abst_a = _blocks(val_p, test_a, val_y, ya)
    _, sel_b, abst_b = _blocks(val_p, test_b, val_y, yb)
    assert abst_a == abst_b and sel_a["threshold"] == sel_b["threshold"]
    assert sel_a["val"] == sel_b["val"]
    assert sel_a["test"] != sel_b["test"]  # the test figures do move
    # and a change on val moves it
    _, sel_c, _ = _blocks(val_p ** 3 / (val_p ** 3).sum(1, keepdims=True), test_a, val_y, ya)
    assert sel_c["threshold"] != sel_a["threshold"]
