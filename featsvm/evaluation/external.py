"""Scoring another lab's labelled images (`featsvm evaluate`) and reading stored results.

`score_external` computes every number of an external evaluation from true labels
(``benign`` / ``malignant`` or the four canonical labels), the run's probabilities (LABELS
columns), one subject per image and the run's val-chosen confidence threshold:

* ROC-AUC of ``P(malignant)`` (sum of the three malignant class probabilities);
* sensitivity, specificity, precision, accuracy at the run's **own decision** (arg-max class
  malignant or not);
* the same over the images not abstained on at the **val-chosen confidence threshold**
  (`featsvm.evaluation.selective`), with the abstention rate (overall and per true class);
* ECE and Brier score of the malignant-vs-benign probabilities (confidence = probability of
  the predicted side), and of the four classes when the labels have subtypes (plus the full
  four-class metric block);
* the out-of-distribution rate: the share of images the run's OOD flag
  (`featsvm.evaluation.ood`, threshold at 95 % of its in-lab val images) calls unlike its
  training images, overall and per true class, beside the run's own in-lab test rate; runs
  without a flag (end-to-end models, runs made before the flag) say "not available";
* 95 % percentile-bootstrap CIs resampling the given subjects (pass file names to resample
  images).

Results live in ``<run>/external/<name>/{predictions.csv,metrics.json}``; `read_external`
and `read_external_predictions` read them back for the report.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featsvm.evaluation import calibration as cal
from featsvm.evaluation import selective as sel
from featsvm.evaluation.metrics import (
    N_BOOT,
    _interval,
    _weighted_auc,
    group_resample_weights,
    json_safe,
    score_block,
)
from featsvm.labels import BENIGN, LABELS, MALIGNANT
from featsvm.runs import PROB_COLUMNS

MALIGNANT_LABEL = "malignant"
EXTERNAL_LABELS = (*LABELS, MALIGNANT_LABEL)
EXTERNAL_DIR = "external"
CSV_COLUMNS = ("file", "sha256", "subject", "true_label", "pred_label", "prob_malignant",
               *PROB_COLUMNS, "confidence", "abstain", "ood")
_MAL_COLS = [LABELS.index(m) for m in LABELS if m in MALIGNANT]


def _rates(w: np.ndarray, y: np.ndarray, pred: np.ndarray, keep: np.ndarray
           ) -> dict[str, np.ndarray]:
    """Weighted binary counts and rates for every row of `w` (b, n), over images in `keep`."""
    def cnt(mask: np.ndarray) -> np.ndarray:
        return w @ (mask & keep).astype(np.float64)

    tp, fn = cnt(y & pred), cnt(y & ~pred)
    fp, tn = cnt(~y & pred), cnt(~y & ~pred)
    with np.errstate(invalid="ignore", divide="ignore"):
        def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)

        return {
            "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "precision": ratio(tp, tp + fp), "accuracy": ratio(tp + tn, tp + tn + fp + fn),
            "tp": tp, "fn": fn, "fp": fp, "tn": tn,
        }


def _block(point: dict[str, np.ndarray], boot: dict[str, np.ndarray] | None) -> dict[str, Any]:
    out: dict[str, Any] = {k: (float(v[0]) if k in ("sensitivity", "specificity", "precision",
                                                    "accuracy") else int(v[0]))
                           for k, v in point.items()}
    if boot is not None:
        out["ci95"] = {k: _interval(boot[k]) for k in ("sensitivity", "specificity",
                                                        "precision", "accuracy")}
    return out


def score_external(true_labels: Sequence[str], proba: np.ndarray, subjects: Sequence[str],
                   threshold: float | None, n_boot: int = N_BOOT, seed: int = 0,
                   bootstrap_unit: str = "subject", ood: Sequence[bool] | None = None,
                   ood_unavailable: str = "") -> dict[str, Any]:
    """Every external metric (module docstring) from labels, probabilities (LABELS columns),
    subjects (one per image; pass the file names to bootstrap over images), the run's
    val-chosen confidence threshold and the run's OOD flag of each image (None: the run has
    no flag; `ood_unavailable` says why)."""
    proba = np.asarray(proba, dtype=np.float64)
    n = len(true_labels)
    y = np.array([lab != BENIGN for lab in true_labels], dtype=bool)
    p_mal = proba[:, _MAL_COLS].sum(axis=1)
    pred = np.array([LABELS[i] in MALIGNANT for i in proba.argmax(axis=1)], dtype=bool)
    conf = cal.confidence(proba)
    abstain = sel.abstain_mask(conf, threshold)
    ones = np.ones((1, n))
    w = group_resample_weights(list(subjects), n_boot, seed) if n_boot > 0 else None
    everyone = np.ones(n, dtype=bool)

    auc = _weighted_auc(p_mal, y, ones)[0]
    out: dict[str, Any] = {
        "n_images": n,
        "n_subjects": len(set(subjects)),
        "counts": {"malignant": int(y.sum()), "benign": int((~y).sum())},
        "task": "four_class" if all(t in LABELS for t in true_labels) else "binary",
        "roc_auc": None if not np.isfinite(auc) else float(auc),
        "own_decision": _block(_rates(ones, y, pred, everyone),
                               _rates(w, y, pred, everyone) if w is not None else None),
        "predicted_malignant_share": float(pred.mean()) if n else None,
    }
    acc_block = _block(_rates(ones, y, pred, ~abstain),
                       _rates(w, y, pred, ~abstain) if w is not None else None)
    sel_point = sel.selective_at(conf, pred == y, threshold, w)
    out["at_threshold"] = {
        "threshold": threshold,
        "rule": "abstain when the max class probability < threshold (chosen on the run's val "
                "split); metrics over the images not abstained on",
        "abstention_rate": sel_point["abstention_rate"],
        "abstention_rate_malignant": float(abstain[y].mean()) if y.any() else None,
        "abstention_rate_benign": float(abstain[~y].mean()) if (~y).any() else None,
        "n_accepted": sel_point["n_accepted"],
        **acc_block,
    }
    if "ci95" in sel_point:
        out["at_threshold"].setdefault("ci95", {})["abstention_rate"] = \
            sel_point["ci95"]["abstention_rate"]
    bconf, bright = cal.binary_confidence(p_mal, y, decision=pred)
    binary_cal: dict[str, Any] = {
        "confidence": "probability of the predicted side (P(malignant) when the arg-max class "
                      "is malignant, else P(benign))",
        "ece": cal.ece(bconf, bright),
        "brier": float(np.mean((p_mal - y) ** 2)) if n else None,
        "n_bins": cal.N_BINS,
        "bins": cal.reliability_bins(bconf, bright),
    }
    if w is not None:
        out["ci95"] = {"roc_auc": _interval(_weighted_auc(p_mal, y, w))}
        per = (p_mal - y) ** 2
        binary_cal["ci95"] = {"ece": _interval(np.asarray(cal.ece(bconf, bright, weights=w))),
                              "brier": _interval((w @ per) / w.sum(axis=1))}
    out["calibration"] = {"binary": binary_cal}
    out["ood"] = ood_block(ood, y, w, ood_unavailable)
    if out["task"] == "four_class":
        t = np.array([LABELS.index(v) for v in true_labels])
        out["calibration"]["four_class"] = cal.summary(proba, t, weights=w)
        groups = {s: i for i, s in enumerate(dict.fromkeys(subjects))}
        block = score_block(list(true_labels), proba, [groups[s] for s in subjects],
                            n_boot=n_boot, seed=seed)
        block["bootstrap"]["unit"] = bootstrap_unit
        out["four_class"] = block
    out["bootstrap"] = {"n_boot": int(n_boot), "seed": int(seed), "unit": bootstrap_unit,
                        "method": "percentile", "level": 0.95}
    return json_safe(out)



OOD_RULE = ("flagged when the image's embedding is further from the run's training "
            "embeddings than 95 % of its in-lab val images (featsvm.evaluation.ood)")


def ood_block(ood: Sequence[bool] | None, y: np.ndarray, w: np.ndarray | None,
              unavailable: str = "") -> dict[str, Any]:
    """The OOD rate of an external set (overall, per true class, bootstrap CI with the
    weights `w`), or ``available: false`` with the reason."""
    if ood is None:
        return {"available": False, "rate": None,
                "reason": unavailable or "the run has no out-of-distribution flag"}
    flags = np.asarray(ood, dtype=bool)
    out: dict[str, Any] = {
        "available": True, "rule": OOD_RULE,
        "rate": float(flags.mean()) if flags.size else None,
        "n_flagged": int(flags.sum()),
        "rate_malignant": float(flags[y].mean()) if y.any() else None,
        "rate_benign": float(flags[~y].mean()) if (~y).any() else None,
    }
    if w is not None and flags.size:
        out["ci95"] = {"rate": _interval((w @ flags.astype(np.float64)) / w.sum(axis=1))}
    return out


def read_external(run_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{name: metrics}`` of every external evaluation stored in a run folder."""
    out: dict[str, dict[str, Any]] = {}
    base = Path(run_dir) / EXTERNAL_DIR
    if not base.is_dir():
        return out
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        try:
            value = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            out[d.name] = value
    return out


def read_external_predictions(run_dir: str | os.PathLike[str], name: str
                              ) -> tuple[list[str], np.ndarray]:
    """(true labels, P(malignant)) of a stored external evaluation (for ROC curves)."""
    path = Path(run_dir) / EXTERNAL_DIR / name / "predictions.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["true_label"] for r in rows], np.array([float(r["prob_malignant"]) for r in rows])
