"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no display,
no pyplot global state) and saved so that re-drawing the same data gives the same bytes.

Every function takes plain data (rows, predictions, images) and a path; none reads run
folders, so each can be tested on its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report is drawn on servers and in CI

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from featsvm.fileio import atomic_path  # noqa: E402
from featsvm.labels import DISPLAY_NAMES, LABELS, MALIGNANT  # noqa: E402

# The four metrics of the reference study, in its order: (row key, axis label).
FOUR_METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("precision", "Precision"),
)
_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3")
DPI = 110

matplotlib.rcParams["svg.hashsalt"] = "featsvm"  # stable ids should anyone save SVG


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Save atomically, without the 'Software' text chunk, so identical figures give identical
    files."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


def metric_bars(rows: Sequence[dict], path: str | os.PathLike[str], split: str = "test") -> Path:
    """Figure 4 of the reference study: grouped bars of accuracy, sensitivity, specificity and
    precision per model, with 95 % CI error bars where the row has them.

    `rows` are report table rows (fractions in [0, 1]; `<metric>_ci` = [lo, hi] or None);
    a row whose ``source`` is ``published`` is drawn hatched and labelled as published.
    """
    n = len(rows)
    fig = _new_figure(max(7.0, 1.15 * n + 3.5), 5.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(FOUR_METRICS)
    x = np.arange(n)
    for j, (key, label) in enumerate(FOUR_METRICS):
        vals = np.array([_num(r.get(key)) for r in rows], dtype=float)
        pos = x + (j - (len(FOUR_METRICS) - 1) / 2) * width
        bars = ax.bar(pos, np.nan_to_num(vals), width, label=label, color=_COLOURS[j])
        for bar, r, v in zip(bars, rows, vals, strict=True):
            if r.get("source") == "published":
                bar.set_hatch("//")
                bar.set_edgecolor("white")
            if np.isfinite(v) and v >= 0.25:  # the value, written inside the bar's top
                ax.text(bar.get_x() + bar.get_width() / 2, v - 0.02, f"{100 * v:.1f}",
                        rotation=90, ha="center", va="top", fontsize=6.5, color="white",
                        fontweight="bold")
        # error bars only where the row has a CI (the published row has none)
        err_x, err_v, err_lo, err_hi = [], [], [], []
        for p, r, v in zip(pos, rows, vals, strict=True):
            ci = r.get(f"{key}_ci")
            if ci and np.isfinite(v) and ci[0] is not None and ci[1] is not None:
                err_x.append(p)
                err_v.append(v)
                err_lo.append(max(0.0, v - float(ci[0])))
                err_hi.append(max(0.0, float(ci[1]) - v))
        if err_x:
            ax.errorbar(err_x, err_v, yerr=np.array([err_lo, err_hi]), fmt="none",
                        ecolor="#222222", elinewidth=0.8, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels([_wrap(r.get("label") or r["model"]) for r in rows], rotation=30,
                       ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"{split} split (sens./spec./prec.: malignant vs benign)")
    ax.set_title("Accuracy (4-class), sensitivity, specificity, precision with 95 % CI\n"
                 "hatched = published by the reference study, not measured here", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def confusion_pair(
    counts: np.ndarray, title: str, path: str | os.PathLike[str],
    labels: Sequence[str] = LABELS,
) -> Path:
    """Figures 6-8: the 4-class confusion matrix (counts) beside its row-normalised version
    (each true class sums to 1, so recall per class reads on the diagonal)."""
    counts = np.asarray(counts, dtype=float)
    row_sums = counts.sum(axis=1, keepdims=True)
    normed = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)
    names = [DISPLAY_NAMES.get(lab, lab).replace(" (hematogone)", "") for lab in labels]
    fig = _new_figure(10.0, 4.6)
    for k, (mat, sub, fmt) in enumerate(
        ((counts, "counts", "{:.0f}"), (normed, "row-normalised (recall)", "{:.2f}"))
    ):
        ax = fig.add_subplot(1, 2, k + 1)
        vmax = mat.max() if mat.size and mat.max() > 0 else 1.0
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=vmax)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if mat[i, j] > 0.6 * vmax else "black")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(sub, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def roc_curves(
    true_labels: Sequence[str], proba: np.ndarray, title: str, path: str | os.PathLike[str],
) -> Path:
    """One-vs-rest ROC curve per class plus malignant-vs-benign (sum of the malignant
    probabilities), AUC in the legend. A class absent from the split has no curve (its AUC is
    undefined) and is named as such in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.array([LABELS.index(t) for t in true_labels])
    proba = np.asarray(proba, dtype=float)
    fig = _new_figure(5.6, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    # near-perfect curves hug the corner: an inset magnifies FPR <= 0.2, TPR >= 0.8
    zoom = ax.inset_axes((0.38, 0.36, 0.58, 0.36))
    curves: list[tuple[np.ndarray, np.ndarray, dict]] = []
    for k, lab in enumerate(LABELS):
        pos = y == k
        name = DISPLAY_NAMES.get(lab, lab)
        if pos.all() or not pos.any():
            ax.plot([], [], color=_COLOURS[k], label=f"{name}: not in split")
            continue
        fpr, tpr, _ = roc_curve(pos, proba[:, k])
        auc = roc_auc_score(pos, proba[:, k])
        curves.append((fpr, tpr, {"color": _COLOURS[k], "lw": 1.4,
                                  "label": f"{name} vs rest (AUC {auc:.3f})"}))
    mal = np.isin(np.array(true_labels), sorted(MALIGNANT))
    if mal.any() and not mal.all():
        score = proba[:, [LABELS.index(m) for m in LABELS if m in MALIGNANT]].sum(axis=1)
        fpr, tpr, _ = roc_curve(mal, score)
        auc = roc_auc_score(mal, score)
        curves.append((fpr, tpr, {"color": "black", "lw": 1.6, "ls": "--",
                                  "label": f"malignant vs benign (AUC {auc:.3f})"}))
    for fpr, tpr, style in curves:
        ax.plot(fpr, tpr, **style)
        zoom.plot(fpr, tpr, **{k: v for k, v in style.items() if k != "label"})
    zoom.set_xlim(-0.005, 0.2)
    zoom.set_ylim(0.8, 1.005)
    zoom.tick_params(labelsize=6)
    zoom.set_title("zoom: top-left corner", fontsize=6)
    zoom.grid(alpha=0.3)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlim(-0.01, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


@dataclass(frozen=True)
class Tile:
    """One image of the example grid with its caption."""

    image: np.ndarray  # H x W x 3 uint8
    true_label: str
    pred_label: str
    prob: float  # probability of the predicted class


def example_grid(
    panels: Sequence[tuple[str, Sequence[Tile]]], path: str | os.PathLike[str], ncols: int = 6,
) -> Path:
    """Figure 5: rows of test images, each caption giving true class, predicted class and its
    probability (green when right, red when wrong). `panels` = (row title, tiles) pairs."""
    nrows = max(1, len(panels))
    fig = _new_figure(1.9 * ncols + 0.4, 2.25 * nrows + 0.3)
    for r, (row_title, tiles) in enumerate(panels):
        for c in range(ncols):
            ax = fig.add_subplot(nrows, ncols, r * ncols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c == 0:
                ax.set_ylabel(_wrap(row_title, 22), fontsize=7)
            if c >= len(tiles):
                if c == 0:
                    ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=8,
                            transform=ax.transAxes)
                continue
            t = tiles[c]
            ok = t.true_label == t.pred_label
            ax.imshow(t.image)
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color("#2a9d2a" if ok else "#d62728")
                spine.set_linewidth(2.0)
            ax.set_title(
                f"true: {_short(t.true_label)}\npred: {_short(t.pred_label)} ({t.prob:.2f})",
                fontsize=7, color="#1b6e1b" if ok else "#b01c1c",
            )
    fig.tight_layout()
    return save_png(fig, path)


def _short(label: str) -> str:
    return DISPLAY_NAMES.get(label, label).replace(" (hematogone)", "")


def _num(v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _wrap(text: str, width: int = 18) -> str:
    """Break a long model name at ' + ' or spaces so tick labels stay readable."""
    if len(text) <= width:
        return text
    words, lines, cur = text.split(" "), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines)
