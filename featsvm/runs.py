"""Run records: the one on-disk format every kind of model writes (``runs/<run-id>/``).

A run folder holds

* ``config.json``   everything needed to reproduce the run (see REQUIRED_CONFIG_KEYS);
* ``predictions.csv`` one row per val/test image: PREDICTION_COLUMNS (a cross-validation run:
  one row per image of the manifest, split ``pooled``, plus a ``fold`` column);
* ``metrics.json``  ``{"val": {...}, "test": {...}}`` blocks from `featsvm.evaluation.metrics`
  (a cross-validation run: ``{"pooled": {...}, "folds": [...], "fold_spread": {...}}``, the
  ``pooled`` block in the layout of a ``test`` block);
* a model file (``model.skops`` for heads, see `featsvm.models.modelfile`; ``model.pt`` for
  end-to-end CNNs, loaded with ``torch.load(weights_only=True)``; ``folds.json`` for a
  cross-validation run, which keeps no deployable model; ``members.json`` for an ensemble:
  its member runs with the sha256 of their config.json and model file) with a sidecar
  ``<file>.sha256``;
  head runs made before skops hold ``model.joblib`` (a pickle, loaded only on request);
* optionally ``history.csv`` (per-epoch training log).

config.json, written last, records the sha256 of every other artefact (``artefacts``: model
file, predictions, metrics, history). `read_run` checks the small ones and refuses a record
whose files changed; the model file is checked against both its sidecar and config.json
before it is loaded (`verify_model`), so a swapped model needs an edited config.json too.

`report` and `predict` read only this format, so they never ask which kind of model made it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from featsvm import __version__
from featsvm.errors import RunRecordError
from featsvm.fileio import atomic_path, sha256_file, write_json_atomic, write_text_atomic
from featsvm.labels import LABELS

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
HISTORY_FILE = "history.csv"

PROB_COLUMNS = tuple(f"prob_{lab}" for lab in LABELS)
PREDICTION_COLUMNS = ("relpath", "sha256", "split", "true_label", "pred_label", *PROB_COLUMNS)

# Keys every config.json carries, whatever made it.
REQUIRED_CONFIG_KEYS = (
    "run_id",
    # "head" (head on cached embeddings), "end_to_end" (CNN), "cv" (pooled K-fold),
    # "ensemble" (mean of other runs' probabilities, `featsvm.ensemble`)
    "kind",
    "model",  # display name, e.g. "vgg16 + svm" or "basic-cnn"
    "backbone",  # backbone name, or null for basic-cnn
    "head",  # "svm" / "logreg" for heads, null for end-to-end models
    # {"label": ..., "sha256": ...}; label "random" when untrained, "none" for basic-cnn
    "weights",
    "preprocessing",  # dict describing input size, resize, mean/std (what predict must repeat)
    "split",  # {"path": ..., "sha256": ...}
    "seed",
    "model_file",  # file name inside the run folder
    "timing",  # {"fit_seconds": ..., ...}
    "versions",  # featsvm, torch, sklearn, python ...
    "created",
)

KINDS = ("head", "end_to_end", "cv", "ensemble")
FOLD_COLUMN = "fold"  # cross-validation runs only
# Artefacts whose sha256 `read_run` checks against config.json every time (small files).
CHECKED_ON_READ = (PREDICTIONS_FILE, METRICS_FILE, HISTORY_FILE)


def is_pooled_cv(config: dict[str, Any]) -> bool:
    """Whether a run's metrics are pooled out-of-fold predictions (a ``pooled`` block, no
    deployable model): a ``cv`` run, or an ensemble of cv runs (``members_kind = "cv"``)."""
    kind = config.get("kind")
    return kind == "cv" or (kind == "ensemble" and config.get("members_kind") == "cv")


def versions() -> dict[str, str]:
    out = {"featsvm": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "torchvision", "sklearn", "timm", "h5py"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional library is simply not recorded
            continue
    return out


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_run_id(*parts: str | None) -> str:
    """Readable id: the given parts, then a UTC date-time, e.g. vgg16-svm-20261125-190102."""
    stem = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", p) for p in parts if p)
    return f"{stem}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(runs_dir: str | os.PathLike[str], *parts: str | None) -> Path:
    """Create and return a fresh run folder; never reuses an existing one."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = make_run_id(*parts)
    for i in range(1000):
        run_dir = runs_dir / (base if i == 0 else f"{base}-{i}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        return run_dir
    raise RunRecordError(f"could not create a new run folder under {runs_dir}")


# ---------------------------------------------------------------- model files + sidecars


def sidecar_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".sha256")


def write_sidecar(model_path: str | os.PathLike[str]) -> str:
    model_path = Path(model_path)
    digest = sha256_file(model_path)
    write_text_atomic(sidecar_path(model_path), f"{digest}  {model_path.name}\n")
    return digest


def verify_sidecar(model_path: str | os.PathLike[str]) -> str:
    """Check a model file against its sidecar; return the sha256 or raise RunRecordError."""
    model_path = Path(model_path)
    side = sidecar_path(model_path)
    if not model_path.is_file():
        raise RunRecordError(f"model file {model_path} is missing")
    if not side.is_file():
        raise RunRecordError(f"{model_path} has no sha256 sidecar ({side.name}); refusing to load")
    try:
        words = side.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise RunRecordError(f"{side} is unreadable ({exc}); refusing to load {model_path}") \
            from None
    expected = words[0].lower() if words else ""
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise RunRecordError(
            f"{side} holds no sha256 ({'empty' if not words else 'garbled'} sidecar); refusing "
            f"to load {model_path}: re-run the command that made the run"
        )
    actual = sha256_file(model_path)
    if actual != expected:
        raise RunRecordError(
            f"{model_path} does not match its sidecar sha256 (expected {expected[:12]}…, "
            f"got {actual[:12]}…): the file changed after the run wrote it; refusing to load"
        )
    return actual


def recorded_sha256(config: dict[str, Any], name: str) -> str | None:
    """The sha256 config.json records for the artefact `name` (None for older records)."""
    found = (config.get("artefacts") or {}).get(name)
    if found is None and name == config.get("model_file"):
        found = config.get("model_sha256")
    return str(found) if found else None


def verify_model(record: RunRecord) -> str:
    """Check a run's model file against its sidecar and against config.json; return the
    sha256 or raise RunRecordError."""
    actual = verify_sidecar(record.model_path)
    expected = recorded_sha256(record.config, str(record.config["model_file"]))
    if expected is not None and actual != expected:
        raise RunRecordError(
            f"{record.model_path} has sha256 {actual[:12]}…, but {record.path / CONFIG_FILE} "
            f"records {expected[:12]}…: the model was replaced after the run (its sidecar "
            "too); refusing to load"
        )
    return actual


def save_joblib(run_dir: Path, obj: Any, name: str = "model.joblib") -> str:
    import joblib

    path = Path(run_dir) / name
    with atomic_path(path) as tmp:
        joblib.dump(obj, tmp)
    return write_sidecar(path)


def load_joblib(path: str | os.PathLike[str]) -> Any:
    """Load a joblib model after checking its sidecar. joblib runs code on load: only for
    files this process wrote or run folders you made (heads are saved with skops, see
    `featsvm.models.modelfile`)."""
    import joblib

    verify_sidecar(path)
    return joblib.load(path)


# ---------------------------------------------------------------- predictions


class ScoredImage(Protocol):
    """One scored image: a `featsvm.data.manifest.ManifestRow` (or anything alike)."""

    @property
    def relpath(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def split(self) -> str: ...
    @property
    def label(self) -> str: ...


def write_predictions(
    run_dir: Path,
    rows: Sequence[ScoredImage],
    proba: np.ndarray,
    folds: Sequence[int] | None = None,
) -> None:
    """Write predictions.csv, one line per row (its relpath, sha256, split and true label);
    the predicted label is the arg-max of `proba` (columns in LABELS order). `folds`
    (cross-validation) adds a ``fold`` column."""
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape != (len(rows), len(LABELS)):
        raise ValueError(
            f"proba has shape {proba.shape}, expected ({len(rows)}, {len(LABELS)})"
        )
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if folds is not None and len(folds) != len(rows):
        raise ValueError(f"folds has {len(folds)} entries, expected {len(rows)}")
    w.writerow(PREDICTION_COLUMNS + ((FOLD_COLUMN,) if folds is not None else ()))
    pred = proba.argmax(axis=1)
    for i, r in enumerate(rows):
        w.writerow(
            [r.relpath, r.sha256, r.split, r.label, LABELS[pred[i]],
             *(f"{p:.6f}" for p in proba[i]), *((folds[i],) if folds is not None else ())]
        )
    write_text_atomic(Path(run_dir) / PREDICTIONS_FILE, buf.getvalue())


@dataclass(frozen=True)
class Predictions:
    relpath: list[str]
    sha256: list[str]
    split: list[str]
    true_label: list[str]
    pred_label: list[str]
    proba: np.ndarray  # (n, len(LABELS))
    fold: list[int] | None = None  # cross-validation runs: the fold that scored each image

    def select(self, split: str) -> Predictions:
        idx = [i for i, s in enumerate(self.split) if s == split]
        return Predictions(
            [self.relpath[i] for i in idx], [self.sha256[i] for i in idx], [split] * len(idx),
            [self.true_label[i] for i in idx], [self.pred_label[i] for i in idx], self.proba[idx],
            None if self.fold is None else [self.fold[i] for i in idx],
        )


def read_predictions(path: str | os.PathLike[str]) -> Predictions:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(PREDICTION_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise RunRecordError(f"{path}: missing columns {sorted(missing)}")
        rows = list(reader)
    proba = np.array([[float(r[c]) for c in PROB_COLUMNS] for r in rows]).reshape(-1, len(LABELS))
    has_fold = FOLD_COLUMN in (reader.fieldnames or [])
    return Predictions(
        [r["relpath"] for r in rows], [r["sha256"] for r in rows], [r["split"] for r in rows],
        [r["true_label"] for r in rows], [r["pred_label"] for r in rows], proba,
        [int(r[FOLD_COLUMN]) for r in rows] if has_fold else None,
    )


# ---------------------------------------------------------------- whole records


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise RunRecordError(f"config for {run_dir.name} lacks {missing}")
    if config["kind"] not in KINDS:
        raise RunRecordError(f"kind must be one of {KINDS}, got {config['kind']!r}")
    write_json_atomic(Path(run_dir) / CONFIG_FILE, config)


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / METRICS_FILE, metrics)


@dataclass(frozen=True)
class RunRecord:
    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.config["run_id"])

    @property
    def model_path(self) -> Path:
        return self.path / self.config["model_file"]

    def predictions(self) -> Predictions:
        return read_predictions(self.path / PREDICTIONS_FILE)


def is_complete(run_dir: Path) -> bool:
    """A run counts only once config, metrics, predictions and the model (+sidecar) exist;
    config.json is written last, so a crashed run is never mistaken for a finished one."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        return False
    try:
        cfg = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    model = run_dir / str(cfg.get("model_file", ""))
    return all(
        p.is_file()
        for p in (run_dir / METRICS_FILE, run_dir / PREDICTIONS_FILE, model, sidecar_path(model))
    )


def read_run(run_dir: str | os.PathLike[str]) -> RunRecord:
    run_dir = Path(run_dir)
    if not is_complete(run_dir):
        raise RunRecordError(
            f"{run_dir} is not a complete run record (needs {CONFIG_FILE}, {METRICS_FILE}, "
            f"{PREDICTIONS_FILE} and the model file with its .sha256 sidecar)"
        )
    config = _read_json_object(run_dir / CONFIG_FILE)
    for name in CHECKED_ON_READ:
        expected = recorded_sha256(config, name)
        if expected is not None and sha256_file(run_dir / name) != expected:
            raise RunRecordError(
                f"{run_dir / name} changed after the run was recorded (its sha256 differs "
                f"from the one in {CONFIG_FILE}); re-run the command that made the run"
            )
    metrics = _read_json_object(run_dir / METRICS_FILE)
    return RunRecord(path=run_dir, config=config, metrics=metrics)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunRecordError(f"{path}: unreadable ({exc}); delete the run folder and re-run "
                             "the command that made it") from None
    if not isinstance(value, dict):
        raise RunRecordError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def list_runs(runs_dir: str | os.PathLike[str]) -> tuple[list[RunRecord], list[str]]:
    """All readable complete runs under `runs_dir` (sorted by id), and the folders skipped:
    incomplete ones by name, broken ones (unreadable JSON) as "name: reason"."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return [], []
    complete, skipped = [], []
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        if not is_complete(d):
            skipped.append(d.name)
            continue
        try:
            complete.append(read_run(d))
        except RunRecordError as exc:
            skipped.append(f"{d.name}: {exc}")
    return complete, skipped


def finish_run(
    run_dir: Path,
    config: dict[str, Any],
    metrics: dict[str, Any],
    rows: Sequence[ScoredImage],
    proba: np.ndarray,
    folds: Sequence[int] | None = None,
) -> RunRecord:
    """Write predictions.csv (one line per scored manifest row, `proba` in the same order)
    and metrics.json, then config.json last (the completion mark).

    The model file and its sidecar must already be in `run_dir` (save_joblib / write_sidecar).
    """
    run_dir = Path(run_dir)
    model = run_dir / str(config.get("model_file", ""))
    model_sha = verify_sidecar(model)
    write_predictions(run_dir, rows, proba, folds)
    write_metrics(run_dir, metrics)
    artefacts = {model.name: model_sha}
    for name in (PREDICTIONS_FILE, METRICS_FILE, HISTORY_FILE):
        if (run_dir / name).is_file():
            artefacts[name] = sha256_file(run_dir / name)
    write_config(run_dir, {**config, "artefacts": artefacts})
    return read_run(run_dir)
