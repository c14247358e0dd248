"""The sections of the report's HTML page, in order (`SECTIONS`). Each is a small function
that takes the gathered `ReportContext`, draws its own figures into ``ctx.out_dir`` if it has
any, and returns a `featsvm.evaluation.html.Section` (or None to leave itself out).

Adding a section = one function here + one partial under ``templates/sections/`` + one entry
in `SECTIONS` (keep ``notes`` last: sections may add notes while they are built).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featsvm.evaluation import figures
from featsvm.evaluation import provenance as prov
from featsvm.evaluation import table as tbl
from featsvm.evaluation import trust_report as trust
from featsvm.evaluation.html import Figure, Section
from featsvm.fileio import sha256_file
from featsvm.labels import LABELS
from featsvm.runs import Predictions, RunRecord

FIG4, FIG5 = "fig4_metrics.png", "fig5_examples.png"
CV_TABLE_CSV, CV_TABLE_JSON, SHORTCUT_MD = "cv_table.csv", "cv_table.json", "shortcut.md"
POOLED = "pooled"  # the metrics block of cross-validation runs (featsvm.models.cv)
CONFUSION_PREFIX, ROC_PREFIX = "confusion-", "roc-"


@dataclass
class ReportContext:
    """Everything the sections read, gathered once by `featsvm.evaluation.report`."""

    runs: list[RunRecord]  # in table order (`table.run_order`)
    runs_dir: Path
    out_dir: Path
    split: str  # the split the table and figures describe
    rows: list[dict[str, Any]]  # table rows, published row last
    labels: dict[str, str]  # run id -> its row's label
    preds: dict[str, Predictions]  # run id -> its predictions on `split`
    best: list[RunRecord]  # the best runs, ranked on val
    rank_how: str  # how `best` was chosen, in words
    data_dir: Path | None  # image folder for example images (None: not available)
    examples: int  # images per example-grid row
    notes: list[str] = field(default_factory=list)
    cv_runs: list[RunRecord] = field(default_factory=list)  # kind "cv": pooled K-fold CV
    cv_rows: list[dict[str, Any]] = field(default_factory=list)  # their table rows (pooled)


# ---------------------------------------------------------------- data the sections share


def confusion_counts(pred: Predictions) -> np.ndarray:
    mat = np.zeros((len(LABELS), len(LABELS)), dtype=int)
    for t, p in zip(pred.true_label, pred.pred_label, strict=True):
        mat[LABELS.index(t), LABELS.index(p)] += 1
    return mat


def rank_runs(runs: Sequence[RunRecord]) -> tuple[list[RunRecord], str]:
    """Runs ordered best first by validation macro-F1 then balanced accuracy (never test).
    Returns the order and a sentence saying how it was chosen."""
    def score(r: RunRecord) -> tuple:
        v = r.metrics.get("val") or {}
        return (-float(v.get("macro_f1") or -1), -float(v.get("balanced_accuracy") or -1),
                r.run_id)

    if any(r.metrics.get("val") for r in runs):
        how = "ranked by validation macro-F1 (then balanced accuracy); the test split was not used"
    else:
        how = "no run has a validation block, so the order is by run id"
    return sorted(runs, key=score), how



def _example_order(pred: Predictions) -> tuple[list[int], list[int]]:
    """Correct examples (one per class in turn, by relpath) and wrong ones (most confident
    mistakes first)."""
    conf = pred.proba.max(axis=1)
    correct = [i for i in range(len(pred.relpath)) if pred.true_label[i] == pred.pred_label[i]]
    wrong = [i for i in range(len(pred.relpath)) if pred.true_label[i] != pred.pred_label[i]]
    by_class = {lab: sorted((i for i in correct if pred.true_label[i] == lab),
                            key=lambda i: pred.relpath[i]) for lab in LABELS}
    order_c: list[int] = []
    while any(by_class.values()):
        for lab in LABELS:
            if by_class[lab]:
                order_c.append(by_class[lab].pop(0))
    return order_c, sorted(wrong, key=lambda i: (-conf[i], pred.relpath[i]))


def _tiles(run: RunRecord, pred: Predictions, order: Sequence[int], data_dir: Path,
           per_row: int, notes: list[str]) -> list[figures.Tile]:
    """Up to `per_row` example tiles in `order`; images that are missing or changed are
    skipped with a note."""
    from featsvm.data.dataset import ImageError, load_rgb

    conf = pred.proba.max(axis=1)
    out: list[figures.Tile] = []
    for i in order:
        if len(out) >= per_row:
            break
        path = data_dir / pred.relpath[i]
        try:
            if not path.is_file():
                raise ImageError("not found")
            if pred.sha256[i] and sha256_file(path) != pred.sha256[i]:
                raise ImageError("sha256 differs from the run's record (another dataset?)")
            im = load_rgb(path)
        except ImageError as exc:
            notes.append(f"{run.run_id}: example image {pred.relpath[i]} skipped ({exc})")
            continue
        im.thumbnail((160, 160))
        out.append(figures.Tile(np.asarray(im), pred.true_label[i], pred.pred_label[i],
                                float(conf[i])))
    return out


# ---------------------------------------------------------------- the sections


def intro(ctx: ReportContext) -> Section:
    return Section("", "intro.html.j2", {"n_runs": len(ctx.runs), "split": ctx.split})


def cv_table(ctx: ReportContext) -> Section | None:
    """The headline table: pooled out-of-fold predictions of K-fold CV over all images."""
    if not ctx.cv_rows:
        return None
    spread = {r.run_id: (r.metrics.get("fold_spread") or {}).get("accuracy") for r in ctx.cv_runs}
    folds = {r.run_id: (r.config.get("cv") or {}).get("folds") for r in ctx.cv_runs}

    def fold_cell(run_id: str) -> str:
        s = spread.get(run_id)
        return "–" if not s else (f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} "
                                  f"({100 * s['min']:.1f}–{100 * s['max']:.1f})")

    rows = [{"cells": [*tbl.cells(r), fold_cell(r["run_id"])], "published": False}
            for r in ctx.cv_rows]
    n = max((r.get("n") or 0) for r in ctx.cv_rows)
    return Section(f"Pooled cross-validation: every image scored once (n = {n})",
                   "cv_table.html.j2", {
                       "header": [*tbl.header(), "Accuracy per fold: mean ± sd (min–max)"],
                       "rows": rows, "folds": sorted({f for f in folds.values() if f}),
                       "csv": CV_TABLE_CSV, "json": CV_TABLE_JSON})


def shortcut_table(ctx: ReportContext) -> tuple[list[Any], str, list[str]]:
    """Shortcut-check rows on the pooled CV predictions when there are CV runs, else on the
    reported split; (rows, block, notes)."""
    from featsvm.evaluation.shortcut import shortcut_rows

    block, runs = (POOLED, ctx.cv_runs) if ctx.cv_runs else (ctx.split, ctx.runs)
    rows, notes = shortcut_rows(runs, block)
    return rows, block, notes


def shortcut_check(ctx: ReportContext) -> Section | None:
    from featsvm.evaluation.shortcut import BASELINES, COLOUR

    rows, block, notes = shortcut_table(ctx)
    if not rows:
        return None
    ctx.notes.extend(notes)
    table = []
    for r in rows:
        cells = []
        for base in BASELINES:
            d = r.versus.get(base)
            cells.append("–" if d is None else
                         f"{100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, "
                         f"{100 * d['ci95'][1]:+.1f}]")
        table.append([r.model, str(r.n), f"{100 * r.score:.1f}", *cells])
    sentences = [line for r in rows for line in r.sentences()]
    missing = not any(r.versus.get(COLOUR) for r in rows)
    return Section("Shortcut check", "shortcut_check.html.j2", {
        "block": "pooled cross-validation" if block == POOLED else f"the {block} split",
        "header": ["Model", "n", "Balanced acc. %", "vs colour_stats (points)",
                   "vs annotation_box (points)"],
        "rows": table, "sentences": sentences, "missing": missing, "md": SHORTCUT_MD})


def comparison_table(ctx: ReportContext) -> Section:
    rows = [{"cells": tbl.cells(r), "published": r["source"] == "published"} for r in ctx.rows]
    return Section("Comparison table", "comparison_table.html.j2", {
        "header": tbl.header(), "rows": rows, "csv": tbl.TABLE_CSV, "json": tbl.TABLE_JSON})


def metric_bars(ctx: ReportContext) -> Section:
    path = figures.metric_bars(ctx.rows, ctx.out_dir / FIG4, ctx.split)
    return Section("Figure 4: the four metrics per model",
                   figures=[Figure(path, "grouped bar chart of four metrics")])


def confusion_matrices(ctx: ReportContext) -> Section:
    figs = []
    for r in ctx.runs:
        p = ctx.preds[r.run_id]
        if not p.relpath:
            continue
        path = figures.confusion_pair(
            confusion_counts(p), f"{ctx.labels[r.run_id]}: {ctx.split} split, n={len(p.relpath)}",
            ctx.out_dir / f"{CONFUSION_PREFIX}{r.run_id}.png",
        )
        figs.append(Figure(path, f"confusion matrix {r.run_id}", heading=ctx.labels[r.run_id],
                           aside=r.run_id))
    return Section("Figures 6-8: confusion matrices", figures=figs)


def example_images(ctx: ReportContext) -> Section:
    """Figure 5: correct and wrong test images of the best models (needs the image folder)."""
    path = None
    data_dir = ctx.data_dir
    if data_dir is None:
        ctx.notes.append("Figure 5 (example images) skipped: no image folder given (--data DIR)")
    elif not data_dir.is_dir():
        ctx.notes.append(f"Figure 5 (example images) skipped: image folder {data_dir} not found")
    elif ctx.best:
        panels: list[tuple[str, Sequence[figures.Tile]]] = []
        for r in ctx.best:
            pred = ctx.preds[r.run_id]
            order_c, order_w = _example_order(pred)
            name = ctx.labels[r.run_id]
            panels += [
                (f"{name}: correct",
                 _tiles(r, pred, order_c, data_dir, ctx.examples, ctx.notes)),
                (f"{name}: wrong", _tiles(r, pred, order_w, data_dir, ctx.examples, ctx.notes)),
            ]
        if any(tiles for _, tiles in panels):
            path = figures.example_grid(panels, ctx.out_dir / FIG5, ncols=ctx.examples)
        else:
            ctx.notes.append(
                f"Figure 5 skipped: none of the test images were found under {data_dir}")
    figs = [Figure(path, "grid of example test images")] if path is not None else []
    return Section("Figure 5: example test images from the best models", "example_images.html.j2",
                   {"best": [ctx.labels[r.run_id] for r in ctx.best], "rank_how": ctx.rank_how,
                    "drawn": path is not None}, figs)


def roc_curves(ctx: ReportContext) -> Section:
    figs = []
    for r in ctx.best:
        p = ctx.preds[r.run_id]
        path = figures.roc_curves(
            p.true_label, p.proba, f"{ctx.labels[r.run_id]}: one-vs-rest ROC, {ctx.split} split",
            ctx.out_dir / f"{ROC_PREFIX}{r.run_id}.png",
        )
        figs.append(Figure(path, f"ROC {r.run_id}"))
    return Section("One-vs-rest ROC curves of the best models", figures=figs)


def _share(v: Any, area: Any) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f} % ({100 * area:.1f} %)" if area is not None else f"{100 * v:.1f} %"


def _rho(block: Any) -> str:
    if not block or block.get("spearman_mean") is None:
        return "–"
    return f"{block['spearman_mean']:.2f} (n={block['n_images']})"


def where_it_looks(ctx: ReportContext) -> Section | None:
    """Where each model looks: the `featsvm explain --split` summaries found in the run
    folders (left out when no run has one)."""
    from featsvm.evaluation.explanations import (
        ANNOTATION_BOX,
        EXAMPLES_PNG,
        EXPLAIN_DIR,
        read_where,
    )

    rows, figs, missing = [], [], []
    for r in ctx.runs:
        w = read_where(r.path)
        if w is None:
            missing.append(ctx.labels[r.run_id])
            continue
        share, area = w.get("share") or {}, w.get("area") or {}
        rnd = w.get("randomisation") or {}
        corner, corner_area = share.get("corner"), area.get("corner")
        rows.append({
            "model": ctx.labels[r.run_id], "method": w.get("method"),
            "n": f"{w.get('n_images')} of {w.get('n_split')} ({w.get('split')})",
            "cells": _share(share.get("cells"), area.get("cells")),
            "background": _share(share.get("background"), area.get("background")),
            "corner": _share(corner, corner_area),
            "corner_flag": corner is not None and corner_area is not None
            and corner > 2 * corner_area,
            "rho_top": _rho(rnd.get("top")), "rho_all": _rho(rnd.get("all")),
        })
        png = Path(r.path) / EXPLAIN_DIR / EXAMPLES_PNG
        if png.is_file():
            figs.append(Figure(png, f"heatmaps {r.run_id}", heading=ctx.labels[r.run_id],
                               aside=f"{w.get('method')}, {r.run_id}"))
    if not rows:
        return None
    box = f"{100 * ANNOTATION_BOX[0]:.0f} % x {100 * ANNOTATION_BOX[1]:.0f} %"
    return Section("Where the models look", "where_it_looks.html.j2",
                   {"rows": rows, "missing": missing, "split": ctx.split, "box": box}, figs)


def calibration(ctx: ReportContext) -> Section | None:
    """ECE / Brier before and after temperature scaling, and one reliability diagram per run."""
    from featsvm.evaluation.calibration import DEFINITION

    rows = trust.calibration_rows(ctx.runs, ctx.split)
    have = [r for r in rows if r["ece_after"] is not None]
    if not have:
        return None
    out = [{"model": ctx.labels.get(r["run_id"], r["model"]), "method": r["method"] or "n/a",
            "temperature": "n/a" if r["temperature"] is None else f"{r['temperature']:.3f}",
            "ece_val": f"{trust._num(r['ece_val_before'])} → {trust._num(r['ece_val_after'])}",
            "ece": f"{trust._num(r['ece_before'])} → "
                   f"{trust._num(r['ece_after'], r['ece_after_ci'])}",
            "brier": f"{trust._num(r['brier_before'])} → "
                     f"{trust._num(r['brier_after'], r['brier_after_ci'])}"} for r in have]
    missing = [ctx.labels.get(r["run_id"], r["model"]) for r in rows if r["ece_after"] is None]
    path = trust.reliability_figure(ctx.runs, ctx.out_dir / trust.RELIABILITY_FIG, ctx.split)
    figs = [Figure(path, "reliability diagrams")] if path is not None else []
    return Section("Calibration", "calibration.html.j2",
                   {"rows": out, "missing": missing, "split": ctx.split,
                    "definition": DEFINITION}, figures=figs)


def abstention(ctx: ReportContext) -> Section | None:
    """The val-chosen confidence threshold per run: coverage and error on the reported split."""
    rows = [r for r in trust.selective_rows(ctx.runs, ctx.split) if r["target_error"] is not None]
    if not rows:
        return None
    targets = sorted({f"{100 * r['target_error']:g} %" for r in rows})
    out = []
    for r in rows:
        thr = "n/a" if r["threshold"] is None else f"{r['threshold']:.4f}"
        if r["feasible"] is False:
            thr += " (target not met on val: abstains on everything)"
        out.append({"model": ctx.labels.get(r["run_id"], r["model"]),
                    "target": trust._pct(r["target_error"]), "threshold": thr,
                    "val_coverage": trust._pct(r["val_coverage"]),
                    "coverage": trust._pct(r["coverage"], r["coverage_ci"]),
                    "risk": trust._pct(r["risk"], r["risk_ci"]),
                    "aurc": trust._num(r["aurc"])})
    path = trust.coverage_risk_figure(ctx.runs, ctx.out_dir / trust.COVERAGE_FIG, ctx.split)
    figs = [Figure(path, "coverage-risk curves")] if path is not None else []
    return Section("Abstention (selective prediction)", "abstention.html.j2",
                   {"rows": out, "split": ctx.split, "target": " / ".join(targets)},
                   figures=figs)


def another_lab(ctx: ReportContext) -> Section | None:
    """Every run on the external sets it was evaluated on (`featsvm evaluate`), with ROC
    curves of P(malignant)."""
    sets, figs = [], []
    for name, rows in sorted(trust.external_rows(ctx.runs).items()):
        r0 = rows[0]
        unit = r0["unit"] or "image"
        summary = (f"{r0['n_images']} images from {r0['n_subjects']} "
                   f"{'subjects' if unit == 'subject' else 'images (no subject regex)'}; 95 % "
                   f"CIs by bootstrap over {unit}s"
                   + ("." if unit == "subject" else
                      " - too narrow when several cells come from one person."))
        out = [{"model": ctx.labels.get(r["run_id"], r["model"]),
                "roc_auc": trust._num(r["roc_auc"], r["roc_auc_ci"]),
                "sensitivity": trust._pct(r["sensitivity"], r["sensitivity_ci"]),
                "specificity": trust._pct(r["specificity"], r["specificity_ci"]),
                "precision": trust._pct(r["precision"]),
                "called_malignant": trust._pct(r["predicted_malignant_share"]),
                "abstention": trust._pct(r["abstention"], r["abstention_ci"]),
                "thr": f"{trust._pct(r['thr_sensitivity'])} / {trust._pct(r['thr_specificity'])}",
                "ece": trust._num(r["ece"]),
                "ood": trust.ood_text(r)} for r in rows]
        sets.append({"name": name, "summary": summary, "rows": out})
        path = trust.external_roc_figure(
            ctx.runs, name, ctx.out_dir / f"{trust.EXTERNAL_ROC_PREFIX}{name}.png")
        if path is not None:
            figs.append(Figure(path, f"ROC curves on {name}", heading=f"{name}: ROC curves"))
    if not sets:
        return None
    return Section("Another lab", "another_lab.html.j2", {"sets": sets}, figures=figs)


def split_protocol(ctx: ReportContext) -> Section:
    lines, _ = prov.split_protocol(ctx.runs, ctx.runs_dir)
    return Section("Split protocol", "split_protocol.html.j2", {"lines": lines})


def dataset(ctx: ReportContext) -> Section:
    return Section("Dataset", "dataset.html.j2", {
        "name": prov.DATASET_NAME, "doi": prov.DATASET_DOI,
        "data_dir": str(ctx.data_dir) if ctx.data_dir else ""})


def weight_provenance(ctx: ReportContext) -> Section:
    return Section("Weight provenance", "weight_provenance.html.j2",
                   {"provenance": prov.weight_provenance(ctx.runs)})


def run_list(ctx: ReportContext) -> Section:
    rows = [{"run_id": r.run_id, "model": str(r.config.get("model")),
             "kind": str(r.config.get("kind")), "seed": str(r.config.get("seed")),
             "settings": prov.run_settings(r.config), "created": str(r.config.get("created"))}
            for r in [*ctx.runs, *ctx.cv_runs]]
    return Section("Runs", "runs.html.j2", {"runs": rows})


def versions(ctx: ReportContext) -> Section:
    return Section("Versions", "versions.html.j2", {"versions": prov.collect_versions(ctx.runs)})


def notes(ctx: ReportContext) -> Section | None:
    return Section("Notes", "notes.html.j2", {"notes": list(ctx.notes)}) if ctx.notes else None


# The page, top to bottom. Figures are drawn while the sections are built, in this order.
SECTIONS: tuple[Callable[[ReportContext], Section | None], ...] = (
    intro,
    cv_table,  # the headline: every image scored once (when the study ran cross-validation)
    shortcut_check,
    comparison_table,
    metric_bars,
    confusion_matrices,
    example_images,
    roc_curves,
    where_it_looks,
    calibration,
    abstention,
    another_lab,
    split_protocol,
    dataset,
    weight_provenance,
    run_list,
    versions,
    notes,  # last: the notes of every section above
)


def build_sections(ctx: ReportContext) -> list[Section]:
    return [s for s in (make(ctx) for make in SECTIONS) if s is not None]
