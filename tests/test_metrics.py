"""evaluation.metrics: hand-computed confusion matrices, sklearn cross-checks, group bootstrap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from featsvm.data.manifest import Manifest, ManifestRow
from featsvm.evaluation import metrics as M
from featsvm.labels import LABELS

B, E, P, R = LABELS  # benign, early_pre_b, pre_b, pro_b


def onehot_proba(pred: list[str], sharp: float = 0.7) -> np.ndarray:
    """Probabilities whose arg-max is `pred` (the rest spread evenly)."""
    proba = np.full((len(pred), 4), (1 - sharp) / 3)
    proba[np.arange(len(pred)), M.label_indices(pred)] = sharp
    return proba


# ---------------------------------------------------------------- hand-computed matrices

# pro_b is present once and never predicted.
Y_A = [B, B, B, E, E, P, P, R]
P_A = [B, B, E, E, E, P, B, P]


def test_confusion_by_hand() -> None:
    cm = M.confusion(Y_A, P_A)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0]]
    assert (cm == skm.confusion_matrix(Y_A, P_A, labels=list(LABELS))).all()


def test_binary_by_hand() -> None:
    cm = M.confusion(Y_A, P_A)
    assert M.binary_counts(cm) == {"tp": 4, "fn": 1, "fp": 1, "tn": 2}
    b = M.binary_metrics(cm)
    assert b["accuracy"] == pytest.approx(6 / 8)
    assert b["sensitivity"] == pytest.approx(4 / 5)
    assert b["specificity"] == pytest.approx(2 / 3)
    assert b["precision"] == pytest.approx(4 / 5)


def test_per_class_and_macro_by_hand_with_a_never_predicted_class() -> None:
    cm = M.confusion(Y_A, P_A)
    pc = M.per_class_metrics(cm)
    assert pc[B] == pytest.approx(
        {"sensitivity": 2 / 3, "specificity": 4 / 5, "precision": 2 / 3, "f1": 2 / 3,
         "support": 3})
    assert pc[E] == pytest.approx(
        {"sensitivity": 1.0, "specificity": 5 / 6, "precision": 2 / 3, "f1": 4 / 5,
         "support": 2})
    assert pc[P] == pytest.approx(
        {"sensitivity": 1 / 2, "specificity": 5 / 6, "precision": 1 / 2, "f1": 1 / 2,
         "support": 2})
    # pro_b is never predicted: precision 0/0 is undefined (None), F1 is 0, not undefined.
    assert pc[R]["precision"] is None
    assert pc[R]["sensitivity"] == 0.0 and pc[R]["f1"] == 0.0 and pc[R]["specificity"] == 1.0
    macro = M.macro_metrics(pc)
    assert macro["precision"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)  # defined ones only
    assert macro["sensitivity"] == pytest.approx((2 / 3 + 1 + 1 / 2 + 0) / 4)
    assert M.accuracy(cm) == pytest.approx(5 / 8)
    assert M.balanced_accuracy(cm) == pytest.approx(13 / 24)
    assert M.macro_f1(cm) == pytest.approx((2 / 3 + 4 / 5 + 1 / 2 + 0) / 4)


def test_split_missing_a_class_by_hand() -> None:
    y, p = [B, B, E, P], [B, R, E, P]  # pro_b absent from the split, predicted once
    cm = M.confusion(y, p)
    pc = M.per_class_metrics(cm)
    assert pc[R]["sensitivity"] is None and pc[R]["support"] == 0
    assert pc[R]["precision"] == 0.0 and pc[R]["f1"] == 0.0
    assert pc[R]["specificity"] == pytest.approx(3 / 4)
    assert M.balanced_accuracy(cm) == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert M.macro_f1(cm) == pytest.approx((2 / 3 + 1 + 1 + 0) / 4)
    block = M.score_block(y, onehot_proba(p), [0, 1, 2, 3], n_boot=50)
    assert block["roc_auc_skipped"] == [R]
    assert block["per_class"][R]["roc_auc"] is None
    assert block["roc_auc_ovr"] is not None
    json.dumps(block, allow_nan=False)  # strict JSON: undefined values are null


def test_undefined_everything_is_null_not_nan() -> None:
    block = M.score_block([B, B], onehot_proba([B, B]), [0, 1], n_boot=20)
    assert block["binary"]["sensitivity"] is None  # no malignant cell in the split
    assert block["binary"]["precision"] is None  # and none predicted
    assert block["binary"]["specificity"] == 1.0
    assert block["roc_auc_ovr"] is None and set(block["roc_auc_skipped"]) == set(LABELS)
    assert block["mcc"] == 0.0
    text = json.dumps(block, allow_nan=False)
    assert "NaN" not in text


# ---------------------------------------------------------------- scikit-learn cross-checks


def random_case(seed: int, n: int = 300, drop: str | None = None) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    if drop is not None:
        y = y[y != LABELS.index(drop)]
    proba = rng.dirichlet(np.ones(4), len(y))
    proba[np.arange(len(y)), y] += rng.uniform(0, 0.8, len(y))
    proba[:, 3] *= 0.3  # pro_b rarely predicted
    proba /= proba.sum(axis=1, keepdims=True)
    return [LABELS[i] for i in y], proba


@pytest.mark.parametrize("seed,drop", [(0, None), (1, None), (2, R), (3, E)])
def test_against_sklearn(seed: int, drop: str | None) -> None:
    y, proba = random_case(seed, drop=drop)
    pred = [LABELS[i] for i in proba.argmax(axis=1)]
    labels = list(LABELS)
    block = M.score_block(y, proba, list(range(len(y))), n_boot=0)
    assert block["ci95"] == {}
    cm = np.array(block["confusion_matrix"])
    assert (cm == skm.confusion_matrix(y, pred, labels=labels)).all()
    assert block["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    rec = skm.recall_score(y, pred, labels=labels, average=None, zero_division=np.nan)
    prec = skm.precision_score(y, pred, labels=labels, average=None, zero_division=np.nan)
    for i, lab in enumerate(labels):
        for ours, theirs in ((block["per_class"][lab]["sensitivity"], rec[i]),
                             (block["per_class"][lab]["precision"], prec[i])):
            if np.isnan(theirs):
                assert ours is None
            else:
                assert ours == pytest.approx(theirs)
    assert block["macro"]["precision"] == pytest.approx(
        skm.precision_score(y, pred, labels=labels, average="macro", zero_division=np.nan))
    assert block["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert block["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert block["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    # binary: malignant positive
    yb = [lab != B for lab in y]
    pb = [lab != B for lab in pred]
    assert block["binary"]["sensitivity"] == pytest.approx(skm.recall_score(yb, pb))
    assert block["binary"]["precision"] == pytest.approx(skm.precision_score(yb, pb))
    assert block["binary"]["specificity"] == pytest.approx(
        skm.recall_score(yb, pb, pos_label=False))
    assert block["binary"]["roc_auc"] == pytest.approx(
        skm.roc_auc_score(yb, 1 - proba[:, 0]))
    # ROC-AUC one-vs-rest
    present = [lab for lab in labels if lab in y]
    per = [skm.roc_auc_score([v == lab for v in y], proba[:, labels.index(lab)])
           for lab in present]
    assert block["roc_auc_ovr"] == pytest.approx(np.mean(per))
    if drop is None:
        assert block["roc_auc_ovr"] == pytest.approx(
            skm.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=labels))
        assert block["roc_auc_skipped"] == []
    else:
        assert block["roc_auc_skipped"] == [drop]


def test_auc_handles_ties_like_sklearn() -> None:
    y = [B, E, B, E, P, P, B, R]
    proba = np.tile([0.25, 0.25, 0.25, 0.25], (8, 1))
    proba[[1, 3], 1] = 0.5
    proba /= proba.sum(axis=1, keepdims=True)
    macro, per, skipped = M.roc_auc_ovr(y, proba)
    for k, lab in enumerate(LABELS):
        assert per[lab] == pytest.approx(skm.roc_auc_score([v == lab for v in y], proba[:, k]))
    assert skipped == []


# ---------------------------------------------------------------- bootstrap over groups


def test_group_weights_move_groups_as_one_unit() -> None:
    groups = [7, 7, 7, 3, 3, 9, 1, 1, 1, 1]
    w = M.group_resample_weights(groups, n_boot=200, seed=5)
    assert w.shape == (200, 10)
    g = np.array(groups)
    for gid in set(groups):
        cols = w[:, g == gid]
        assert (cols == cols[:, :1]).all()  # every member drawn the same number of times
    # each resample draws as many groups as there are (4)
    per_group = np.stack([w[:, g == gid][:, 0] for gid in sorted(set(groups))], axis=1)
    assert (per_group.sum(axis=1) == 4).all()


def test_planted_group_widens_the_interval() -> None:
    rng = np.random.default_rng(0)
    n = 200
    y = [LABELS[i] for i in rng.integers(0, 4, n)]
    pred = list(y)
    for i in range(40):  # 40 identical-looking rows, all wrong
        pred[i] = B if y[i] != B else E
    proba = onehot_proba(pred)
    singletons = list(range(n))
    planted = [0] * 40 + list(range(1, n - 39))  # the 40 wrong rows form one duplicate group
    ci_single = M.score_block(y, proba, singletons, n_boot=400, seed=1)["ci95"]["accuracy"]
    ci_group = M.score_block(y, proba, planted, n_boot=400, seed=1)["ci95"]["accuracy"]
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(ci_group) > 1.8 * width(ci_single)
    point = M.score_block(y, proba, planted, n_boot=0)["accuracy"]
    assert ci_group[0] < point < ci_group[1]


def test_bootstrap_is_reproducible_and_seeded() -> None:
    y, proba = random_case(4, n=120)
    groups = [i // 3 for i in range(len(y))]
    a = M.score_block(y, proba, groups, n_boot=200, seed=3)["ci95"]
    b = M.score_block(y, proba, groups, n_boot=200, seed=3)["ci95"]
    c = M.score_block(y, proba, groups, n_boot=200, seed=4)["ci95"]
    assert a == b
    assert a != c
    for key in ("accuracy", "binary.sensitivity", "binary.specificity", "binary.precision",
                "macro_f1", "balanced_accuracy", "mcc", "roc_auc_ovr"):
        lo, hi = a[key]
        assert lo <= hi


def test_bootstrap_auc_matches_explicit_resample() -> None:
    """The weighted AUC of a resample equals sklearn's AUC on the explicitly repeated rows."""
    y, proba = random_case(6, n=60)
    t = M.label_indices(y)
    w = M.group_resample_weights([i // 2 for i in range(60)], n_boot=3, seed=0)
    aucs = M._auc_table(t, proba, w)
    for b in range(3):
        rep = np.repeat(np.arange(60), w[b].astype(int))
        yb = t[rep]
        for k in range(4):
            if 0 < (yb == k).sum() < len(yb):
                assert aucs[b, k] == pytest.approx(skm.roc_auc_score(yb == k, proba[rep, k]))


# ---------------------------------------------------------------- whole runs


def test_score_predictions_uses_the_manifest(tmp_path: Path) -> None:
    rows = []
    labels = [B, E, P, R] * 5
    for i, lab in enumerate(labels):
        split = "train" if i < 4 else ("val" if i < 12 else "test")
        rows.append(ManifestRow(f"img{i}.jpg", f"{i:064x}", lab, i // 2, split))
    manifest = Manifest(path=tmp_path / "split.csv", sha256="0" * 64, rows=tuple(rows))
    rel = [r.relpath for r in rows if r.split != "train"]
    proba = onehot_proba([r.label for r in rows if r.split != "train"])
    out = M.score_predictions(manifest, rel, proba, n_boot=30, seed=0)
    assert set(out) == {"val", "test"}
    assert out["val"]["n"] == 8 and out["test"]["n"] == 8
    assert out["test"]["accuracy"] == 1.0 and out["val"]["n_groups"] == 4
    for key in ("accuracy", "binary", "per_class", "macro", "balanced_accuracy", "macro_f1",
                "mcc", "roc_auc_ovr", "ci95"):
        assert key in out["test"]
    with pytest.raises(ValueError, match="not in the split manifest"):
        M.score_predictions(manifest, ["nope.jpg"], proba[:1])


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="unknown label 'cat'"):
        M.confusion(["cat"], [B])
    with pytest.raises(ValueError, match="shape"):
        M.score_block([B], np.ones((1, 3)), [0])
