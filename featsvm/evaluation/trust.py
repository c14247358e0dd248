"""The calibration and abstention blocks of a run record, the same for every kind of run.

`run_blocks` takes the val and test probabilities before and after the run's temperature
scaling (fitted on val by the caller) and returns

* ``metrics["calibration"]``: the definition, the temperature, and ECE / Brier / NLL /
  reliability bins per split, ``before`` and ``after`` temperature scaling (test blocks with
  bootstrap CIs over duplicate groups);
* ``metrics["selective"]``: the val-chosen confidence threshold for the target error, the
  coverage and selective risk it gives on val and on test (test with CIs), and the
  coverage-risk curves;
* ``config["abstention"]``: what `featsvm predict` and `featsvm evaluate` need to abstain
  (threshold, target error, where it was chosen).

The threshold is computed from val arrays only; test arrays are only scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from featsvm.evaluation import calibration as cal
from featsvm.evaluation import selective as sel
from featsvm.evaluation.metrics import N_BOOT, group_resample_weights, json_safe, label_indices


def run_blocks(
    val: tuple[Sequence[str], np.ndarray | None, np.ndarray, Sequence[Any]],
    test: tuple[Sequence[str], np.ndarray | None, np.ndarray, Sequence[Any]],
    temperature: float | None,
    method: str,
    target_error: float = sel.TARGET_ERROR,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(metrics calibration block, metrics selective block, config abstention block).

    `val` / `test` are (true labels, probabilities before calibration or None, probabilities
    after, duplicate groups)."""
    calib: dict[str, Any] = {
        "definition": cal.DEFINITION,
        "method": method,
        "fitted_on": "val",
        "temperature": temperature,
        "before": {},
        "after": {},
    }
    conf: dict[str, np.ndarray] = {}
    right: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray | None] = {}
    for name, (labels, before, after, groups) in (("val", val), ("test", test)):
        t = label_indices(list(labels))
        if not len(t):
            continue
        w = group_resample_weights(list(groups), n_boot, seed) if n_boot > 0 else None
        weights[name] = w
        if before is not None:
            calib["before"][name] = cal.summary(before, t, weights=w)
        calib["after"][name] = cal.summary(after, t, weights=w)
        conf[name] = cal.confidence(after)
        right[name] = cal.correct(after, t)
    # chosen on val only
    choice = sel.choose_threshold(conf.get("val", np.zeros(0)), right.get("val", np.zeros(0)),
                                  target_error)
    selective: dict[str, Any] = {**choice, "curve": {}}
    for name in conf:
        selective[name] = sel.selective_at(conf[name], right[name], choice["threshold"],
                                           weights[name])
        selective["curve"][name] = sel.coverage_risk_curve(conf[name], right[name])
    abstention = {k: choice[k] for k in ("threshold", "target_error", "feasible", "chosen_on",
                                         "confidence", "rule")}
    return json_safe(calib), json_safe(selective), json_safe(abstention)


def summary_lines(metrics: dict[str, Any], split: str = "test") -> list[str]:
    """Two plain-text lines for the command line: calibration before -> after, and the
    val-chosen abstention threshold with its coverage and error on `split`."""
    out: list[str] = []
    c = metrics.get("calibration") or {}
    after = (c.get("after") or {}).get(split)
    if after:
        before = (c.get("before") or {}).get(split)
        t = c.get("temperature")
        was = (f"{before['ece']:.3f} -> " if before and before.get("ece") is not None else "")
        wasb = (f"{before['brier']:.3f} -> " if before and before.get("brier") is not None
                else "")
        out.append(f"calibration ({c.get('method')}"
                   + ("" if t is None else f", T = {t:.3f}") + f", fitted on val): {split} ECE "
                   f"{was}{after['ece']:.3f}, Brier {wasb}{after['brier']:.3f}")
    s = metrics.get("selective") or {}
    at = s.get(split)
    if at and s.get("threshold") is not None:
        ci = at.get("ci95") or {}

        def pct(v: Any, lo_hi: Any) -> str:
            if v is None:
                return "n/a"
            return f"{100 * v:.1f} %" + (f" [{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]"
                                         if lo_hi else "")

        out.append(f"abstention: confidence < {s['threshold']:.4f} (chosen on val for "
                   f"{100 * s['target_error']:g} % error"
                   + ("" if s.get("feasible") else "; not reachable on val, abstains on all")
                   + f"): {split} coverage {pct(at['coverage'], ci.get('coverage'))}, "
                   f"error when not abstaining {pct(at['risk'], ci.get('risk'))}")
    return out
