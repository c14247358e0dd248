r"""`featsvm evaluate`: external validation of a finished run on labelled folders of another lab.

The images are classified exactly as `featsvm predict` classifies them (`featsvm.predict`,
same backbone-weight resolution); nothing is fitted, tuned or chosen on them. A label is
``benign``, ``malignant`` (no subtype known: binary evaluation) or one of the four canonical
labels (``benign, early_pre_b, pre_b, pro_b``; all four known: the four-class block is
added). It comes from one of three places:

* **folder names** (the default): each DIR is either one class folder or holds class
  sub-folders, mapped by ``class_map`` (``all=malignant,hem=benign``) or by the built-in
  folder aliases; sub-folders with no known label are ignored and listed;
* **the file path** (``label_regex``): group 1 of the regex (else the whole match), searched
  in each image's path relative to its DIR, is a class name mapped exactly as a folder name
  (ALL-IDB2: ``_([01])\.tif$`` with ``1=malignant,0=benign``);
* **a CSV sheet** (``labels``, one DIR): columns ``file`` (the path relative to the DIR),
  ``label`` (mapped like a folder name) and optionally ``subject`` (then the subject of each
  image, instead of a subject regex). A row with an empty cell, an unknown label, a path
  outside the DIR or a file named twice is refused naming its line; rows whose file is not
  there are left out and listed (``not_found``), like unreadable images (``skipped``).

Images under a DIR that get no label (path not matching the regex, class not in the map, not
in the CSV) are left out, listed in ``unlabelled`` and named in a one-line warning; when no
image gets a label at all, evaluation is refused with a hint.

Measured (``runs/<id>/external/<name>/metrics.json``, computed by
`featsvm.evaluation.external.score_external`):

* ROC-AUC of ``P(malignant)`` (sum of the three malignant class probabilities);
* sensitivity, specificity, precision, accuracy at the run's **own decision** (arg-max class
  malignant or not);
* the same over the images it does not abstain on at the run's **val-chosen confidence
  threshold** (`featsvm.evaluation.selective`; from the run record, never chosen here), with
  the abstention rate (overall and per true class);
* ECE and Brier score of the malignant-vs-benign probabilities (the predicted side's
  probability is the confidence; `featsvm.evaluation.calibration`), and of the four classes
  when the folders give subtypes;
* the share of images the run's out-of-distribution flag calls unlike its training images
  (``ood`` block: rate with CI, per true class, next to the run's in-lab test rate; head
  runs flag on the backbone's embedding, end-to-end runs on the network's penultimate
  layer); runs without a flag (made by older featsvm versions) say ``available: false``
  and why;
* 95 % percentile-bootstrap CIs. Cells of one person are not independent: with a
  ``subject_regex`` the bootstrap resamples **subjects** (group 1 of the regex, else the whole
  match, searched in each file's path); without one it resamples images, and the output says
  so (those intervals are too narrow when several cells come from one person).

``predictions.csv`` has one row per image: file, sha256, subject, true label, predicted
label, P(malignant), the four probabilities, confidence, ``abstain`` and ``ood`` (1 / 0, empty
when the run has no OOD flag).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featsvm.config import ConfigError, build
from featsvm.errors import UsageError
from featsvm.evaluation import calibration as cal
from featsvm.evaluation import selective as sel
from featsvm.evaluation.external import (
    CSV_COLUMNS,
    EXTERNAL_DIR,
    EXTERNAL_LABELS,
    MALIGNANT_LABEL,
    read_external,
    score_external,
)
from featsvm.evaluation.metrics import N_BOOT
from featsvm.fileio import sha256_file, write_json_atomic, write_text_atomic
from featsvm.labels import label_for_folder, normalise_name
from featsvm.runs import read_run

if TYPE_CHECKING:
    from featsvm.predict import EmbeddingMemo

__all__ = ["CSV_COLUMNS", "EXTERNAL_DIR", "ExternalSet", "evaluate", "evaluate_set",
           "external_sets", "is_current", "ood_unavailable", "parse_class_map",
           "score_external"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ExternalSet:
    """One ``[[external]]`` entry of a study config: a labelled set of another lab."""

    name: str
    path: str
    class_map: dict[str, str] = field(default_factory=dict)
    subject_regex: str = ""
    label_regex: str = ""  # labels from the file path instead of folder names
    labels: str = ""  # labels from a CSV sheet (file, label[, subject]) instead

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"[[external]] name {self.name!r}: letters, digits, '_', '.', '-'")
        if not self.path:
            raise ConfigError(f"[[external]] {self.name}: path is empty")
        check_class_map(self.class_map)
        if self.subject_regex:
            compile_subject_regex(self.subject_regex)
        if self.label_regex:
            compile_label_regex(self.label_regex)
        if self.label_regex and self.labels:
            raise ConfigError(f"[[external]] {self.name}: give label_regex or labels, not both")


def external_sets(doc: dict[str, Any] | None, source: str = "") -> tuple[ExternalSet, ...]:
    """The ``[[external]]`` array of tables (or ``[external.NAME]`` tables) of a config."""
    raw = (doc or {}).get("external", [])
    where = f"{source}[external]" if source else "[external]"
    if isinstance(raw, dict):
        raw = [{"name": k, **v} if isinstance(v, dict) else v for k, v in raw.items()]
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(f"{where} must be an array of tables ([[external]]) with name, path, "
                          "class_map, subject_regex, label_regex, labels")
    out = tuple(build(ExternalSet, t, f"{where}[{i}]") for i, t in enumerate(raw))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: duplicate names {names}")
    return out


# ---------------------------------------------------------------- labels and subjects


def check_class_map(class_map: dict[str, str]) -> dict[str, str]:
    for folder, label in class_map.items():
        if label not in EXTERNAL_LABELS:
            raise UsageError(f"class map {folder}={label}: the label must be one of "
                             f"{', '.join(EXTERNAL_LABELS)}")
    return class_map


def parse_class_map(items: Sequence[str]) -> dict[str, str]:
    """``all=malignant,hem=benign`` (comma-separated, and/or repeated) -> folder -> label."""
    out: dict[str, str] = {}
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            folder, sep, label = part.partition("=")
            if not sep or not folder.strip() or not label.strip():
                raise UsageError(f"--class-map expects FOLDER=LABEL[,FOLDER=LABEL...], got "
                                 f"{item!r}")
            out[folder.strip()] = label.strip()
    return check_class_map(out)


def folder_label(name: str, class_map: dict[str, str] | None) -> str | None:
    """The label of a folder name: the class map first, then 'malignant' and the built-in
    aliases of the Taleqani releases."""
    for folder, label in (class_map or {}).items():
        if folder == name or normalise_name(folder) == normalise_name(name):
            return label
    if normalise_name(name) == MALIGNANT_LABEL:
        return MALIGNANT_LABEL
    return label_for_folder(name)


def _compile_regex(regex: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error as exc:
        raise UsageError(f"{what} regex {regex!r} is not a valid regular expression: "
                         f"{exc}") from None


def compile_subject_regex(regex: str) -> re.Pattern[str]:
    return _compile_regex(regex, "subject")


def subject_of(path: str, pattern: re.Pattern[str]) -> str:
    m = pattern.search(path)
    if m is None:
        raise UsageError(f"the subject regex {pattern.pattern!r} does not match {path!r}; "
                         "every file needs a subject (or leave the regex out to bootstrap "
                         "over images)")
    return m.group(1) if pattern.groups else m.group(0)


@dataclass(frozen=True)
class LabelledFile:
    path: Path
    name: str  # <DIR name>/<path inside DIR>
    label: str
    subject: str | None = None  # from a labels CSV's subject column


def collect_labelled(dirs: Sequence[str | os.PathLike[str]], class_map: dict[str, str] | None
                     ) -> tuple[list[LabelledFile], list[str]]:
    """Labelled image files under `dirs` (labels from folder names) and the sub-folders
    ignored (no known label)."""
    from featsvm.data.dataset import iter_image_files

    files: list[LabelledFile] = []
    ignored: list[str] = []
    for d in _check_dirs(dirs):
        own = folder_label(d.name, class_map)
        parts = [(d, own)] if own else [
            (sub, folder_label(sub.name, class_map))
            for sub in sorted(p for p in d.iterdir() if p.is_dir())
        ]
        for folder, label in parts:
            if label is None:
                ignored.append(str(folder))
                continue
            for p in iter_image_files(folder):
                files.append(LabelledFile(p, f"{d.name}/{p.relative_to(d).as_posix()}", label))
    if not files:
        raise UsageError(
            f"no labelled images under {', '.join(map(str, dirs))}: give each DIR class "
            "sub-folders named in --class-map (e.g. all=malignant,hem=benign), or take the "
            "label from the file name with --label-regex (e.g. '_([01])\\.tif$' with "
            "--class-map 1=malignant,0=benign) or from a sheet with --labels FILE.csv"
            + (f"; ignored folders: {', '.join(ignored)}" if ignored else ""))
    return files, ignored


def _check_dirs(dirs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    out = [Path(d) for d in dirs]
    for d in out:
        if not d.is_dir():
            raise UsageError(f"{d} is not a folder")
    return out


def compile_label_regex(regex: str) -> re.Pattern[str]:
    return _compile_regex(regex, "label")


def collect_by_regex(dirs: Sequence[str | os.PathLike[str]], regex: str,
                     class_map: dict[str, str] | None
                     ) -> tuple[list[LabelledFile], list[tuple[str, str]]]:
    """Image files under `dirs` labelled by `regex` (group 1, else the whole match, searched in
    the path relative to the DIR, is a class name mapped like a folder name), and the
    (name, reason) of every image left without a label."""
    from featsvm.data.dataset import iter_image_files

    pattern = compile_label_regex(regex)
    files: list[LabelledFile] = []
    unlabelled: list[tuple[str, str]] = []
    for d in _check_dirs(dirs):
        for p in iter_image_files(d):
            rel = p.relative_to(d).as_posix()
            name = f"{d.name}/{rel}"
            m = pattern.search(rel)
            cls = (m.group(1) if pattern.groups else m.group(0)) if m else None
            if not cls:
                unlabelled.append((name, "path does not match the label regex"))
                continue
            label = folder_label(cls, class_map)
            if label is None:
                unlabelled.append((name, f"class {cls!r} is not in the class map"))
                continue
            files.append(LabelledFile(p, name, label))
    if not files:
        where = ", ".join(map(str, dirs))
        if not unlabelled:
            raise UsageError(f"no image files under {where}")
        seen = "; ".join(sorted({why for _, why in unlabelled}))
        raise UsageError(
            f"no labelled images under {where}: the label regex {regex!r}, searched in each "
            f"image's path relative to its DIR (e.g. {unlabelled[0][0].partition('/')[2]!r}), "
            f"gave no class of the class map ({seen}); check --label-regex and --class-map, "
            "e.g. --label-regex '_([01])\\.tif$' --class-map 1=malignant,0=benign")
    return files, unlabelled


LABELS_COLUMNS = ("file", "label", "subject")


@dataclass(frozen=True)
class LabelsRow:
    line: int  # line of the CSV file (the header is line 1)
    file: str  # path relative to the DIR, '/'-separated
    label: str  # canonical (mapped) label
    subject: str | None


@dataclass(frozen=True)
class LabelsCsv:
    """A labels sheet: ``file`` (path relative to the DIR), ``label``, optional ``subject``."""

    path: Path
    sha256: str
    rows: tuple[LabelsRow, ...]
    has_subject: bool


def read_labels_csv(path: str | os.PathLike[str], class_map: dict[str, str] | None
                    ) -> LabelsCsv:
    """Read and check a labels CSV (comma, semicolon or tab separated; a UTF-8 BOM as Excel
    writes it is fine). Refuses, naming the line, a missing column, an empty cell, a label
    neither in `class_map` nor a featsvm label, a path outside the DIR and a file named
    twice."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"labels file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"labels file {path} cannot be read as UTF-8 text: {exc}") from None
    head = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=head.count) if head else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in LABELS_COLUMNS[:2] if c not in header]
    if missing:
        raise UsageError(f"{path} line 1: the header needs the columns file and label "
                         f"(optional: subject), found {header or 'nothing'}")
    col = {c: header.index(c) for c in LABELS_COLUMNS if c in header}
    rows: list[LabelsRow] = []
    first_line: dict[str, int] = {}
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue  # blank lines and Excel's trailing ',,,'
        cell = {c: cells[i].strip() if i < len(cells) else "" for c, i in col.items()}
        for c in col:
            if not cell[c]:
                raise UsageError(f"{path} line {line}: the {c} cell is empty"
                                 + (" (every image needs a subject when the sheet has a "
                                    "subject column)" if c == "subject" else ""))
        rel = cell["file"].replace("\\", "/")
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if rel.startswith("/") or re.match(r"[A-Za-z]:", rel) or ".." in parts:
            raise UsageError(f"{path} line {line}: file {cell['file']!r} must be a path "
                             "relative to the DIR, inside it")
        rel = "/".join(parts)
        if rel in first_line:
            raise UsageError(f"{path} line {line}: file {rel!r} is already on line "
                             f"{first_line[rel]}")
        first_line[rel] = line
        label = folder_label(cell["label"], class_map)
        if label is None:
            raise UsageError(
                f"{path} line {line}: label {cell['label']!r} is neither in the class map "
                f"nor one of {', '.join(EXTERNAL_LABELS)}; map it, e.g. --class-map "
                f"{cell['label']}=malignant")
        rows.append(LabelsRow(line, rel, label, cell.get("subject")))
    if not rows:
        raise UsageError(f"{path}: no rows after the header")
    return LabelsCsv(path, sha256_file(path), tuple(rows), "subject" in col)


def collect_from_csv(dirs: Sequence[str | os.PathLike[str]], sheet: LabelsCsv
                     ) -> tuple[list[LabelledFile], list[tuple[str, str]], list[tuple[str, str]]]:
    """The images of the one DIR named by `sheet`, the (name, reason) of every image under it
    the sheet does not name, and the (file, reason) of every row whose file is not there."""
    from featsvm.data.dataset import iter_image_files

    if len(dirs) != 1:
        raise UsageError(f"--labels takes exactly one DIR (its file paths are relative to "
                         f"it), got {len(dirs)}")
    (d,) = _check_dirs(dirs)
    files: list[LabelledFile] = []
    not_found: list[tuple[str, str]] = []
    for row in sheet.rows:
        p = d / row.file
        if p.is_file():
            files.append(LabelledFile(p, f"{d.name}/{row.file}", row.label, row.subject))
        else:
            not_found.append((f"{d.name}/{row.file}",
                              f"{sheet.path.name} line {row.line}: no such file under {d}"))
    named = {row.file for row in sheet.rows}
    unlabelled = [(f"{d.name}/{rel}", f"not in {sheet.path.name}")
                  for rel in (p.relative_to(d).as_posix() for p in iter_image_files(d))
                  if rel not in named]
    if not files:
        raise UsageError(
            f"none of the {len(sheet.rows)} files of {sheet.path} is under {d} (its file "
            f"column is read relative to the DIR: line {sheet.rows[0].line} names "
            f"{str(d / sheet.rows[0].file)!r}); pass the folder those paths start from")
    return files, unlabelled, not_found


def _warn_left_out(what: str, items: Sequence[tuple[str, str]], key: str) -> None:
    if not items:
        return
    shown = ", ".join(f"{n} ({why})" for n, why in items[:3])
    logger.warning("%d %s left out (all listed under %r in metrics.json): %s%s", len(items),
                   what, key, shown, ", ..." if len(items) > 3 else "")


# ---------------------------------------------------------------- the whole job


@dataclass
class EvaluateResult:
    run_id: str
    model: str
    name: str
    out_dir: Path
    metrics: dict[str, Any]
    skipped: list[tuple[str, str]]
    ignored_folders: list[str]
    unlabelled: list[tuple[str, str]] = field(default_factory=list)  # (file, why no label)
    not_found: list[tuple[str, str]] = field(default_factory=list)  # labels-CSV rows


def evaluate(
    run_dir: str | os.PathLike[str],
    dirs: Sequence[str | os.PathLike[str]],
    class_map: dict[str, str] | None = None,
    subject_regex: str | None = None,
    name: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int = 16,
    n_boot: int = N_BOOT,
    seed: int = 0,
    progress: bool = True,
    memo: EmbeddingMemo | None = None,
    label_regex: str | None = None,
    labels_csv: str | os.PathLike[str] | None = None,
) -> EvaluateResult:
    """Classify every labelled image under `dirs` with the run and write
    ``<run>/external/<name>/{predictions.csv,metrics.json}`` (module docstring); labels from
    folder names, `label_regex` or the `labels_csv` sheet. `memo`: a
    `featsvm.predict.EmbeddingMemo` shared by the runs evaluated on the same images."""
    from featsvm.predict import predict

    if not dirs:
        raise UsageError("evaluate needs at least one labelled folder")
    if label_regex and labels_csv:
        raise UsageError("give --label-regex or --labels, not both")
    class_map = check_class_map(dict(class_map or {}))
    pattern = compile_subject_regex(subject_regex) if subject_regex else None
    name = name or Path(dirs[0]).resolve().name
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UsageError(f"--name {name!r}: use letters, digits, '_', '.', '-'")
    sheet = read_labels_csv(labels_csv, class_map) if labels_csv else None
    if sheet is not None and sheet.has_subject and pattern is not None:
        raise UsageError(f"{sheet.path} has a subject column: leave out --subject-regex "
                         "(or drop the column to take subjects from the regex)")
    record = read_run(run_dir)  # refuses an incomplete run before any work
    got = _gather(dirs, class_map, pattern, label_regex, sheet)
    by_path = {str(f.path): (f, s) for f, s in zip(got.files, got.subjects, strict=True)}
    res = predict(record.path, [f.path for f in got.files], weights=weights,
                  weights_dir=weights_dir, device=device, batch_size=batch_size,
                  progress=progress, memo=memo)
    threshold = (record.config.get("abstention") or {}).get("threshold")
    rows = [(by_path[p.file][0], by_path[p.file][1], p) for p in res.predictions]
    if not rows:
        raise UsageError(f"no image under {', '.join(map(str, dirs))} could be classified")
    proba = np.stack([p.proba for _, _, p in rows])
    labels = [f.label for f, _, _ in rows]
    subjects = [s for _, s, _ in rows]
    flags, ood_extra = _ood_metrics(record, rows)
    metrics = score_external(labels, proba, subjects, threshold, n_boot=n_boot, seed=seed,
                             bootstrap_unit=got.unit, ood=flags,
                             ood_unavailable=ood_unavailable(record))
    metrics["ood"] |= ood_extra
    metrics = {
        "run_id": record.run_id,
        "model": str(record.config.get("model")),
        "name": name,
        "dirs": [str(Path(d)) for d in dirs],
        "class_map": class_map,
        "subject_regex": subject_regex or None,
        "label_regex": label_regex or None,
        "labels": None if sheet is None else {"file": str(sheet.path), "sha256": sheet.sha256,
                                              "subject_column": sheet.has_subject},
        "note": got.note,
        "evaluation_only": "nothing is fitted, tuned or chosen on these images; the "
                           "threshold comes from the run's val split",
        "abstention_threshold_source": None if threshold is None else "run config.json",
        **metrics,
        "skipped": [{"file": f, "reason": why} for f, why in res.skipped],
        "ignored_folders": got.ignored,
        "unlabelled": [{"file": f, "reason": why} for f, why in got.unlabelled],
        "not_found": [{"file": f, "reason": why} for f, why in got.not_found],
    }
    out_dir = Path(record.path) / EXTERNAL_DIR / name
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "predictions.csv", _predictions_csv(rows, proba, threshold))
    write_json_atomic(out_dir / "metrics.json", metrics)
    return EvaluateResult(record.run_id, metrics["model"], name, out_dir, metrics, res.skipped,
                          got.ignored, got.unlabelled, got.not_found)


@dataclass
class _Gathered:
    """The labelled images of an evaluation, their subjects and what was left out."""

    files: list[LabelledFile]
    subjects: list[str]
    unit: str  # what the bootstrap resamples: "subject" or "image"
    note: str
    ignored: list[str] = field(default_factory=list)  # class folders with no known label
    unlabelled: list[tuple[str, str]] = field(default_factory=list)
    not_found: list[tuple[str, str]] = field(default_factory=list)


def _gather(dirs: Sequence[str | os.PathLike[str]], class_map: dict[str, str],
            pattern: re.Pattern[str] | None, label_regex: str | None, sheet: LabelsCsv | None
            ) -> _Gathered:
    """Labels from the sheet, the label regex or folder names; subjects from the sheet's
    subject column, the subject regex or (none) the file names; one warning line for each
    kind of file left out."""
    ignored: list[str] = []
    unlabelled: list[tuple[str, str]] = []
    not_found: list[tuple[str, str]] = []
    if sheet is not None:
        files, unlabelled, not_found = collect_from_csv(dirs, sheet)
    elif label_regex:
        files, unlabelled = collect_by_regex(dirs, label_regex, class_map)
    else:
        files, ignored = collect_labelled(dirs, class_map)
    _warn_left_out("image file(s) without a label", unlabelled, "unlabelled")
    _warn_left_out("row(s) of the labels file naming no file", not_found, "not_found")
    if sheet is not None and sheet.has_subject:
        subjects = [f.subject or f.name for f in files]
        unit, note = "subject", ("bootstrap over subjects (the labels file's subject column "
                                 "groups each person's cells)")
    elif pattern is not None:
        subjects = [subject_of(f.name, pattern) for f in files]
        unit, note = "subject", ("bootstrap over subjects (the subject regex groups each "
                                 "person's cells)")
    else:
        subjects = [f.name for f in files]
        unit, note = "image", ("no subject regex: the bootstrap resamples single images, so "
                               "the CIs ignore that cells of one person are alike and are "
                               "too narrow")
    return _Gathered(files, subjects, unit, note, ignored, unlabelled, not_found)


def _predictions_csv(rows: Sequence[tuple[LabelledFile, str, Any]], proba: np.ndarray,
                     threshold: float | None) -> str:
    """predictions.csv of an external evaluation (CSV_COLUMNS; one row per image)."""
    conf = cal.confidence(proba)
    abstain = sel.abstain_mask(conf, threshold)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for i, (f, s, p) in enumerate(rows):
        w.writerow([f.name, p.sha256, s, f.label, p.pred_label, f"{p.prob_malignant:.6f}",
                    *(f"{v:.6f}" for v in p.proba), f"{conf[i]:.6f}",
                    "" if threshold is None else int(abstain[i]),
                    "" if p.ood is None else int(p.ood)])
    return buf.getvalue()


def _ood_metrics(record: Any, rows: Sequence[tuple[LabelledFile, str, Any]]
                 ) -> tuple[list[bool] | None, dict[str, Any]]:
    """(the OOD flag of every image or None, what the metrics' ood block adds about the run's
    flag)."""
    flags = [p.ood for _, _, p in rows]
    if not all(f is not None for f in flags):
        return None, {}
    ood_cfg = record.config.get("ood") or {}
    return [bool(f) for f in flags], {
        "threshold": ood_cfg.get("threshold"),
        "threshold_from": ood_cfg.get("threshold_from", "val"),
        "in_lab_test_rate": ood_cfg.get("rate_test")}


def ood_unavailable(record: Any) -> str:
    """Why a run has no out-of-distribution flag ("" when it has one)."""
    if (record.config.get("ood") or {}).get("file"):
        return ""
    if record.config.get("kind") == "end_to_end":
        return ("not available: this end-to-end run was made before featsvm finetune fitted "
                "an out-of-distribution flag (retrain it to get one)")
    return ("not available: this run was made without an out-of-distribution flag "
            "(before featsvm fitted one, or its split has no val images)")


def is_current(run_dir: str | os.PathLike[str], ext: ExternalSet) -> bool:
    """Whether the run already holds an evaluation of `ext` with the same folders, class map,
    subject regex, label source (label regex, or labels file and its sha256) and abstention
    threshold (so `featsvm run` can skip it)."""
    stored = read_external(run_dir).get(ext.name)
    if not stored:
        return False
    labels = stored.get("labels") or {}
    if ext.labels and not (labels.get("file") == str(Path(ext.labels))
                           and Path(ext.labels).is_file()
                           and labels.get("sha256") == sha256_file(ext.labels)):
        return False
    record = read_run(run_dir)
    threshold = (record.config.get("abstention") or {}).get("threshold")
    return (stored.get("dirs") == [str(Path(ext.path))]
            and (stored.get("class_map") or {}) == dict(ext.class_map)
            and (stored.get("subject_regex") or None) == (ext.subject_regex or None)
            and (stored.get("label_regex") or None) == (ext.label_regex or None)
            and bool(labels) == bool(ext.labels)
            and (stored.get("at_threshold") or {}).get("threshold") == threshold
            and "ood" in stored)


def evaluate_set(run_dir: str | os.PathLike[str], ext: ExternalSet, **kwargs: Any
                 ) -> EvaluateResult:
    """`evaluate` with the settings of one ``[[external]]`` entry."""
    return evaluate(run_dir, [ext.path], class_map=dict(ext.class_map),
                    subject_regex=ext.subject_regex or None, name=ext.name,
                    label_regex=ext.label_regex or None, labels_csv=ext.labels or None,
                    **kwargs)
