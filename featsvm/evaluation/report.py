"""`featsvm report`: compare every run record in one table, the reference study's figures
and a self-contained HTML page.

Reads only the run-record contract (`featsvm.runs`), so a head on cached embeddings and a
CNN trained end to end are treated alike. Output (all deterministic: re-running on the same
runs gives byte-identical files):

* ``table.md`` / ``table.csv`` / ``table.json``: one row per run plus the reference study's
  published VGG16 row (labelled published, not measured);
* ``fig4_metrics.png``: grouped bars of the four metrics with 95 % CIs;
* ``confusion-<run>.png``: counts and row-normalised confusion matrices (Figures 6-8);
* ``fig5_examples.png``: test images with true / predicted class and probability for the best
  models (needs the image folder: ``data_dir``);
* ``roc-<run>.png``: one-vs-rest ROC curves for the best models;
* ``index.html``: all of the above with the split protocol, dataset, weight provenance and
  library versions, images embedded as base64.

"Best" models are ranked on the **validation** split (macro-F1, then balanced accuracy), never
on test, so picking what to show cannot tune anything on the test split.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featsvm.errors import MissingInputError
from featsvm.evaluation import figures
from featsvm.fileio import sha256_file, write_json_atomic, write_text_atomic
from featsvm.labels import DISPLAY_NAMES, LABELS
from featsvm.runs import Predictions, RunRecord, list_runs

TABLE_MD, TABLE_CSV, TABLE_JSON = "table.md", "table.csv", "table.json"
FIG4, FIG5, HTML_FILE = "fig4_metrics.png", "fig5_examples.png", "index.html"
CONFUSION_PREFIX, ROC_PREFIX = "confusion-", "roc-"

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

DATASET_NAME = "Acute Lymphoblastic Leukemia (ALL) image dataset (Kaggle, Taleqani)"
DATASET_DOI = "10.34740/KAGGLE/DSV/2175623"

# Weight files whose provenance the report must flag (sha256 -> what is not plain ImageNet).
KNOWN_NOT_IMAGENET: dict[str, str] = {
    "9705e7702949faae59bcbd61e11f337c245804e85ea8839d0e3139db680184f3": (
        "NOT plain ImageNet: nsfwjs InceptionV3; stem to Mixed_6c are 8-bit ImageNet weights, "
        "Mixed_6d onward (and so the 2048-d avgpool feature) were fine-tuned on NSFW images"
    ),
}


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


# ---------------------------------------------------------------- table


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


def _sort_key(run: RunRecord) -> tuple:
    c = run.config
    return (c.get("kind") != "head", str(c.get("backbone") or ""), str(c.get("head") or ""),
            str(c.get("model") or ""), run.run_id)


def build_table(runs: Sequence[RunRecord], split: str = "test") -> list[dict[str, Any]]:
    """Measured rows (heads first, then end-to-end models; each group by name) and the
    published reference row last."""
    rows = [run_row(r, split) for r in sorted(runs, key=_sort_key)]
    names = [r["model"] for r in rows]
    for r in rows:  # two runs of one model: tell them apart by the run id's date-time
        r["label"] = (r["model"] if names.count(r["model"]) == 1
                      else f"{r['model']} ({_id_suffix(r['run_id'])})")
    pub = {col: None for col in rows[0]} if rows else {}
    pub.update(PUBLISHED_ROW)
    pub["label"] = PUBLISHED_ROW["model"]
    pub["split"] = "published"
    return [*rows, pub]


def _id_suffix(run_id: str) -> str:
    parts = run_id.split("-")
    return "-".join(parts[-2:]) if len(parts) >= 3 else run_id


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * float(v):.1f}"


def _fmt_metric(row: dict[str, Any], col: str) -> str:
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


def _ci_ok(ci: Any) -> bool:
    return isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci


def _fmt_other(v: Any, digits: int = 1) -> str:
    return "–" if v is None else f"{float(v):.{digits}f}"


MD_COLUMNS: tuple[str, ...] = (
    "accuracy", "sensitivity", "specificity", "precision", "macro_f1", "balanced_accuracy",
    "mcc", "roc_auc_ovr",
)


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Percentages with 95 % CI in brackets (MCC as a coefficient)."""
    head = ["Model", "Source", "n", *(METRIC_TITLES[c] for c in MD_COLUMNS),
            "Train s", "Extract img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        cells = [
            r["label"].replace("|", "/"),
            r["source"],
            "" if r.get("n") is None else str(r["n"]),
            *(_fmt_metric(r, c) for c in MD_COLUMNS),
            _fmt_other(r.get("train_seconds")),
            _fmt_other(r.get("extract_images_per_s")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Values in % on the test split with bootstrap 95 % CI over duplicate groups; sensitivity, "
        "specificity and precision are binary (malignant = Early Pre-B, Pre-B, Pro-B, positive). "
        "The published row is the reference study's own figure (random split), not measured here."
    )
    return "\n".join(lines) + "\n"


CSV_COLUMNS: tuple[str, ...] = (
    "model", "source", "run_id", "kind", "backbone", "head", "weights", "weights_sha256",
    "split", "n",
    *(x for col, _ in METRIC_COLUMNS for x in (col, f"{col}_ci_lo", f"{col}_ci_hi")),
    "train_seconds", "extract_images_per_s",
)


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


# ---------------------------------------------------------------- per-run figures data


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


def _image_tiles(
    run: RunRecord, pred: Predictions, data_dir: Path, per_row: int, notes: list[str]
) -> tuple[list[figures.Tile], list[figures.Tile]]:
    """Correct (one per class in turn) and wrong (most confident mistakes first) examples."""
    from featsvm.data.dataset import ImageError, load_rgb

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
    order_w = sorted(wrong, key=lambda i: (-conf[i], pred.relpath[i]))

    def tiles(order: list[int]) -> list[figures.Tile]:
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

    return tiles(order_c), tiles(order_w)


# ---------------------------------------------------------------- provenance


def _known_weights_note(backbone: str, sha256: str) -> str | None:
    """What featsvm.features.backbones knows about a weights file that is not plain ImageNet."""
    if sha256 in KNOWN_NOT_IMAGENET:
        return KNOWN_NOT_IMAGENET[sha256]
    try:
        from featsvm.features.backbones import get_spec

        known = get_spec(backbone).known_file(sha256)
    except Exception:  # noqa: BLE001 - unknown backbone name or no torch: nothing known
        return None
    if known is not None and known.not_imagenet_from:
        return f"NOT plain ImageNet from {known.not_imagenet_from} on: {known.note}"
    return None


def weight_provenance(runs: Sequence[RunRecord]) -> list[dict[str, str]]:
    """Distinct (backbone, weights) pairs with a note on anything that is not plain ImageNet,
    and the embedding layers the runs used (a layer below the non-ImageNet blocks is still an
    ImageNet feature)."""
    seen: dict[tuple[str, str, str], dict[str, str]] = {}
    layers: dict[tuple[str, str, str], set[str]] = {}
    for r in runs:
        c = r.config
        w = c.get("weights") or {}
        key = (str(c.get("backbone") or c.get("model") or ""), str(w.get("label", "")),
               str(w.get("sha256") or ""))
        pre = c.get("preprocessing") or {}
        layer = pre.get("layer") if isinstance(pre, dict) else None
        layers.setdefault(key, set()).add(
            f"{layer} ({c.get('kind')})" if layer else str(c.get("kind")))
        if key in seen:
            continue
        label_l = key[1].lower()
        known = _known_weights_note(key[0], key[2]) if key[2] else None
        if known:
            note = known
        elif label_l == "random":
            note = "NOT pretrained: random initialisation"
        elif label_l == "none" or not c.get("backbone"):
            note = "trained from scratch (no pretrained weights)"
        elif "nsfw" in label_l or "another task" in label_l:
            note = "NOT plain ImageNet (see its label)"
        else:
            note = "ImageNet"
        seen[key] = {"backbone": key[0], "label": key[1], "sha256": key[2], "note": note}
    for key, entry in seen.items():
        entry["layers"] = ", ".join(sorted(layers[key]))
    return [seen[k] for k in sorted(seen)]


def split_protocol(runs: Sequence[RunRecord], runs_dir: Path) -> tuple[list[str], list[str]]:
    """Sentences describing every split manifest the runs were scored on (counts per split and
    class when the manifest is still readable and unchanged), and the manifests' sha256s."""
    from featsvm.data.manifest import read_manifest

    lines: list[str] = []
    shas: dict[str, str] = {}
    for r in runs:
        s = r.config.get("split") or {}
        shas.setdefault(str(s.get("sha256") or ""), str(s.get("path") or ""))
    for sha, path_s in sorted(shas.items()):
        used_by = sum(1 for r in runs if (r.config.get("split") or {}).get("sha256", "") == sha)
        head = f"manifest {path_s or '?'} (sha256 {sha[:16]}…), used by {used_by} run(s)"
        candidates = [Path(path_s), runs_dir.parent / path_s] if path_s else []
        found = None
        for cand in candidates:
            if cand.is_file() and sha256_file(cand) == sha:
                found = cand
                break
        if found is None:
            lines.append(head + ": the file is not available here (or changed), counts omitted")
            continue
        man = read_manifest(found)
        parts = []
        for split in ("train", "val", "test"):
            rows = man.subset(split)
            per = ", ".join(f"{DISPLAY_NAMES[lab]} {sum(x.label == lab for x in rows)}"
                            for lab in LABELS)
            parts.append(f"{split} {len(rows)} ({per})")
        groups = len({x.group for x in man.rows})
        folds = sorted({x.fold for x in man.rows if x.fold is not None})
        conflicts = sum(x.conflict for x in man.rows)
        lines.append(
            f"{head}: {len(man.rows)} images in {groups} duplicate groups; "
            + "; ".join(parts)
            + (f"; {len(folds)} grouped folds inside train" if folds else "")
            + (f"; {conflicts} images in label-conflicting groups" if conflicts else "")
        )
    return lines, sorted(shas)


def collect_versions(runs: Sequence[RunRecord]) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for r in runs:
        for k, v in (r.config.get("versions") or {}).items():
            out.setdefault(str(k), set()).add(str(v))
    return {k: sorted(v) for k, v in sorted(out.items())}


# ---------------------------------------------------------------- the whole report


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
    run` made or reused), leaving other runs in the folder out. Raises FileNotFoundError when
    there are no runs.
    """
    cfg = config or ReportConfig()
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = [f"incomplete or broken run folder skipped: {name}" for name in incomplete]
    rows = build_table(runs, cfg.split)
    for r in runs:
        if not r.metrics.get(cfg.split):
            notes.append(f"{r.run_id}: metrics.json has no {cfg.split!r} block")
    res = ReportResult(out_dir=out_dir, rows=rows, notes=notes)

    write_text_atomic(out_dir / TABLE_MD, table_markdown(rows))
    write_text_atomic(out_dir / TABLE_CSV, table_csv(rows))
    write_json_atomic(out_dir / TABLE_JSON, {"split": cfg.split, "rows": rows})
    res.files += [out_dir / TABLE_MD, out_dir / TABLE_CSV, out_dir / TABLE_JSON]
    res.files.append(figures.metric_bars(rows, out_dir / FIG4, cfg.split))

    preds = {r.run_id: r.predictions().select(cfg.split) for r in runs}
    label = {row["run_id"]: row["label"] for row in rows if row["source"] == "measured"}
    confusion_files: dict[str, Path] = {}
    for r in sorted(runs, key=_sort_key):
        p = preds[r.run_id]
        if not p.relpath:
            continue
        confusion_files[r.run_id] = figures.confusion_pair(
            confusion_counts(p), f"{label[r.run_id]}: {cfg.split} split, n={len(p.relpath)}",
            out_dir / f"{CONFUSION_PREFIX}{r.run_id}.png",
        )
    res.files += confusion_files.values()

    ranked, rank_how = rank_runs([r for r in runs if preds[r.run_id].relpath])
    best = ranked[: max(0, cfg.best)]
    res.best_run_ids = [r.run_id for r in best]
    roc_files: dict[str, Path] = {}
    for r in best:
        p = preds[r.run_id]
        roc_files[r.run_id] = figures.roc_curves(
            p.true_label, p.proba, f"{label[r.run_id]}: one-vs-rest ROC, {cfg.split} split",
            out_dir / f"{ROC_PREFIX}{r.run_id}.png",
        )
    res.files += roc_files.values()

    fig5: Path | None = None
    if data_dir is None:
        data_dir = _recorded_data_dir(runs)
        if data_dir is not None:
            notes.append(f"example images read from the image folder recorded in the runs: "
                         f"{data_dir}")
    if data_dir is None:
        notes.append("Figure 5 (example images) skipped: no image folder given (--data DIR)")
    elif not Path(data_dir).is_dir():
        notes.append(f"Figure 5 (example images) skipped: image folder {data_dir} not found")
    elif best:
        panels: list[tuple[str, Sequence[figures.Tile]]] = []
        for r in best:
            ok, bad = _image_tiles(r, preds[r.run_id], Path(data_dir), cfg.examples, notes)
            name = label[r.run_id]
            panels += [(f"{name}: correct", ok), (f"{name}: wrong", bad)]
        if any(tiles for _, tiles in panels):
            fig5 = figures.example_grid(panels, out_dir / FIG5, ncols=cfg.examples)
            res.files.append(fig5)
        else:
            notes.append(f"Figure 5 skipped: none of the test images were found under {data_dir}")
    _remove_stale(out_dir, {p.name for p in res.files})

    protocol, _ = split_protocol(runs, runs_dir)
    page = render_html(
        rows=rows, runs=sorted(runs, key=_sort_key), out_dir=out_dir,
        confusion_files=confusion_files, roc_files=roc_files, fig5=fig5, rank_how=rank_how,
        labels=label,
        best=best, protocol=protocol, provenance=weight_provenance(runs),
        versions=collect_versions(runs), notes=notes, data_dir=data_dir, split=cfg.split,
    )
    write_text_atomic(out_dir / HTML_FILE, page)
    res.files.append(out_dir / HTML_FILE)
    return res


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
            p.name.startswith((CONFUSION_PREFIX, ROC_PREFIX)) or p.name in (FIG4, FIG5)
        ):
            p.unlink()


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 7px;text-align:right}
th{background:#f2f2f2} td:first-child,th:first-child{text-align:left}
tr.published td{font-style:italic;background:#fff8e6}
img{max-width:100%;border:1px solid #eee}
.note{color:#8a5300} code{background:#f4f4f4;padding:0 3px}
.flag{color:#b01c1c;font-weight:600}
"""


def _settings(c: dict[str, Any]) -> str:
    """The few settings a reader needs to judge a run: chosen hyper-parameters for a head,
    epochs / freezing for an end-to-end model."""
    parts: list[str] = []
    if isinstance(c.get("hyperparameters"), dict):
        parts += [f"{k}={v}" for k, v in sorted(c["hyperparameters"].items())]
    if (c.get("calibration") or {}).get("method") not in (None, "none"):
        parts.append(f"calibration={c['calibration']['method']}")
    for key in ("epochs_run", "best_epoch", "freeze_until", "stopped_early"):
        if c.get(key) not in (None, False):
            parts.append(f"{key}={c[key]}")
    return ", ".join(parts) or "–"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(
    *, rows: Sequence[dict[str, Any]], runs: Sequence[RunRecord], out_dir: Path,
    labels: dict[str, str],
    confusion_files: dict[str, Path], roc_files: dict[str, Path], fig5: Path | None,
    rank_how: str, best: Sequence[RunRecord], protocol: Sequence[str],
    provenance: Sequence[dict[str, str]], versions: dict[str, list[str]], notes: Sequence[str],
    data_dir: str | os.PathLike[str] | None, split: str,
) -> str:
    e = html.escape
    out: list[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>featsvm report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>featsvm report: pretrained CNN features + classical heads vs end-to-end CNNs</h1>",
        f"<p>{len(runs)} run(s); every number below is measured on the <b>{e(split)}</b> split "
        "of a duplicate-aware split manifest, except the row marked <i>published</i>, which is "
        "the reference study's own figure (Ghongade et al. 2023, VGG16) on a random split.</p>",
        "<h2>Comparison table</h2>",
    ]
    head = ["Model", "Source", "n", *(METRIC_TITLES[c] for c in MD_COLUMNS), "Train s",
            "Extract img/s"]
    out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        cls = ' class="published"' if r["source"] == "published" else ""
        cells = [r["label"], r["source"], "" if r.get("n") is None else str(r["n"]),
                 *(_fmt_metric(r, c) for c in MD_COLUMNS), _fmt_other(r.get("train_seconds")),
                 _fmt_other(r.get("extract_images_per_s"))]
        out.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    out.append("<p>Percent with bootstrap 95 % CI over duplicate groups in brackets. "
               "Sensitivity, specificity and precision are binary: malignant (Early Pre-B, "
               "Pre-B, Pro-B) is the positive class; accuracy is 4-class. "
               f"Full precision values: <code>{TABLE_CSV}</code>, <code>{TABLE_JSON}</code>.</p>")

    out.append("<h2>Figure 4: the four metrics per model</h2>")
    out.append(_img(out_dir / FIG4, "grouped bar chart of four metrics"))

    out.append("<h2>Figures 6-8: confusion matrices</h2>")
    for r in runs:
        if r.run_id in confusion_files:
            out.append(f"<h3>{e(labels[r.run_id])} <small>({e(r.run_id)})</small></h3>")
            out.append(_img(confusion_files[r.run_id], f"confusion matrix {r.run_id}"))

    out.append("<h2>Figure 5: example test images from the best models</h2>")
    out.append(f"<p>Best models: {e(', '.join(labels[r.run_id] for r in best))} "
               f"({e(rank_how)}). Correct examples rotate through the classes; wrong ones are "
               "the most confident mistakes.</p>")
    if fig5 is not None:
        out.append(_img(fig5, "grid of example test images"))
    else:
        out.append('<p class="note">Not drawn: the image folder was not given or not found '
                   "(<code>featsvm report --data DIR</code>).</p>")

    out.append("<h2>One-vs-rest ROC curves of the best models</h2>")
    for r in best:
        out.append(_img(roc_files[r.run_id], f"ROC {r.run_id}"))

    out.append("<h2>Split protocol</h2><ul>")
    out += [f"<li>{e(line)}</li>" for line in protocol]
    out.append("</ul><p>Images are grouped by exact and near duplicates before splitting, so no "
               "group crosses train / val / test; hyper-parameters are chosen by grouped "
               "cross-validation on train, checkpoints and model ranking on val, and the test "
               "split is scored once.</p>")

    out.append("<h2>Dataset</h2>")
    out.append(f"<p>{e(DATASET_NAME)}, doi:{e(DATASET_DOI)}: peripheral-blood smear images "
               "of benign hematogones and three B-ALL subtypes (Early Pre-B, Pre-B, Pro-B)"
               + (f"; image folder used for the figures: <code>{e(str(data_dir))}</code>"
                  if data_dir else "") + ".</p>")

    out.append("<h2>Weight provenance</h2><table><tr><th>Backbone</th><th>Weights label</th>"
               "<th>sha256</th><th>Used at</th><th>Note</th></tr>")
    for p in provenance:
        flag = ' class="flag"' if p["note"].startswith("NOT") else ""
        out.append(f"<tr><td>{e(p['backbone'])}</td><td>{e(p['label'])}</td>"
                   f"<td><code>{e(p['sha256'] or '–')}</code></td><td>{e(p['layers'])}</td>"
                   f"<td{flag}>{e(p['note'])}</td></tr>")
    out.append("</table>")

    out.append("<h2>Runs</h2><table><tr><th>Run id</th><th>Model</th><th>Kind</th><th>Seed</th>"
               "<th>Chosen settings</th><th>Created</th></tr>")
    for r in runs:
        c = r.config
        out.append(f"<tr><td>{e(r.run_id)}</td><td>{e(str(c.get('model')))}</td>"
                   f"<td>{e(str(c.get('kind')))}</td><td>{e(str(c.get('seed')))}</td>"
                   f"<td>{e(_settings(c))}</td><td>{e(str(c.get('created')))}</td></tr>")
    out.append("</table>")

    out.append("<h2>Versions</h2><ul>")
    out += [f"<li>{e(k)}: {e(', '.join(v))}</li>" for k, v in versions.items()]
    out.append("</ul>")
    if notes:
        out.append("<h2>Notes</h2><ul>")
        out += [f'<li class="note">{e(n)}</li>' for n in notes]
        out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"

