"""Selective prediction: the model may abstain when it is not confident enough.

* The **confidence** is the max class probability (after the run's calibration), as in
  `featsvm.evaluation.calibration`. An image is *accepted* when its confidence is
  ``>= threshold`` and *abstained on* otherwise.
* **Coverage** = share of images accepted; **selective risk** = error rate (wrong class,
  four-class) among the accepted ones. The coverage-risk curve lists both for every
  threshold (every distinct confidence); **AURC** is the mean selective risk over the
  coverages 1/n, 2/n, ..., 1 (lower is better).
* The **threshold** is chosen on the **val** split only (`choose_threshold`): the lowest
  confidence at which the val selective risk is at most the target error (default 1 %), i.e.
  the largest val coverage that meets the target. When no threshold meets it, the threshold
  is just above the highest val confidence (abstain on everything) and ``feasible`` is false.
  The test split (or another lab's images) then shows what that threshold really gives:
  coverage and risk with bootstrap CIs. Note the val risk is an in-sample estimate on a few
  hundred images; the test risk is the honest one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from featsvm.errors import ConfigError

TARGET_ERROR = 0.01
MAX_CURVE_POINTS = 200


@dataclass(frozen=True)
class SelectiveConfig:
    """The ``[selective]`` section: the error rate the val-chosen threshold aims at."""

    target_error: float = TARGET_ERROR

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_error < 1.0:
            raise ConfigError(f"[selective] target_error must be in [0, 1), got "
                              f"{self.target_error}")


def _ordered(conf: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct confidences descending, accepted count, error count) at each of them."""
    conf = np.asarray(conf, dtype=np.float64)
    wrong = ~np.asarray(right, dtype=bool)
    order = np.argsort(-conf, kind="mergesort")
    c = conf[order]
    cum_err = np.cumsum(wrong[order])
    last = np.flatnonzero(np.r_[c[1:] != c[:-1], True])  # last index of each tied run
    return c[last], last + 1, cum_err[last]


def coverage_risk_curve(conf: np.ndarray, right: np.ndarray,
                        max_points: int = MAX_CURVE_POINTS) -> dict[str, Any]:
    """Coverage, selective risk and threshold at every distinct confidence (thinned to at most
    `max_points`, always keeping full coverage), plus the AURC."""
    conf = np.asarray(conf, dtype=np.float64)
    n = conf.size
    if n == 0:
        return {"coverage": [], "risk": [], "threshold": [], "aurc": None}
    thr, k, err = _ordered(conf, right)
    wrong_sorted = ~np.asarray(right, dtype=bool)[np.argsort(-conf, kind="mergesort")]
    aurc = float(np.mean(np.cumsum(wrong_sorted) / np.arange(1, n + 1)))
    keep = np.unique(np.r_[np.linspace(0, len(thr) - 1, min(max_points, len(thr))).round()
                           .astype(int), len(thr) - 1])
    return {
        "coverage": (k[keep] / n).tolist(),
        "risk": (err[keep] / k[keep]).tolist(),
        "threshold": thr[keep].tolist(),
        "aurc": aurc,
    }


def choose_threshold(conf_val: np.ndarray, right_val: np.ndarray,
                     target_error: float = TARGET_ERROR) -> dict[str, Any]:
    """The val-chosen confidence threshold (module docstring). Takes val data only."""
    conf_val = np.asarray(conf_val, dtype=np.float64)
    out: dict[str, Any] = {
        "target_error": float(target_error),
        "confidence": "max class probability (after calibration)",
        "rule": "accept when confidence >= threshold; threshold = lowest val confidence "
                "whose val selective risk <= target_error",
        "chosen_on": "val",
        "n_val": int(conf_val.size),
    }
    if conf_val.size == 0:
        return {**out, "threshold": None, "feasible": False, "val_coverage": None,
                "val_risk": None}
    thr, k, err = _ordered(conf_val, right_val)
    ok = np.flatnonzero(err / k <= target_error + 1e-12)
    if ok.size:
        j = int(ok.max())  # the lowest threshold (largest coverage) meeting the target
        return {**out, "threshold": float(thr[j]), "feasible": True,
                "val_coverage": float(k[j] / conf_val.size), "val_risk": float(err[j] / k[j])}
    return {**out, "threshold": float(np.nextafter(conf_val.max(), math.inf)), "feasible": False,
            "val_coverage": 0.0, "val_risk": None}


def abstain_mask(conf: np.ndarray, threshold: float | None) -> np.ndarray:
    """True where the model abstains (confidence below the threshold); none without one."""
    conf = np.asarray(conf, dtype=np.float64)
    if threshold is None:
        return np.zeros(conf.shape, dtype=bool)
    return conf < float(threshold)


def selective_at(conf: np.ndarray, right: np.ndarray, threshold: float | None,
                 weights: np.ndarray | None = None) -> dict[str, Any]:
    """Coverage, abstention rate and selective risk at `threshold`; with bootstrap `weights`
    (b, n) also their 95 % CIs (resamples with nothing accepted are left out of the risk's)."""
    from featsvm.evaluation.metrics import _interval

    conf = np.asarray(conf, dtype=np.float64)
    right = np.asarray(right, dtype=bool)
    n = conf.size
    acc = ~abstain_mask(conf, threshold)
    k = int(acc.sum())
    out: dict[str, Any] = {
        "threshold": threshold,
        "n": n,
        "n_accepted": k,
        "coverage": k / n if n else None,
        "abstention_rate": 1 - k / n if n else None,
        "risk": float((~right[acc]).mean()) if k else None,
        "n_errors_accepted": int((~right[acc]).sum()),
    }
    if weights is not None and n:
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        tot = w.sum(axis=1)
        wa = w @ acc.astype(float)
        we = w @ (acc & ~right).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = np.where(tot > 0, wa / np.where(tot > 0, tot, 1), np.nan)
            risk = np.where(wa > 0, we / np.where(wa > 0, wa, 1), np.nan)
        out["ci95"] = {"coverage": _interval(cov), "risk": _interval(risk),
                       "abstention_rate": _interval(1 - cov)}
    return out
