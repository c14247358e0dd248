"""The report's comparison table: one row per run record plus the reference study's published
row, written as Markdown, CSV and JSON (`featsvm.evaluation.report` writes the files).

A row holds the values of a run's metrics.json unrounded; only the Markdown / HTML cells
(`header` / `cells`) round them for reading.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from featsvm.runs import RunRecord

TABLE_MD, TABLE_CSV, TABLE_JSON = "table.md", "table.csv", "table.json"

# (table column, dotted path inside a metrics.json split block; the same path keys ci95)
METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", "accuracy"),
    ("binary_accuracy", "binary.accuracy"),
    ("sensitivity", "binary.sensitivity"),
    ("specificity", "binary.specificity"),
    ("precision", "binary.precision"),
    ("macro_f1", "macro_f1"),
    ("balanced_accuracy", "balanced_accuracy"),
    ("mcc", "mcc"),
    ("roc_auc_ovr", "roc_auc_ovr"),
)
METRIC_TITLES = {
    "accuracy": "Accuracy (4-class)",
    "binary_accuracy": "Accuracy (binary)",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "precision": "Precision",
    "macro_f1": "Macro-F1",
    "balanced_accuracy": "Balanced acc.",
    "mcc": "MCC",
    "roc_auc_ovr": "ROC-AUC (OvR)",
}
# Keys looked up in config.json "timing" (first one present wins).
TRAIN_TIME_KEYS = ("fit_seconds", "train_seconds")
EXTRACT_SPEED_KEYS = ("extract_images_per_s", "images_per_s")

# Ghongade et al. 2023, VGG16 transfer learning on the same Kaggle dataset: their published
# figures (random image-level split), shown for comparison and never mixed with our numbers.
PUBLISHED_ROW: dict[str, Any] = {
    "source": "published",
    "model": "VGG16 (reference study, published)",
    "run_id": "",
    "kind": "published",
    "backbone": "vgg16",
    "head": "",
    "weights": "ImageNet (as published)",
    "accuracy": 0.94,
    "sensitivity": 0.82,
    "specificity": 0.68,
    "precision": 0.86,
}

# The columns of the Markdown and HTML tables (the CSV and JSON hold every column).
MD_COLUMNS: tuple[str, ...] = (
    "accuracy", "sensitivity", "specificity", "precision", "macro_f1", "balanced_accuracy",
    "mcc", "roc_auc_ovr",
)
CSV_COLUMNS: tuple[str, ...] = (
    "model", "source", "run_id", "kind", "backbone", "head", "weights", "weights_sha256",
    "split", "n",
    *(x for col, _ in METRIC_COLUMNS for x in (col, f"{col}_ci_lo", f"{col}_ci_hi")),
    "train_seconds", "extract_images_per_s",
)


# ---------------------------------------------------------------- rows


def _dotted(block: dict[str, Any], path: str) -> Any:
    cur: Any = block
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _first(d: dict[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def run_row(run: RunRecord, split: str = "test") -> dict[str, Any]:
    """One table row for one run: the values are copied, unrounded, from metrics.json."""
    cfg = run.config
    block = run.metrics.get(split) or {}
    ci = block.get("ci95") or {}
    weights = cfg.get("weights") or {}
    timing = cfg.get("timing") or {}
    row: dict[str, Any] = {
        "source": "measured",
        "model": str(cfg.get("model") or run.run_id),
        "run_id": run.run_id,
        "kind": cfg.get("kind"),
        "backbone": cfg.get("backbone") or "",
        "head": cfg.get("head") or "",
        "weights": weights.get("label", ""),
        "weights_sha256": weights.get("sha256") or "",
        "split": split,
        "n": block.get("n"),
    }
    for col, path in METRIC_COLUMNS:
        row[col] = _dotted(block, path)
        row[f"{col}_ci"] = ci.get(path)
    row["train_seconds"] = _first(timing, TRAIN_TIME_KEYS)
    row["extract_images_per_s"] = _first(timing, EXTRACT_SPEED_KEYS)
    return row


def run_order(run: RunRecord) -> tuple:
    """Sort key of runs in the table and the report: heads first, then end-to-end models
    (pooled-CV runs of either the same way); each group by backbone, head, model name and run
    id."""
    c = run.config
    return (not c.get("head"), str(c.get("backbone") or ""), str(c.get("head") or ""),
            str(c.get("model") or ""), run.run_id)


def build_table(runs: Sequence[RunRecord], split: str = "test") -> list[dict[str, Any]]:
    """Measured rows (in `run_order`) and the published reference row last."""
    rows = [run_row(r, split) for r in sorted(runs, key=run_order)]
    names = [r["model"] for r in rows]
    for r in rows:  # two runs of one model: tell them apart by the run id's date-time
        r["label"] = (r["model"] if names.count(r["model"]) == 1
                      else f"{r['model']} ({id_suffix(r['run_id'])})")
    pub = {col: None for col in rows[0]} if rows else {}
    pub.update(PUBLISHED_ROW)
    pub["label"] = PUBLISHED_ROW["model"]
    pub["split"] = "published"
    return [*rows, pub]


def id_suffix(run_id: str) -> str:
    parts = run_id.split("-")
    return "-".join(parts[-2:]) if len(parts) >= 3 else run_id


# ---------------------------------------------------------------- cells


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * float(v):.1f}"


def _ci_ok(ci: Any) -> bool:
    return isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci


def fmt_metric(row: dict[str, Any], col: str) -> str:
    """A metric cell: percent with its 95 % CI in brackets (MCC as a coefficient)."""
    v = row.get(col)
    if v is None:
        return "–"
    if col == "mcc":
        text = f"{float(v):.3f}"
        ci = row.get(f"{col}_ci")
        return f"{text} [{float(ci[0]):.3f}, {float(ci[1]):.3f}]" if _ci_ok(ci) else text
    text = _pct(v)
    ci = row.get(f"{col}_ci")
    return f"{text} [{_pct(ci[0])}, {_pct(ci[1])}]" if _ci_ok(ci) else text


def fmt_other(v: Any, digits: int = 1) -> str:
    return "–" if v is None else f"{float(v):.{digits}f}"


def header() -> list[str]:
    """Column titles of the Markdown / HTML table."""
    return ["Model", "Source", "n", *(METRIC_TITLES[c] for c in MD_COLUMNS),
            "Train s", "Extract img/s"]


def cells(row: dict[str, Any]) -> list[str]:
    """One row of the Markdown / HTML table, as text."""
    return [
        row["label"],
        row["source"],
        "" if row.get("n") is None else str(row["n"]),
        *(fmt_metric(row, c) for c in MD_COLUMNS),
        fmt_other(row.get("train_seconds")),
        fmt_other(row.get("extract_images_per_s")),
    ]


# ---------------------------------------------------------------- formats


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Percentages with 95 % CI in brackets (MCC as a coefficient)."""
    head = header()
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        row_cells = cells(r)
        row_cells[0] = row_cells[0].replace("|", "/")
        lines.append("| " + " | ".join(row_cells) + " |")
    lines.append("")
    lines.append(
        "Values in % on the test split with bootstrap 95 % CI over duplicate groups; sensitivity, "
        "specificity and precision are binary (malignant = Early Pre-B, Pre-B, Pro-B, positive). "
        "The published row is the reference study's own figure (random split), not measured here."
    )
    return "\n".join(lines) + "\n"


def table_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        flat = dict(r)
        for col, _ in METRIC_COLUMNS:
            ci = r.get(f"{col}_ci")
            flat[f"{col}_ci_lo"], flat[f"{col}_ci_hi"] = (ci[0], ci[1]) if _ci_ok(ci) else ("", "")
        w.writerow(["" if flat.get(c) is None else flat.get(c) for c in CSV_COLUMNS])
    return buf.getvalue()


def table_json(rows: Sequence[dict[str, Any]], split: str) -> dict[str, Any]:
    return {"split": split, "rows": list(rows)}
