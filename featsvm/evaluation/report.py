"""`featsvm report`: compare every run record in one table, the reference study's figures
and a self-contained HTML page.

Reads only the run-record contract (`featsvm.runs`), so a head on cached embeddings and a
CNN trained end to end are treated alike. Output (all deterministic: re-running on the same
runs gives byte-identical files):

* ``table.md`` / ``table.csv`` / ``table.json``: one row per run plus the reference study's
  published VGG16 row (labelled published, not measured) (`featsvm.evaluation.table`);
* ``cv_table.csv`` / ``cv_table.json``: the pooled cross-validation runs (kind ``cv``, every
  image scored once), the page's headline table, and ``shortcut.md``: every model beside the
  two shortcut baselines (`featsvm.evaluation.shortcut`);
* ``trust.md``: calibration, abstention and "Another lab" tables; ``external.json``: the rows
  of the "Another lab" tables (`featsvm.evaluation.trust_report.external_rows`), when any run
  was evaluated on another lab's images (`featsvm evaluate`);
* ``fig4_metrics.png``: grouped bars of the four metrics with 95 % CIs;
* ``confusion-<run>.png``: counts and row-normalised confusion matrices (Figures 6-8);
* ``fig5_examples.png``: test images with true / predicted class and probability for the best
  models (needs the image folder: ``data_dir``);
* ``roc-<run>.png``: one-vs-rest ROC curves for the best models;
* ``index.html``: all of the above with the split protocol, dataset, weight provenance and
  library versions, images embedded as base64 (`featsvm.evaluation.sections` lists the page's
  sections, `featsvm.evaluation.html` renders them through a Jinja2 template).

"Best" models are ranked on the **validation** split (macro-F1, then balanced accuracy), never
on test, so picking what to show cannot tune anything on the test split.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featsvm.errors import MissingInputError
from featsvm.evaluation.html import render_page
from featsvm.evaluation.provenance import weight_provenance
from featsvm.evaluation.sections import (
    CONFUSION_PREFIX,
    CV_TABLE_CSV,
    CV_TABLE_JSON,
    FIG4,
    FIG5,
    POOLED,
    ROC_PREFIX,
    SHORTCUT_MD,
    ReportContext,
    build_sections,
    rank_runs,
    shortcut_table,
)
from featsvm.evaluation.shortcut import rows_markdown
from featsvm.evaluation.table import (
    TABLE_CSV,
    TABLE_JSON,
    TABLE_MD,
    build_table,
    run_order,
    table_csv,
    table_json,
    table_markdown,
)
from featsvm.evaluation.trust_report import (
    EXTERNAL_ROC_PREFIX,
    TRUST_MD,
    external_rows,
    trust_markdown,
)
from featsvm.fileio import write_json_atomic, write_text_atomic
from featsvm.runs import RunRecord, is_pooled_cv, list_runs

__all__ = ["HTML_FILE", "ReportConfig", "ReportResult", "weight_provenance", "write_report"]

HTML_FILE = "index.html"
EXTERNAL_JSON = "external.json"
PAGE_TITLE = "featsvm report"
PAGE_HEADING = "featsvm report: pretrained CNN features + classical heads vs end-to-end CNNs"


@dataclass(frozen=True)
class ReportConfig:
    """The ``[report]`` table of a study config."""

    best: int = 3  # how many best models get the example grid and ROC curves
    examples: int = 6  # images per grid row (one row of correct, one of wrong per model)
    split: str = "test"  # the split the table and figures describe

    def __post_init__(self) -> None:
        from featsvm.config import ConfigError

        if self.best < 0 or self.examples < 1:
            raise ConfigError(f"[report] best must be >= 0 and examples >= 1 (got best="
                              f"{self.best}, examples={self.examples})")
        if self.split not in ("val", "test"):
            raise ConfigError(f"[report] split must be 'val' or 'test', got {self.split!r}")


@dataclass
class ReportResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    best_run_ids: list[str] = field(default_factory=list)


def write_report(
    runs_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    config: ReportConfig | None = None,
    only: Collection[str] | None = None,
) -> ReportResult:
    """Read every complete run under `runs_dir` and write the report into `out_dir`.

    `data_dir` is the image folder the runs' relpaths are relative to; without it the example
    grid (Figure 5) is skipped with a note. `only`: restrict to these run ids (what `featsvm
    run` made or reused), leaving other runs in the folder out. Raises MissingInputError when
    there are no runs.
    """
    cfg = config or ReportConfig()
    out_dir = Path(out_dir)
    ctx = gather(Path(runs_dir), out_dir, data_dir, cfg, only)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = ReportResult(out_dir=out_dir, rows=ctx.rows, notes=ctx.notes,
                       best_run_ids=[r.run_id for r in ctx.best])
    res.files += write_tables(ctx.rows, out_dir, cfg.split)
    res.files += write_cv_tables(ctx, out_dir)
    write_text_atomic(out_dir / TRUST_MD, trust_markdown(ctx.runs, cfg.split))
    res.files.append(out_dir / TRUST_MD)
    res.files += write_external_rows(ctx.runs, out_dir)
    sections = build_sections(ctx)  # draws the figures
    res.files += [f.path for s in sections for f in s.figures]
    _remove_stale(out_dir, {p.name for p in res.files})
    write_text_atomic(out_dir / HTML_FILE, render_page(PAGE_TITLE, PAGE_HEADING, sections))
    res.files.append(out_dir / HTML_FILE)
    return res


def gather(runs_dir: Path, out_dir: Path, data_dir: str | os.PathLike[str] | None,
           cfg: ReportConfig, only: Collection[str] | None) -> ReportContext:
    """Read the runs and everything the sections need: table rows, predictions on the
    reported split, the best runs (ranked on val) and the image folder."""
    runs, incomplete = list_runs(runs_dir)
    if only is not None:
        wanted = set(only)
        runs = [r for r in runs if r.run_id in wanted]
        incomplete = [n for n in incomplete if n.split(":")[0] in wanted]
    if not runs:
        raise MissingInputError(
            f"no complete run records under {runs_dir}; create some with `featsvm fit`, "
            "`featsvm finetune` or `featsvm run CONFIG.toml`"
            + (f" (incomplete folders: {', '.join(incomplete)})" if incomplete else "")
        )
    notes = [f"incomplete or broken run folder skipped: {name}" for name in incomplete]
    cv_runs = sorted((r for r in runs if is_pooled_cv(r.config)), key=run_order)
    runs = [r for r in runs if not is_pooled_cv(r.config)]
    rows = build_table(runs, cfg.split)
    notes += [f"{r.run_id}: metrics.json has no {cfg.split!r} block"
              for r in runs if not r.metrics.get(cfg.split)]
    preds = {r.run_id: r.predictions().select(cfg.split) for r in runs}
    ranked, rank_how = rank_runs([r for r in runs if preds[r.run_id].relpath])
    if data_dir is None:
        data_dir = _recorded_data_dir(runs)
        if data_dir is not None:
            notes.append(f"example images read from the image folder recorded in the runs: "
                         f"{data_dir}")
    return ReportContext(
        runs=sorted(runs, key=run_order), runs_dir=runs_dir, out_dir=out_dir, split=cfg.split,
        rows=rows, labels={row["run_id"]: row["label"] for row in rows
                           if row["source"] == "measured"},
        preds=preds, best=ranked[: max(0, cfg.best)], rank_how=rank_how,
        data_dir=Path(data_dir) if data_dir is not None else None, examples=cfg.examples,
        notes=notes, cv_runs=cv_runs, cv_rows=build_table(cv_runs, POOLED)[:-1],
    )


def write_tables(rows: Sequence[dict[str, Any]], out_dir: Path, split: str) -> list[Path]:
    """table.md, table.csv and table.json."""
    write_text_atomic(out_dir / TABLE_MD, table_markdown(rows))
    write_text_atomic(out_dir / TABLE_CSV, table_csv(rows))
    write_json_atomic(out_dir / TABLE_JSON, table_json(rows, split))
    return [out_dir / TABLE_MD, out_dir / TABLE_CSV, out_dir / TABLE_JSON]


def write_cv_tables(ctx: ReportContext, out_dir: Path) -> list[Path]:
    """cv_table.csv / cv_table.json (pooled CV rows) and shortcut.md, when there is data."""
    files: list[Path] = []
    if ctx.cv_rows:
        write_text_atomic(out_dir / CV_TABLE_CSV, table_csv(ctx.cv_rows))
        write_json_atomic(out_dir / CV_TABLE_JSON, table_json(ctx.cv_rows, POOLED))
        files += [out_dir / CV_TABLE_CSV, out_dir / CV_TABLE_JSON]
    rows, block, _notes = shortcut_table(ctx)
    if rows:
        text = (f"# Shortcut check ({block})\n\n{rows_markdown(rows)}\n\n"
                + "".join(f"* {line}\n" for r in rows for line in r.sentences()))
        write_text_atomic(out_dir / SHORTCUT_MD, text)
        files.append(out_dir / SHORTCUT_MD)
    return files


def write_external_rows(runs: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    """external.json: ``{"sets": {name: rows}}`` of the "Another lab" tables (for
    scripts/results_table.py); removed when no run has an external evaluation."""
    path = out_dir / EXTERNAL_JSON
    sets = external_rows(runs)
    if not sets:
        path.unlink(missing_ok=True)
        return []
    write_json_atomic(path, {"sets": {name: sets[name] for name in sorted(sets)}})
    return [path]


def _recorded_data_dir(runs: Sequence[RunRecord]) -> Path | None:
    """An existing image folder recorded in a run's config (``data_dir``), if any."""
    for r in sorted(runs, key=lambda r: r.run_id):
        d = r.config.get("data_dir")
        if d and Path(str(d)).is_dir():
            return Path(str(d))
    return None


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Delete per-run figures of runs no longer present, so the folder matches the table."""
    for p in out_dir.iterdir():
        if p.suffix == ".png" and p.name not in keep and (
            p.name.startswith((CONFUSION_PREFIX, ROC_PREFIX, EXTERNAL_ROC_PREFIX))
            or p.name in (FIG4, FIG5)
        ):
            p.unlink()
