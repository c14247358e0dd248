"""Are the probabilities honest? Expected calibration error, Brier score, reliability bins and
one-parameter temperature scaling.

Definitions (used everywhere in featsvm, documented once here):

* **Confidence** of a prediction = the largest class probability, ``max_k p_k`` (the
  probability of the predicted, arg-max class). It is *correct* when that class is the true
  label. For a malignant-vs-benign view (`binary_confidence`) the two probabilities are
  ``P(malignant)`` (the sum of the three malignant classes) and ``P(benign)``.
* **ECE** (expected calibration error, Guo et al. 2017): the confidences are put into
  ``n_bins = 15`` *equal-width* bins over [0, 1], right-closed, ``(m-1)/15 < c <= m/15``
  (the first bin also takes ``c = 0``). With ``acc(B)`` the share of correct predictions and
  ``conf(B)`` the mean confidence of bin ``B``, ``ECE = sum_B |B|/n * |acc(B) - conf(B)|``.
  Empty bins contribute nothing. 0 = perfectly calibrated; a model whose confidence is 0.9
  where it is right 80 % of the time has ECE 0.1.
* **Brier score** (multi-class, Brier 1950): ``mean_i sum_k (p_ik - [y_i = k])^2``, in
  [0, 2]; lower is better; 0 only for confident correct predictions.
* **NLL**: mean ``-log p_{i, y_i}`` (probabilities clipped at 1e-12).
* **Temperature scaling**: ``softmax(z / T)`` for logits ``z``; one parameter ``T > 0``
  fitted by minimising the NLL on the **val** split only. It never changes the arg-max class,
  so accuracy, sensitivity and specificity stay the same; only the confidences move
  (``T > 1`` softens over-confident models). Where a model hands over probabilities rather
  than logits, ``log p`` serves as the logits (softmax is unchanged by a per-row shift).
  Heads use scikit-learn's ``CalibratedClassifierCV(method="temperature")`` (the same
  objective); end-to-end models use `fit_temperature` here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

N_BINS = 15
_TINY = 1e-300  # log() of a probability that underflowed to 0 stays finite


def confidence(proba: np.ndarray) -> np.ndarray:
    """Max class probability of each row."""
    proba = np.asarray(proba, dtype=np.float64)
    return proba.max(axis=1) if len(proba) else np.zeros(0)


def correct(proba: np.ndarray, true_idx: Sequence[int] | np.ndarray) -> np.ndarray:
    """Whether the arg-max class of each row is the true class index."""
    proba = np.asarray(proba, dtype=np.float64)
    if not len(proba):
        return np.zeros(0, dtype=bool)
    return proba.argmax(axis=1) == np.asarray(true_idx)


def binary_confidence(p_malignant: np.ndarray, malignant: np.ndarray,
                      decision: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of the malignant-vs-benign view: the predicted side is
    ``decision`` (True = malignant; default ``P(malignant) > 0.5``) and its confidence is the
    probability of that side."""
    p = np.asarray(p_malignant, dtype=np.float64)
    dec = p > 0.5 if decision is None else np.asarray(decision, dtype=bool)
    conf = np.where(dec, p, 1.0 - p)
    return conf, dec == np.asarray(malignant, dtype=bool)


def reliability_bins(conf: np.ndarray, right: np.ndarray, n_bins: int = N_BINS,
                     weights: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Per equal-width bin: lower/upper edge, count (weighted), mean confidence, accuracy
    (None for an empty bin)."""
    conf = np.asarray(conf, dtype=np.float64)
    right = np.asarray(right, dtype=np.float64)
    w = np.ones_like(conf) if weights is None else np.asarray(weights, dtype=np.float64)
    idx = bin_index(conf, n_bins)
    count = np.bincount(idx, weights=w, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=w * conf, minlength=n_bins)
    sum_right = np.bincount(idx, weights=w * right, minlength=n_bins)
    out = []
    for m in range(n_bins):
        c = float(count[m])
        out.append({
            "lower": m / n_bins, "upper": (m + 1) / n_bins, "count": c,
            "confidence": float(sum_conf[m] / c) if c else None,
            "accuracy": float(sum_right[m] / c) if c else None,
        })
    return out


def bin_index(conf: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Bin of each confidence: right-closed equal-width bins, 0 in the first one."""
    conf = np.clip(np.asarray(conf, dtype=np.float64), 0.0, 1.0)
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def ece(conf: np.ndarray, right: np.ndarray, n_bins: int = N_BINS,
        weights: np.ndarray | None = None) -> float | None:
    """Expected calibration error (module docstring); `weights` (b, n) gives one value per
    row (bootstrap resamples), returned as an array. None for no predictions."""
    conf = np.asarray(conf, dtype=np.float64)
    right = np.asarray(right, dtype=np.float64)
    if conf.size == 0:
        return None
    idx = bin_index(conf, n_bins)
    if weights is None:
        w = np.ones((1, conf.size))
    else:
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    onehot = np.zeros((conf.size, n_bins))
    onehot[np.arange(conf.size), idx] = 1.0
    count = w @ onehot  # (b, bins)
    gap = np.abs((w * right) @ onehot - (w * conf) @ onehot)  # |sum acc - sum conf| per bin
    total = count.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        vals = np.where(total > 0, gap.sum(axis=1) / np.where(total > 0, total, 1), np.nan)
    return float(vals[0]) if weights is None else vals  # type: ignore[return-value]


def brier(proba: np.ndarray, true_idx: np.ndarray, weights: np.ndarray | None = None
          ) -> Any:
    """Multi-class Brier score (module docstring); per bootstrap row when `weights` given."""
    proba = np.asarray(proba, dtype=np.float64)
    if not len(proba):
        return None
    onehot = np.zeros_like(proba)
    onehot[np.arange(len(proba)), np.asarray(true_idx)] = 1.0
    per = ((proba - onehot) ** 2).sum(axis=1)
    if weights is None:
        return float(per.mean())
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    return (w @ per) / w.sum(axis=1)


def nll(proba: np.ndarray, true_idx: np.ndarray) -> float | None:
    proba = np.asarray(proba, dtype=np.float64)
    if not len(proba):
        return None
    p = proba[np.arange(len(proba)), np.asarray(true_idx)]
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())


# ---------------------------------------------------------------- temperature


def log_proba(proba: np.ndarray) -> np.ndarray:
    """Logits standing in for probabilities: log p (a per-row shift of the true logits)."""
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), _TINY, 1.0))


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``: the probabilities after temperature scaling. Classes with
    probability 0 stay 0; T = 1 returns the input (renormalised)."""
    proba = np.asarray(proba, dtype=np.float64)
    if not len(proba):
        return proba.copy()
    zero = proba <= 0
    out = softmax(log_proba(proba) / float(temperature))
    out[zero] = 0.0
    return out / out.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, true_idx: Sequence[int] | np.ndarray) -> float:
    """The T > 0 minimising the mean NLL of ``softmax(logits / T)`` (bounded 1-D search over
    log T in [-5, 5], as scikit-learn does for its temperature calibrator). Only ever call it
    with val logits."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(true_idx, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(y) or not len(y):
        raise ValueError(f"logits {z.shape} and {len(y)} labels: need (n, k) with n >= 1")
    z = np.where(np.isfinite(z), z, np.log(_TINY))

    def loss(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        lse = np.log(np.exp(s).sum(axis=1))
        return float((lse - s[np.arange(len(y)), y]).mean())

    res = minimize_scalar(loss, bounds=(-5.0, 5.0), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


# ---------------------------------------------------------------- summaries


def summary(proba: np.ndarray, true_idx: np.ndarray, n_bins: int = N_BINS,
            weights: np.ndarray | None = None) -> dict[str, Any]:
    """ECE, Brier, NLL, mean confidence, accuracy and the reliability bins of one split
    (`weights` (b, n) adds bootstrap CIs of ECE and Brier under ``ci95``)."""
    from featsvm.evaluation.metrics import _interval

    proba = np.asarray(proba, dtype=np.float64)
    t = np.asarray(true_idx, dtype=np.int64)
    conf = confidence(proba)
    right = correct(proba, t)
    out: dict[str, Any] = {
        "n": len(t),
        "ece": ece(conf, right, n_bins),
        "brier": brier(proba, t),
        "nll": nll(proba, t),
        "mean_confidence": float(conf.mean()) if len(t) else None,
        "accuracy": float(right.mean()) if len(t) else None,
        "n_bins": n_bins,
        "bins": reliability_bins(conf, right, n_bins),
    }
    if weights is not None and len(t):
        out["ci95"] = {
            "ece": _interval(np.asarray(ece(conf, right, n_bins, weights))),
            "brier": _interval(np.asarray(brier(proba, t, weights))),
        }
    return out


DEFINITION = (
    f"ECE: {N_BINS} equal-width right-closed bins of the confidence (max class probability) "
    "over [0, 1]; sum over bins of (bin share) x |accuracy - mean confidence|. Brier: mean over "
    "images of the squared distance between the probability vector and the one-hot label "
    "(0-2). Temperature: one T fitted on val by NLL, softmax(logits / T)."
)
