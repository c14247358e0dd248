"""Shortcut check: every model beside the two shortcut baselines, with paired differences.

The baselines (`featsvm.features.handcrafted`: ``colour_stats``, 27 colour numbers of the whole
image; ``annotation_box``, the burnt-in scale-annotation corner alone) see no cell morphology.
A model is compared with a baseline on the **same images** (the pooled CV predictions of both,
or the same test split), the **same head** and the **same view** (a cell-view model beside the
colour statistics of the cells, a whole-field model beside those of the field), by the
difference of their balanced accuracy. An ensemble counts with its members' common head and
view.
Its 95 % CI is a paired percentile bootstrap over duplicate groups: each resample draws groups
with replacement and scores both models on it, so the interval is that of the difference, not
of two separate scores. A model "does not beat" a baseline when that interval does not lie
above zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featsvm.data.manifest import read_manifest
from featsvm.errors import FeatsvmError
from featsvm.evaluation.metrics import CI_LEVEL, group_resample_weights, label_indices
from featsvm.labels import LABELS
from featsvm.names import BASELINES
from featsvm.runs import Predictions, RunRecord

METRIC = "balanced_accuracy"
COLOUR, ANNOTATION = BASELINES
BASELINE_WORDS = {COLOUR: "27 colour numbers", ANNOTATION: "the annotation corner alone"}


def _balanced_accuracy(true_idx: np.ndarray, correct: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Balanced accuracy for every row of weights `w` (b, n): mean over the classes present of
    the weighted share of correct images."""
    k = len(LABELS)
    onehot = np.zeros((len(true_idx), k))
    onehot[np.arange(len(true_idx)), true_idx] = 1.0
    support = w @ onehot  # (b, k)
    hits = w @ (onehot * correct[:, None])
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, hits / np.where(present, support, 1.0), 0.0)
    return recall.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def paired_difference(
    true_labels: Sequence[str],
    pred_a: Sequence[str],
    pred_b: Sequence[str],
    groups: Sequence[Any],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Balanced accuracy of A, of B, and of A - B with a paired group-bootstrap 95 % CI."""
    t = label_indices(true_labels)
    ca = (label_indices(pred_a) == t).astype(float)
    cb = (label_indices(pred_b) == t).astype(float)
    ones = np.ones((1, len(t)))
    a, b = float(_balanced_accuracy(t, ca, ones)[0]), float(_balanced_accuracy(t, cb, ones)[0])
    w = group_resample_weights(groups, n_boot, seed)
    diff = _balanced_accuracy(t, ca, w) - _balanced_accuracy(t, cb, w)
    alpha = (1 - CI_LEVEL) / 2
    lo, hi = np.quantile(diff, [alpha, 1 - alpha])
    return {"a": a, "b": b, "diff": a - b, "ci95": [float(lo), float(hi)], "n": len(t),
            "n_boot": n_boot, "seed": seed}


@dataclass
class ShortcutRow:
    model: str  # the model's display name
    run_id: str
    head: str
    block: str  # "pooled" (CV) or "test"
    n: int
    score: float  # the model's balanced accuracy
    versus: dict[str, dict[str, Any] | None]  # baseline -> paired_difference (None: missing)

    def sentences(self) -> list[str]:
        out = []
        d = self.versus.get(COLOUR)
        if d is not None and d["ci95"][0] <= 0:
            out.append(
                f"{self.model} does not beat {BASELINE_WORDS[COLOUR]} ({COLOUR} + {self.head}): "
                f"balanced accuracy {100 * d['a']:.1f} % vs {100 * d['b']:.1f} %, difference "
                f"{100 * d['diff']:+.1f} points [95 % CI {100 * d['ci95'][0]:+.1f}, "
                f"{100 * d['ci95'][1]:+.1f}]."
            )
        return out


def _groups_for(run: RunRecord, pred: Predictions) -> tuple[list[Any], str]:
    """Duplicate group of every predicted image, from the run's split manifest (when it is
    still there with the recorded sha256); else one group per image (said so)."""
    split = run.config.get("split") or {}
    path = Path(str(split.get("path") or ""))
    if path.is_file():
        try:
            man = read_manifest(path)
        except FeatsvmError:
            man = None
        if man is not None and man.sha256 == split.get("sha256"):
            by_rel = {r.relpath: r.group for r in man.rows}
            if all(p in by_rel for p in pred.relpath):
                return [by_rel[p] for p in pred.relpath], "duplicate group"
    return list(range(len(pred.relpath))), "image (split manifest not found)"


def _head_view(run: RunRecord) -> tuple[Any, str | None]:
    """(head, view) of a run; for an ensemble, those its members share as its record lists
    them (None where they differ), so an ensemble of logistic cell models is set beside the
    logistic baseline of the cells."""
    members = run.config.get("members")
    if run.config.get("kind") != "ensemble" or not members:
        pre = run.config.get("preprocessing") or {}
        return run.config.get("head"), str(pre.get("view") or "field")
    heads = {m.get("head") for m in members}
    views = {m.get("view") for m in members}
    return (heads.pop() if len(heads) == 1 else None), (views.pop() if len(views) == 1 else None)


def shortcut_rows(
    runs: Sequence[RunRecord], block: str, n_boot: int = 1000, seed: int = 0
) -> tuple[list[ShortcutRow], list[str]]:
    """One row per non-baseline run that has `block` ("pooled" or "test"), compared with the
    baseline run of the same head on the same images. Returns the rows and notes."""
    preds: dict[str, Predictions] = {}
    usable = []
    for r in runs:
        if not (r.metrics.get(block) or {}).get("n"):
            continue
        preds[r.run_id] = r.predictions().select(block)
        usable.append(r)
    baselines = {(r.config.get("backbone"), *_head_view(r)): r for r in usable
                 if r.config.get("backbone") in BASELINES}
    rows: list[ShortcutRow] = []
    notes: list[str] = []
    units: set[str] = set()
    for r in usable:
        if r.config.get("backbone") in BASELINES:
            continue
        p = preds[r.run_id]
        groups, unit = _groups_for(r, p)
        units.add(unit)
        order = {rel: i for i, rel in enumerate(p.relpath)}
        versus: dict[str, dict[str, Any] | None] = {}
        head, view = _head_view(r)
        for base in BASELINES:
            br = baselines.get((base, head, view))
            if br is None:
                versus[base] = None
                continue
            bp = preds[br.run_id]
            if sorted(bp.relpath) != sorted(p.relpath):
                versus[base] = None
                notes.append(f"{r.config.get('model')} and {br.config.get('model')} were scored "
                             f"on different images ({block}); no paired difference")
                continue
            b_pred = [""] * len(p.relpath)
            for rel, lab in zip(bp.relpath, bp.pred_label, strict=True):
                b_pred[order[rel]] = lab
            versus[base] = paired_difference(p.true_label, p.pred_label, b_pred, groups,
                                             n_boot, seed)
        score = float(_balanced_accuracy(
            label_indices(p.true_label),
            (label_indices(p.pred_label) == label_indices(p.true_label)).astype(float),
            np.ones((1, len(p.relpath))))[0])
        rows.append(ShortcutRow(str(r.config.get("model")), r.run_id,
                                str(head), block, len(p.relpath), score, versus))
    if any(u != "duplicate group" for u in units):
        notes.append("some paired bootstraps resample single images: their split manifest "
                     "was not found")
    return rows, notes


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def rows_markdown(rows: Sequence[ShortcutRow]) -> str:
    head = ("| model | n | balanced acc. % | − colour_stats (points, 95 % CI) | "
            "− annotation_box (points, 95 % CI) |")
    out = [head, "|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for base in BASELINES:
            d = r.versus.get(base)
            cells.append("–" if d is None else
                         f"{100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, "
                         f"{100 * d['ci95'][1]:+.1f}]")
        out.append(f"| {r.model} | {r.n} | {_pct(r.score)} | {cells[0]} | {cells[1]} |")
    return "\n".join(out)
