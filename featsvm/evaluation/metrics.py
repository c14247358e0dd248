"""Classification metrics from labels and class probabilities, with group-bootstrap CIs.

Every number comes from a 4x4 confusion matrix (rows = true label, columns = predicted label,
both in `featsvm.labels.LABELS` order) except the ROC-AUC, which uses the probabilities.

Conventions (documented once, used everywhere):

* **Predicted label** = arg-max of the probability row (the same rule `runs.write_predictions`
  uses for ``predictions.csv``).
* **Binary** metrics collapse the 4x4 matrix: malignant (early_pre_b, pre_b, pro_b) is the
  positive class, benign the negative one. A malignant cell predicted as the wrong malignant
  subtype is still a true positive.
* **Undefined ratios** (0/0, e.g. the precision of a class that is never predicted, or the
  sensitivity of a class absent from the split) are ``None`` (``null`` in JSON), never 0 and
  never NaN. Macro averages are taken over the defined values only. This is scikit-learn's
  ``zero_division=np.nan`` behaviour, which the tests cross-check.
* **F1** per class is ``2 TP / (2 TP + FP + FN)`` (None when the class is neither present nor
  predicted); ``macro_f1`` averages it over the classes that are present or predicted, as
  ``sklearn.metrics.f1_score(average="macro")`` does with its default labels.
* **Balanced accuracy** = mean sensitivity over the classes present in the split
  (``sklearn.metrics.balanced_accuracy_score``).
* **MCC** is the multiclass (Gorodkin) form of ``sklearn.metrics.matthews_corrcoef``; 0 when
  undefined, as scikit-learn returns.
* **ROC-AUC** is one-vs-rest per class, macro-averaged; a class that is absent from the split
  (or is the whole split) has no AUC: it is skipped and listed under ``roc_auc_skipped``.
* **95 % CIs** are percentile bootstrap intervals. Images of one duplicate group are not
  independent, so the bootstrap resamples *groups* (with replacement) and takes every image
  of a drawn group; ``n_boot`` resamples with a fixed ``seed`` make the interval reproducible.
  Resamples in which a metric is undefined are left out of that metric's interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from featsvm.errors import ManifestError, UsageError
from featsvm.labels import LABELS, MALIGNANT

if TYPE_CHECKING:
    from featsvm.data.manifest import ManifestRow

N_BOOT = 1000
CI_LEVEL = 0.95

_MAL = np.array([lab in MALIGNANT for lab in LABELS])


# ---------------------------------------------------------------- confusion matrices


def label_indices(labels: Sequence[str], label_set: Sequence[str] = LABELS) -> np.ndarray:
    """Integer index of every label in `label_set`; an unknown label is an error naming it."""
    pos = {lab: i for i, lab in enumerate(label_set)}
    try:
        return np.array([pos[lab] for lab in labels], dtype=np.int64)
    except KeyError as exc:
        raise UsageError(
            f"unknown label {exc.args[0]!r}; expected one of {', '.join(label_set)}"
        ) from None


def confusion(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] = LABELS
) -> np.ndarray:
    """Confusion matrix, rows = true label, columns = predicted label, in `labels` order."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels, y_pred {len(y_pred)}")
    k = len(labels)
    t, p = label_indices(y_true, labels), label_indices(y_pred, labels)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _mean_defined(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# ---------------------------------------------------------------- metrics from a matrix


def binary_counts(cm: np.ndarray) -> dict[str, int]:
    """TP/FP/TN/FN with malignant positive, from a 4x4 matrix in LABELS order."""
    cm = np.asarray(cm)
    return {
        "tp": int(cm[np.ix_(_MAL, _MAL)].sum()),
        "fn": int(cm[np.ix_(_MAL, ~_MAL)].sum()),
        "fp": int(cm[np.ix_(~_MAL, _MAL)].sum()),
        "tn": int(cm[np.ix_(~_MAL, ~_MAL)].sum()),
    }


def binary_metrics(cm: np.ndarray) -> dict[str, float | None]:
    """Accuracy, sensitivity, specificity, precision (and F1) of malignant vs benign."""
    c = binary_counts(cm)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def per_class_metrics(
    cm: np.ndarray, labels: Sequence[str] = LABELS
) -> dict[str, dict[str, float | int | None]]:
    """One-vs-rest sensitivity, specificity, precision, F1 and support for every class."""
    cm = np.asarray(cm)
    n = int(cm.sum())
    out: dict[str, dict[str, float | int | None]] = {}
    for i, lab in enumerate(labels):
        tp = int(cm[i, i])
        fn = int(cm[i, :].sum()) - tp
        fp = int(cm[:, i].sum()) - tp
        tn = n - tp - fn - fp
        out[lab] = {
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "support": tp + fn,
        }
    return out


def macro_metrics(per_class: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Unweighted means of the per-class metrics over the classes where each is defined."""
    return {
        key: _mean_defined([m[key] for m in per_class.values()])
        for key in ("sensitivity", "specificity", "precision", "f1")
    }


def accuracy(cm: np.ndarray) -> float | None:
    cm = np.asarray(cm)
    return _ratio(np.trace(cm), cm.sum())


def balanced_accuracy(cm: np.ndarray) -> float | None:
    """Mean sensitivity over the classes present in the split."""
    cm = np.asarray(cm)
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return None
    return float(np.mean(np.diag(cm)[present] / support[present]))


def macro_f1(cm: np.ndarray) -> float | None:
    """Mean per-class F1 over the classes present in the split or predicted."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    den = cm.sum(axis=0) + cm.sum(axis=1)  # = 2TP + FP + FN
    used = den > 0
    if not used.any():
        return None
    return float(np.mean(2 * tp[used] / den[used]))


def mcc(cm: np.ndarray) -> float | None:
    """Multiclass Matthews correlation (Gorodkin's R_K); 0.0 where undefined, like sklearn."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum()
    if n == 0:
        return None
    t, p = cm.sum(axis=1), cm.sum(axis=0)
    cov_tp = np.trace(cm) * n - t @ p
    cov_pp = n * n - p @ p
    cov_tt = n * n - t @ t
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / math.sqrt(cov_tt * cov_pp))


# ---------------------------------------------------------------- ROC-AUC


def _weighted_auc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of `score` for `positive`, for every row of `weights` (b, n) at once.

    Weights are image multiplicities (a bootstrap resample), so row b gives the AUC of the
    resampled data set; ties count one half. NaN where a row has no positive or no negative.
    """
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    w = weights[:, order]
    pos = positive[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of every tied run
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w * ~pos, starts, axis=1)
    neg_below = np.cumsum(wn, axis=1) - wn
    num = (wp * (neg_below + 0.5 * wn)).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _auc_table(true_idx: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(b, n_classes + 1) one-vs-rest AUCs per class, then binary (malignant = 1 - P(benign))."""
    cols = [
        _weighted_auc(proba[:, k], true_idx == k, weights) for k in range(len(LABELS))
    ]
    malignant = _MAL[true_idx]
    cols.append(_weighted_auc(proba[:, _MAL].sum(axis=1), malignant, weights))
    return np.stack(cols, axis=1)


def roc_auc_ovr(
    y_true: Sequence[str], proba: np.ndarray
) -> tuple[float | None, dict[str, float | None], list[str]]:
    """Macro one-vs-rest ROC-AUC, per-class AUCs, and the classes skipped (no AUC defined)."""
    t = label_indices(y_true)
    proba = _check_proba(proba, len(t))
    aucs = _auc_table(t, proba, np.ones((1, len(t))))[0]
    per = {lab: _none_if_nan(aucs[k]) for k, lab in enumerate(LABELS)}
    skipped = [lab for lab, v in per.items() if v is None]
    return _mean_defined(list(per.values())), per, skipped


# ---------------------------------------------------------------- the block


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _check_proba(proba: np.ndarray, n: int) -> np.ndarray:
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape != (n, len(LABELS)):
        raise ValueError(
            f"proba has shape {proba.shape}, expected ({n}, {len(LABELS)}) with columns in "
            f"LABELS order {LABELS}"
        )
    if not np.all(np.isfinite(proba)):
        raise ValueError("proba contains NaN or infinite values")
    return proba


def _point_metrics(cm: np.ndarray) -> dict[str, float | None]:
    """The flat dictionary of every CI-carrying metric, keyed as in the block's ``ci95``."""
    out: dict[str, float | None] = {
        "accuracy": accuracy(cm),
        "balanced_accuracy": balanced_accuracy(cm),
        "macro_f1": macro_f1(cm),
        "mcc": mcc(cm),
    }
    out.update({f"binary.{k}": v for k, v in binary_metrics(cm).items()})
    per = per_class_metrics(cm)
    out.update({f"macro.{k}": v for k, v in macro_metrics(per).items()})
    for lab, m in per.items():
        for key in ("sensitivity", "specificity", "precision", "f1"):
            out[f"per_class.{lab}.{key}"] = m[key]  # type: ignore[assignment]
    return out


def group_resample_weights(groups: Sequence[int], n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_images) multiplicity of every image in each group-bootstrap resample.

    Each resample draws as many groups as there are, with replacement; an image's weight is
    the number of times its group was drawn, so a group always moves as one unit.
    """
    _, gidx = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(gidx.max()) + 1 if len(gidx) else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    counts = np.zeros((n_boot, n_groups), dtype=np.float64)
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return counts[:, gidx]


def _interval(values: np.ndarray, level: float = CI_LEVEL) -> list[float] | None:
    vals = values[np.isfinite(values)]
    if vals.size == 0:
        return None
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(vals, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def score_block(
    y_true: Sequence[str],
    proba: np.ndarray,
    groups: Sequence[int],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric for one split, with 95 % group-bootstrap CIs (see the module docstring).

    `proba` is (n, 4) with columns in LABELS order; `groups` are the duplicate-group ids from
    the split manifest. ``n_boot=0`` skips the bootstrap (``ci95`` is then empty).
    """
    t = label_indices(y_true)
    n = len(t)
    proba = _check_proba(proba, n)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries, expected {n}")
    pred = proba.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    k = len(LABELS)
    cm = np.bincount(t * k + pred, minlength=k * k).reshape(k, k)

    per = per_class_metrics(cm)
    auc_all = _auc_table(t, proba, np.ones((1, n)))[0] if n else np.full(k + 1, np.nan)
    per_auc = {lab: _none_if_nan(auc_all[i]) for i, lab in enumerate(LABELS)}
    for lab in LABELS:
        per[lab]["roc_auc"] = per_auc[lab]
    binary = binary_metrics(cm)
    binary["roc_auc"] = _none_if_nan(auc_all[k])
    block: dict[str, Any] = {
        "n": n,
        "n_groups": len(set(groups)),
        "labels": list(LABELS),
        "confusion_matrix": cm.tolist(),
        "accuracy": accuracy(cm),
        "binary": {**binary, **binary_counts(cm)},
        "per_class": per,
        "macro": macro_metrics(per),
        "balanced_accuracy": balanced_accuracy(cm),
        "macro_f1": macro_f1(cm),
        "mcc": mcc(cm),
        "roc_auc_ovr": _mean_defined(list(per_auc.values())),
        "roc_auc_skipped": [lab for lab, v in per_auc.items() if v is None],
        "ci95": {},
        "bootstrap": {
            "n_boot": int(n_boot),
            "seed": int(seed),
            "unit": "duplicate group",
            "method": "percentile",
            "level": CI_LEVEL,
        },
    }
    if n_boot > 0 and n > 0:
        block["ci95"] = _bootstrap_cis(t, pred, proba, groups, n_boot, seed)
    return json_safe(block)


def _bootstrap_cis(
    t: np.ndarray,
    pred: np.ndarray,
    proba: np.ndarray,
    groups: Sequence[int],
    n_boot: int,
    seed: int,
) -> dict[str, list[float] | None]:
    k = len(LABELS)
    w = group_resample_weights(groups, n_boot, seed)  # (b, n)
    onehot = np.zeros((len(t), k * k))
    onehot[np.arange(len(t)), t * k + pred] = 1.0
    cms = (w @ onehot).reshape(n_boot, k, k)
    keys = list(_point_metrics(cms[0]))
    table = np.full((n_boot, len(keys)), np.nan)
    for b in range(n_boot):
        vals = _point_metrics(cms[b])
        table[b] = [np.nan if vals[key] is None else vals[key] for key in keys]
    cis = {key: _interval(table[:, j]) for j, key in enumerate(keys)}
    aucs = _auc_table(t, proba, w)  # (b, k + 1)
    finite = np.isfinite(aucs[:, :k])
    n_defined = finite.sum(axis=1)
    macro_auc = np.where(
        n_defined > 0, np.where(finite, aucs[:, :k], 0.0).sum(axis=1) / np.maximum(n_defined, 1),
        np.nan,
    )
    cis["roc_auc_ovr"] = _interval(macro_auc)
    cis["binary.roc_auc"] = _interval(aucs[:, k])
    for i, lab in enumerate(LABELS):
        cis[f"per_class.{lab}.roc_auc"] = _interval(aucs[:, i])
    return cis


# ---------------------------------------------------------------- whole runs


def score_splits(
    true_labels: Sequence[str],
    proba: np.ndarray,
    splits: Sequence[str],
    groups: Sequence[int],
    n_boot: int = N_BOOT,
    seed: int = 0,
    split_names: Sequence[str] = ("val", "test"),
) -> dict[str, dict[str, Any]]:
    """``{"val": block, "test": block}`` (the metrics.json shape) from per-image arrays."""
    proba = _check_proba(proba, len(true_labels))
    if not len(splits) == len(groups) == len(true_labels):
        raise ValueError("true_labels, splits and groups must have one entry per image")
    out: dict[str, dict[str, Any]] = {}
    for name in split_names:
        idx = [i for i, s in enumerate(splits) if s == name]
        if not idx:
            continue
        out[name] = score_block(
            [true_labels[i] for i in idx], proba[idx], [groups[i] for i in idx], n_boot, seed
        )
    return out


def score_predictions(
    manifest: Any,
    images: Sequence[ManifestRow] | Sequence[str],
    proba: np.ndarray,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """metrics.json content for predictions on images of a `featsvm.data.manifest.Manifest`:
    `images` are the scored manifest rows (or their relpaths), `proba` one row per image in
    LABELS order.

    True labels, splits and duplicate groups are looked up in the manifest by relpath, so a
    caller only hands over what its model produced.
    """
    relpaths = [p if isinstance(p, str) else p.relpath for p in images]
    by_rel = {r.relpath: r for r in manifest.rows}
    missing = [p for p in relpaths if p not in by_rel]
    if missing:
        raise ManifestError(
            f"{len(missing)} prediction(s) are for images not in the split manifest "
            f"{manifest.path} (first: {missing[0]!r}); score against the manifest the model "
            "was trained with"
        )
    rows = [by_rel[p] for p in relpaths]
    return score_splits(
        [r.label for r in rows], proba, [r.split for r in rows], [r.group for r in rows],
        n_boot=n_boot, seed=seed,
    )


def json_safe(obj: Any) -> Any:
    """Replace NaN/inf floats by None recursively (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
