"""`featsvm evaluate`: external validation of a finished run on labelled folders of another lab.

The images are classified exactly as `featsvm predict` classifies them (`featsvm.predict`,
same backbone-weight resolution); nothing is fitted, tuned or chosen on them. Labels come
from folder names: each DIR is either one class folder or holds class sub-folders, mapped
by ``class_map`` (``all=malignant,hem=benign``) or by the built-in folder aliases. A label
is ``benign``, ``malignant`` (no subtype known: binary evaluation) or one of the four
canonical labels (``benign, early_pre_b, pre_b, pro_b``; all four known: the four-class
block is added).

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
from featsvm.fileio import write_json_atomic, write_text_atomic
from featsvm.labels import label_for_folder, normalise_name
from featsvm.runs import read_run

if TYPE_CHECKING:
    from featsvm.predict import EmbeddingMemo

__all__ = ["CSV_COLUMNS", "EXTERNAL_DIR", "ExternalSet", "evaluate", "evaluate_set",
           "external_sets", "is_current", "ood_unavailable", "parse_class_map",
           "score_external"]

@dataclass(frozen=True)
class ExternalSet:
    """One ``[[external]]`` entry of a study config: a labelled set of another lab."""

    name: str
    path: str
    class_map: dict[str, str] = field(default_factory=dict)
    subject_regex: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"[[external]] name {self.name!r}: letters, digits, '_', '.', '-'")
        if not self.path:
            raise ConfigError(f"[[external]] {self.name}: path is empty")
        check_class_map(self.class_map)
        if self.subject_regex:
            compile_subject_regex(self.subject_regex)


def external_sets(doc: dict[str, Any] | None, source: str = "") -> tuple[ExternalSet, ...]:
    """The ``[[external]]`` array of tables (or ``[external.NAME]`` tables) of a config."""
    raw = (doc or {}).get("external", [])
    where = f"{source}[external]" if source else "[external]"
    if isinstance(raw, dict):
        raw = [{"name": k, **v} if isinstance(v, dict) else v for k, v in raw.items()]
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(f"{where} must be an array of tables ([[external]]) with name, path, "
                          "class_map, subject_regex")
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


def compile_subject_regex(regex: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error as exc:
        raise UsageError(f"subject regex {regex!r} is not a valid regular expression: "
                         f"{exc}") from None


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


def collect_labelled(dirs: Sequence[str | os.PathLike[str]], class_map: dict[str, str] | None
                     ) -> tuple[list[LabelledFile], list[str]]:
    """Labelled image files under `dirs` and the sub-folders ignored (no known label)."""
    from featsvm.data.dataset import iter_image_files

    files: list[LabelledFile] = []
    ignored: list[str] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UsageError(f"{d} is not a folder")
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
            "sub-folders named in --class-map (e.g. all=malignant,hem=benign)"
            + (f"; ignored folders: {', '.join(ignored)}" if ignored else ""))
    return files, ignored


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
) -> EvaluateResult:
    """Classify every labelled image under `dirs` with the run and write
    ``<run>/external/<name>/{predictions.csv,metrics.json}`` (module docstring). `memo`: a
    `featsvm.predict.EmbeddingMemo` shared by the runs evaluated on the same images."""
    from featsvm.predict import predict

    if not dirs:
        raise UsageError("evaluate needs at least one labelled folder")
    class_map = check_class_map(dict(class_map or {}))
    pattern = compile_subject_regex(subject_regex) if subject_regex else None
    name = name or Path(dirs[0]).resolve().name
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UsageError(f"--name {name!r}: use letters, digits, '_', '.', '-'")
    record = read_run(run_dir)  # refuses an incomplete run before any work
    files, ignored = collect_labelled(dirs, class_map)
    subjects_all = [subject_of(f.name, pattern) if pattern else f.name for f in files]
    by_path = {str(f.path): (f, s) for f, s in zip(files, subjects_all, strict=True)}
    res = predict(record.path, [f.path for f in files], weights=weights,
                  weights_dir=weights_dir, device=device, batch_size=batch_size,
                  progress=progress, memo=memo)
    threshold = (record.config.get("abstention") or {}).get("threshold")
    rows = [(by_path[p.file][0], by_path[p.file][1], p) for p in res.predictions]
    if not rows:
        raise UsageError(f"no image under {', '.join(map(str, dirs))} could be classified")
    proba = np.stack([p.proba for _, _, p in rows])
    labels = [f.label for f, _, _ in rows]
    subjects = [s for _, s, _ in rows]
    unit = "subject" if pattern else "image"
    flags, ood_extra = _ood_metrics(record, rows)
    metrics = score_external(labels, proba, subjects, threshold, n_boot=n_boot, seed=seed,
                             bootstrap_unit=unit, ood=flags,
                             ood_unavailable=ood_unavailable(record))
    metrics["ood"] |= ood_extra
    metrics = {
        "run_id": record.run_id,
        "model": str(record.config.get("model")),
        "name": name,
        "dirs": [str(Path(d)) for d in dirs],
        "class_map": class_map,
        "subject_regex": subject_regex or None,
        "note": ("bootstrap over subjects (the subject regex groups each person's cells)"
                 if pattern else
                 "no subject regex: the bootstrap resamples single images, so the CIs ignore "
                 "that cells of one person are alike and are too narrow"),
        "evaluation_only": "nothing is fitted, tuned or chosen on these images; the "
                           "threshold comes from the run's val split",
        "abstention_threshold_source": None if threshold is None else "run config.json",
        **metrics,
        "skipped": [{"file": f, "reason": why} for f, why in res.skipped],
        "ignored_folders": ignored,
    }
    out_dir = Path(record.path) / EXTERNAL_DIR / name
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "predictions.csv", _predictions_csv(rows, proba, threshold))
    write_json_atomic(out_dir / "metrics.json", metrics)
    return EvaluateResult(record.run_id, metrics["model"], name, out_dir, metrics, res.skipped,
                          ignored)


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
    subject regex and abstention threshold (so `featsvm run` can skip it)."""
    stored = read_external(run_dir).get(ext.name)
    if not stored:
        return False
    record = read_run(run_dir)
    threshold = (record.config.get("abstention") or {}).get("threshold")
    return (stored.get("dirs") == [str(Path(ext.path))]
            and (stored.get("class_map") or {}) == dict(ext.class_map)
            and (stored.get("subject_regex") or None) == (ext.subject_regex or None)
            and (stored.get("at_threshold") or {}).get("threshold") == threshold
            and "ood" in stored)


def evaluate_set(run_dir: str | os.PathLike[str], ext: ExternalSet, **kwargs: Any
                 ) -> EvaluateResult:
    """`evaluate` with the settings of one ``[[external]]`` entry."""
    return evaluate(run_dir, [ext.path], class_map=dict(ext.class_map),
                    subject_regex=ext.subject_regex or None, name=ext.name, **kwargs)
