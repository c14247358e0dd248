"""Report sections for calibration, abstention and other labs' images (from run records).

Reads only what the runs stored: ``metrics.json`` blocks ``calibration`` and ``selective``
(`featsvm.evaluation.trust`) and ``<run>/external/<name>/`` (`featsvm.evaluation.external`).
Runs made before these blocks existed show "n/a". Tables are plain rows (dicts) with
Markdown renderers; figures are drawn with `featsvm.evaluation.figures`' helpers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featsvm.evaluation import external
from featsvm.evaluation.figures import _COLOURS, _new_figure, save_png
from featsvm.evaluation.table import id_suffix
from featsvm.runs import RunRecord

RELIABILITY_FIG = "reliability.png"
COVERAGE_FIG = "coverage-risk.png"
EXTERNAL_ROC_PREFIX = "external-roc-"
TRUST_MD = "trust.md"


def _label(run: RunRecord) -> str:
    return str(run.config.get("model") or run.run_id)


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _pct(v: Any, ci: Any = None, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    text = f"{100 * float(v):.{digits}f} %"
    if ci:
        text += f" [{100 * ci[0]:.{digits}f}, {100 * ci[1]:.{digits}f}]"
    return text


def _num(v: Any, ci: Any = None, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    text = f"{float(v):.{digits}f}"
    if ci:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


# ---------------------------------------------------------------- calibration


def calibration_rows(runs: Sequence[RunRecord], split: str = "test") -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        c = r.metrics.get("calibration") or {}
        before = _get(c, "before", split) or {}
        after = _get(c, "after", split) or {}
        rows.append({
            "model": _label(r), "run_id": r.run_id, "kind": r.config.get("kind"),
            "method": c.get("method"), "temperature": c.get("temperature"),
            "ece_before": before.get("ece"), "ece_after": after.get("ece"),
            "ece_after_ci": _get(after, "ci95", "ece"),
            "brier_before": before.get("brier"), "brier_after": after.get("brier"),
            "brier_after_ci": _get(after, "ci95", "brier"),
            "ece_val_before": _get(c, "before", "val", "ece"),
            "ece_val_after": _get(c, "after", "val", "ece"),
            "n": after.get("n"),
        })
    return rows


def calibration_markdown(rows: Sequence[dict[str, Any]], split: str = "test") -> str:
    head = (f"| model | calibration | T | ECE val before → after | ECE {split} before → after "
            f"[95 % CI] | Brier {split} before → after [95 % CI] |")
    out = [head, "|---|---|---:|---|---|---|"]
    for r in rows:
        t = "n/a" if r["temperature"] is None else f"{r['temperature']:.3f}"
        out.append(
            f"| {r['model']} | {r['method'] or 'n/a'} | {t} | {_num(r['ece_val_before'])} → "
            f"{_num(r['ece_val_after'])} | {_num(r['ece_before'])} → "
            f"{_num(r['ece_after'], r['ece_after_ci'])} | {_num(r['brier_before'])} → "
            f"{_num(r['brier_after'], r['brier_after_ci'])} |")
    return "\n".join(out) + "\n"


def reliability_figure(runs: Sequence[RunRecord], path: str | os.PathLike[str],
                       split: str = "test") -> Path | None:
    """One reliability diagram per run (grid of panels): accuracy against mean confidence per
    bin, before (grey) and after (colour) temperature scaling, bin counts as bar widths."""
    have = [r for r in runs if _get(r.metrics, "calibration", "after", split)]
    if not have:
        return None
    ncols = min(4, len(have))
    nrows = (len(have) + ncols - 1) // ncols
    fig = _new_figure(3.0 * ncols, 3.0 * nrows)
    for i, r in enumerate(have):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        c = r.metrics["calibration"]
        for when, colour, width in (("before", "#999999", 1.0), ("after", _COLOURS[0], 1.6)):
            block = _get(c, when, split)
            if not block:
                continue
            bins = [b for b in block["bins"] if b["count"]]
            xs = [b["confidence"] for b in bins]
            ys = [b["accuracy"] for b in bins]
            ax.plot(xs, ys, marker="o", ms=3, color=colour, lw=width,
                    label=f"{when} (ECE {block['ece']:.3f})")
        after = _get(c, "after", split)
        centres = [(b["lower"] + b["upper"]) / 2 for b in after["bins"]]
        counts = np.array([b["count"] for b in after["bins"]], dtype=float)
        if counts.sum():
            ax.bar(centres, counts / counts.sum(), width=1 / len(centres), color=_COLOURS[0],
                   alpha=0.15, label="share of images")
        t = c.get("temperature")
        ax.set_title(f"{_label(r)}" + ("" if t is None else f"\nT = {t:.2f}"), fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("confidence (max probability)", fontsize=6)
        ax.set_ylabel("accuracy", fontsize=6)
        ax.legend(fontsize=5, loc="upper left")
    n_bins = len(have[0].metrics["calibration"]["after"][split]["bins"])
    fig.suptitle(f"Reliability, {split} split ({n_bins} equal-width bins)", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


# ---------------------------------------------------------------- abstention


def selective_rows(runs: Sequence[RunRecord], split: str = "test") -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        s = r.metrics.get("selective") or {}
        at = s.get(split) or {}
        rows.append({
            "model": _label(r), "run_id": r.run_id,
            "target_error": s.get("target_error"), "threshold": s.get("threshold"),
            "feasible": s.get("feasible"), "val_coverage": s.get("val_coverage"),
            "coverage": at.get("coverage"), "coverage_ci": _get(at, "ci95", "coverage"),
            "risk": at.get("risk"), "risk_ci": _get(at, "ci95", "risk"),
            "n": at.get("n"), "n_accepted": at.get("n_accepted"),
            "aurc": _get(s, "curve", split, "aurc"),
        })
    return rows


def selective_markdown(rows: Sequence[dict[str, Any]], split: str = "test") -> str:
    out = [f"| model | target error | threshold (val) | val coverage | {split} coverage [95 % CI] "
           f"| {split} error when not abstaining [95 % CI] | AURC |",
           "|---|---:|---:|---:|---|---|---:|"]
    for r in rows:
        thr = "n/a" if r["threshold"] is None else f"{r['threshold']:.4f}"
        if r["feasible"] is False:
            thr += " (target not met on val: abstains on all)"
        out.append(
            f"| {r['model']} | {_pct(r['target_error'])} | {thr} | {_pct(r['val_coverage'])} | "
            f"{_pct(r['coverage'], r['coverage_ci'])} | {_pct(r['risk'], r['risk_ci'])} | "
            f"{_num(r['aurc'])} |")
    return "\n".join(out) + "\n"


def coverage_risk_figure(runs: Sequence[RunRecord], path: str | os.PathLike[str],
                         split: str = "test") -> Path | None:
    """Coverage-risk curves of every run (selective error against coverage), the target error
    as a dotted line and each run's val-chosen operating point as a dot."""
    have = [r for r in runs if _get(r.metrics, "selective", "curve", split, "coverage")]
    if not have:
        return None
    fig = _new_figure(6.4, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    styles = ("-", "--", "-.", ":")
    for i, r in enumerate(have):
        s = r.metrics["selective"]
        cur = s["curve"][split]
        colour = _COLOURS[i % len(_COLOURS)]
        ax.plot(cur["coverage"], cur["risk"], color=colour, ls=styles[(i // 5) % 4], lw=1.2,
                label=_label(r))
        at = s.get(split) or {}
        if at.get("coverage"):
            ax.plot([at["coverage"]], [at["risk"] or 0.0], "o", color=colour, ms=4)
    target = have[0].metrics["selective"].get("target_error")
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=0.8, label=f"target error {target:.0%}")
    ax.set_xlabel("coverage (share of images not abstained on)")
    ax.set_ylabel("error among accepted images")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(bottom=0)
    ax.set_title(f"Coverage-risk, {split} split (dots: val-chosen threshold)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    return save_png(fig, path)


# ---------------------------------------------------------------- another lab


def external_rows(runs: Sequence[RunRecord]) -> dict[str, list[dict[str, Any]]]:
    """``{external set name: rows}`` from every run's stored external evaluations."""
    out: dict[str, list[dict[str, Any]]] = {}
    labels = [_label(r) for r in runs]
    for r, label in zip(runs, labels, strict=True):
        if labels.count(label) > 1:  # two runs of one model: the run id's date-time
            label = f"{label} ({id_suffix(r.run_id)})"
        for name, m in external.read_external(r.path).items():
            own, thr = m.get("own_decision") or {}, m.get("at_threshold") or {}
            out.setdefault(name, []).append({
                "model": label, "run_id": r.run_id, "name": name,
                "n_images": m.get("n_images"), "n_subjects": m.get("n_subjects"),
                "unit": _get(m, "bootstrap", "unit"),
                "roc_auc": m.get("roc_auc"), "roc_auc_ci": _get(m, "ci95", "roc_auc"),
                "sensitivity": own.get("sensitivity"),
                "sensitivity_ci": _get(own, "ci95", "sensitivity"),
                "specificity": own.get("specificity"),
                "specificity_ci": _get(own, "ci95", "specificity"),
                "precision": own.get("precision"),
                "thr_sensitivity": thr.get("sensitivity"),
                "thr_specificity": thr.get("specificity"),
                "abstention": thr.get("abstention_rate"),
                "abstention_ci": _get(thr, "ci95", "abstention_rate"),
                "ece": _get(m, "calibration", "binary", "ece"),
                "predicted_malignant_share": m.get("predicted_malignant_share"),
                "ood_available": _get(m, "ood", "available"),
                "ood_rate": _get(m, "ood", "rate"),
                "ood_ci": _get(m, "ood", "ci95", "rate"),
                "ood_in_lab": _get(m, "ood", "in_lab_test_rate"),
            })
    return out


def external_markdown(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    unit = r0["unit"] or "image"
    out = [f"{r0['name']}: {r0['n_images']} images, {r0['n_subjects']} "
           f"{'subjects' if unit == 'subject' else 'images'}; 95 % CIs by bootstrap over "
           f"{unit}s" + ("" if unit == "subject" else
                        " (no subject regex: too narrow when cells of one person are alike)"),
           "",
           "| model | ROC-AUC P(malignant) | sensitivity | specificity | precision | "
           "abstained | sensitivity / specificity when not abstaining | ECE | "
           "flagged out of distribution (in-lab test) |",
           "|---|---|---|---|---|---|---|---:|---|"]
    for r in rows:
        out.append(
            f"| {r['model']} | {_num(r['roc_auc'], r['roc_auc_ci'])} | "
            f"{_pct(r['sensitivity'], r['sensitivity_ci'])} | "
            f"{_pct(r['specificity'], r['specificity_ci'])} | {_pct(r['precision'])} | "
            f"{_pct(r['abstention'], r['abstention_ci'])} | {_pct(r['thr_sensitivity'])} / "
            f"{_pct(r['thr_specificity'])} | {_num(r['ece'])} | {ood_text(r)} |")
    return "\n".join(out) + "\n"


def ood_text(row: dict[str, Any]) -> str:
    """The OOD-rate cell of an external-table row: rate [CI] (in-lab test rate), or why not."""
    if not row.get("ood_available"):
        return "not available (no OOD flag in this run)"
    return (f"{_pct(row['ood_rate'], row['ood_ci'])} (in-lab test "
            f"{_pct(row['ood_in_lab'])})")


def external_roc_figure(runs: Sequence[RunRecord], name: str, path: str | os.PathLike[str]
                        ) -> Path | None:
    """Malignant-vs-benign ROC curves of every run on external set `name`, chance diagonal."""
    from sklearn.metrics import roc_curve

    fig = _new_figure(5.6, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    styles = ("-", "--", "-.", ":")
    for i, r in enumerate(runs):
        try:
            labels, p_mal = external.read_external_predictions(r.path, name)
        except (OSError, KeyError, ValueError):
            continue
        y = np.array([lab != "benign" for lab in labels])
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, p_mal)
        auc = _get(external.read_external(r.path).get(name), "roc_auc")
        ax.plot(fpr, tpr, color=_COLOURS[i % len(_COLOURS)], ls=styles[(i // 5) % 4], lw=1.2,
                label=f"{_label(r)} (AUC {auc:.3f})" if auc is not None else _label(r))
        drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("false positive rate (benign called malignant)")
    ax.set_ylabel("true positive rate (malignant found)")
    ax.set_title(f"Another lab ({name}): malignant vs benign", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return save_png(fig, path)


def trust_markdown(runs: Sequence[RunRecord], split: str = "test") -> str:
    """The calibration, abstention and another-lab tables as one Markdown file."""
    from featsvm.evaluation.calibration import DEFINITION

    parts = [f"# Calibration ({split} split)\n", DEFINITION + "\n",
             calibration_markdown(calibration_rows(runs, split), split),
             f"\n# Abstention ({split} split; threshold chosen on val)\n",
             selective_markdown(selective_rows(runs, split), split)]
    ext = external_rows(runs)
    if ext:
        parts.append("\n# Another lab (evaluation only; not in-lab numbers)\n")
        for name in sorted(ext):
            parts += [f"\n## {name}\n", external_markdown(ext[name])]
    return "\n".join(parts)
