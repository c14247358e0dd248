"""Shortcut check: paired group-bootstrap differences against the baselines."""

from __future__ import annotations


def test_paired_difference_by_hand_and_identical_models() -> None:
    from featsvm.evaluation.shortcut import paired_difference

    y = ["benign", "benign", "pre_b", "pre_b"]
    a = ["benign", "benign", "pre_b", "pre_b"]  # balanced accuracy 1
    b = ["benign", "pre_b", "pre_b", "benign"]  # 1/2 per class -> 0.5
    d = paired_difference(y, a, b, [0, 1, 2, 3], n_boot=200, seed=0)
    assert d["a"] == 1.0 and d["b"] == 0.5 and d["diff"] == 0.5
    assert d["ci95"][0] <= 0.5 <= d["ci95"][1] and d["ci95"][1] <= 1.0
    same = paired_difference(y, b, b, [0, 0, 1, 1], n_boot=50)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0]  # paired: no spread at all
