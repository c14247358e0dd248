"""Pooled, grouped K-fold cross-validation of an end-to-end model (`featsvm finetune --cv K`).

The end-to-end counterpart of `featsvm.models.cv` (heads), with the same folds and the same
run record, so that the report's pooled-CV table shows fine-tuned models beside the heads:

1. Outer folds: `featsvm.models.cv.outer_folds` over every image of the manifest (train, val
   and test alike), labels and duplicate groups from the manifest, seeded by ``[finetune]
   seed``: for the same manifest, K and seed, exactly the folds of ``featsvm cv``.
2. Inside each fold's training part, a grouped, stratified 1/9 of it is the **validation
   part** (`featsvm.models.cv.calibration_split`, seeded ``seed + fold``: the part head CV
   calibrates on). It picks the best epoch, stops early and fits the temperature; the model
   trains on the rest. The held-out fold is only predicted, once, with the best weights.
3. Training is `featsvm.models.finetune`'s own (model, freezing, feeder, optimiser, epoch
   loop, per-epoch checkpoints in ``fold-<k>/``), so the CUDA path is finetune's.
4. A finished fold writes ``fold-<k>.json`` (its held-out images with raw and calibrated
   probabilities, its validation images, best epoch, temperature) and drops its checkpoints.
   A killed run started again with the same settings continues in the same folder: finished
   folds are read back, an unfinished one resumes from its last epoch.
5. The out-of-fold probabilities are pooled (one row per usable image) and scored with
   `featsvm.models.cv.cv_metrics` (group-bootstrap CIs, per-fold metrics and spread); the run
   record has kind ``cv``, ``predictions.csv`` with a fold column and ``folds.json`` as its
   "model file" (no deployable model is kept: use ``featsvm finetune`` without ``--cv``).
   No out-of-distribution flag either: nothing is predicted with a cv run, so there is no
   embedding to flag (a ``featsvm finetune`` run fits one on its own network).

Images are decoded once for all folds. Cost: K trainings on (K-1)/K x 8/9 of the images each,
i.e. about 0.89 x K times one ``featsvm finetune`` run on an 80/10/10 split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featsvm import runs
from featsvm.data.manifest import Manifest, ManifestRow, read_manifest
from featsvm.errors import FitError, ManifestError
from featsvm.evaluation import calibration
from featsvm.evaluation import metrics as fm
from featsvm.fileio import FileLock, remove_temp_files, write_json_atomic, write_text_atomic
from featsvm.labels import LABELS
from featsvm.models.cv import (
    CALIBRATION_PARTS,
    FOLDS_FILE,
    POOLED,
    CVResult,
    FoldResult,
    calibration_split,
    cv_metrics,
    outer_folds,
)
from featsvm.models.finetune import (
    BEST_CHECKPOINT,
    FINGERPRINT_FILE,
    LAST_CHECKPOINT,
    TRAIN_LOCK,
    FinetuneConfig,
    Optimisation,
    TrainImages,
    Training,
    _plain,
    _predict,
    _run_busy,
    fingerprint,
    make_feeder,
    model_name,
)
from featsvm.models.networks import FinetuneError, apply_freeze, build_model, normaliser_for
from featsvm.models.pixels import ImageSet, Normaliser, preload
from featsvm.names import BASIC_CNN

logger = logging.getLogger(__name__)

DEFAULT_FOLDS = 5
FOLD_PREFIX = "fold-"  # fold-<k>/ (checkpoints, history.csv) and fold-<k>.json (its result)


def cv_fingerprint(train_fp: str, folds: int) -> str:
    """What makes two CV runs the same: the training fingerprint (data, split, model, weights,
    every training setting, seed) and the number of folds."""
    blob = f"{train_fp}|cv|folds={folds}|val_parts={CALIBRATION_PARTS}"
    return hashlib.sha256(blob.encode()).hexdigest()


def find_cv_run(records: list[runs.RunRecord], cv_fp: str) -> runs.RunRecord | None:
    """A complete end-to-end CV run with this CV fingerprint (newest)."""
    for r in reversed(records):
        if r.config.get("kind") == "cv" and r.config.get("fingerprint") == cv_fp:
            return r
    return None


def _find_unfinished(runs_dir: Path, cv_fp: str) -> Path | None:
    """The newest unfinished CV folder under `runs_dir` with fingerprint `cv_fp`."""
    if not runs_dir.is_dir():
        return None
    found = [d for d in runs_dir.iterdir()
             if d.is_dir() and (d / FINGERPRINT_FILE).is_file() and not runs.is_complete(d)
             and (d / FINGERPRINT_FILE).read_text(encoding="utf-8").strip() == cv_fp]
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


def _cv_folder(resume: str | os.PathLike[str] | bool, runs_dir: Path, cv_fp: str,
               model: str) -> Path:
    if isinstance(resume, str | os.PathLike):
        run_dir = Path(resume)
        fpf = run_dir / FINGERPRINT_FILE
        if not fpf.is_file() or runs.is_complete(run_dir):
            raise FinetuneError(f"{run_dir} is not an unfinished cross-validation run folder")
        if fpf.read_text(encoding="utf-8").strip() != cv_fp:
            raise FinetuneError(f"{run_dir} was started with different data, split, model, "
                                "weights, settings or folds (fingerprint differs)")
        return run_dir
    if resume:
        found = _find_unfinished(runs_dir, cv_fp)
        if found is not None:
            logger.info("continuing the unfinished cross-validation in %s", found)
            return found
    run_dir = runs.new_run_dir(runs_dir, model.replace("_", "-"), "cv")
    write_text_atomic(run_dir / FINGERPRINT_FILE, cv_fp + "\n")
    return run_dir


@dataclass
class FinetuneCVResult:
    run_dir: Path
    record: runs.RunRecord
    folds_trained: list[int]  # folds trained in this call (the others were read back)
    skipped: list[tuple[str, str]]


@dataclass
class _Context:
    cfg: FinetuneConfig
    device: torch.device
    run_dir: Path
    cv_fp: str
    all_images: ImageSet
    normaliser: Normaliser
    position: dict[str, int]  # relpath -> row of all_images
    manifest_rows: list[ManifestRow]
    weights: str | None
    weights_dir: str | os.PathLike[str] | None
    weights_json: dict[str, Any]  # the run record's "weights" block
    preprocessing_json: dict[str, Any]
    progress: bool


def finetune_cv(
    data_dir: str | os.PathLike[str],
    split: str | os.PathLike[str],
    cfg: FinetuneConfig,
    folds: int = DEFAULT_FOLDS,
    weights: str | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    runs_dir: str | os.PathLike[str] = "runs",
    resume: str | os.PathLike[str] | bool = True,
    progress: bool = True,
) -> FinetuneCVResult:
    """K-fold CV of `cfg.model` over every image of the manifest (see the module doc); writes
    one run record of kind ``cv``. `resume` as in `featsvm.models.finetune.finetune`."""
    from featsvm.device import check_precision, resolve_device

    cfg = cfg.validate()
    t_start = time.perf_counter()
    data_dir = Path(data_dir)
    manifest = read_manifest(split)
    if not manifest.rows:
        raise ManifestError(f"split manifest {manifest.path} lists no images")
    device = resolve_device(cfg.device)
    check_precision(device, cfg.precision)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    y = np.asarray([r.label for r in manifest.rows])
    groups = np.asarray([r.group for r in manifest.rows])
    fold_parts = outer_folds(y, groups, folds, cfg.seed)  # the folds of `featsvm cv`

    if cfg.input != "field":
        raise FinetuneError(f"finetune --cv trains on the whole field only, not [finetune] input "
                            f"{cfg.input!r} (the cell view gives several inputs per image); "
                            "use `featsvm finetune --view cells` with the split, or `featsvm cv` "
                            "on a cell-view feature cache")
    probe = build_model(cfg.model, cfg, weights, weights_dir)  # weights id and transform
    cv_fp = cv_fingerprint(fingerprint(cfg, manifest.sha256, probe.weights, data_dir), folds)
    run_dir = _cv_folder(resume, Path(runs_dir), cv_fp, cfg.model)

    with FileLock(run_dir / TRAIN_LOCK, True, _run_busy):
        for tmp in [*remove_temp_files(run_dir),
                    *(t for d in run_dir.glob(f"{FOLD_PREFIX}*/") for t in remove_temp_files(d))]:
            logger.warning("removed %s, left in %s by a save that was killed", tmp.name, run_dir)
        t0 = time.perf_counter()
        normaliser = normaliser_for(probe.preprocessing)  # as finetune.load_images
        all_images, skipped = preload(data_dir, manifest.rows, probe.transform, normaliser,
                                      cfg.workers, progress, desc="decode all")
        preload_seconds = time.perf_counter() - t0
        for relpath, reason in skipped:
            logger.warning("skipped %s: %s", relpath, reason)
        ctx = _Context(cfg, device, run_dir, cv_fp, all_images, normaliser,
                       {r.relpath: i for i, r in enumerate(all_images.rows)}, manifest.rows,
                       weights, weights_dir, probe.weights.to_json(),
                       probe.preprocessing.to_json(), progress)
        del probe
        logger.info(f"cv {cfg.model}: {folds} grouped folds over {len(manifest.rows)} images "
                    f"({len(set(groups.tolist()))} groups) on {device}; run folder {run_dir}")
        outcomes: list[dict[str, Any]] = []
        trained: list[int] = []
        for k, (train, test) in enumerate(fold_parts):
            done = _read_fold(run_dir, k, cv_fp)
            if done is None:
                done = _train_fold(ctx, k, train, test, y, groups, folds)
                trained.append(k)
            else:
                logger.info("  fold %d/%d: already done (read back from %s)", k + 1, folds,
                            _fold_json(run_dir, k).name)
            outcomes.append(done)
        record = _write_record(ctx, manifest, outcomes, folds, skipped, preload_seconds,
                               t_start, str(data_dir))
        (run_dir / TRAIN_LOCK).unlink(missing_ok=True)
    return FinetuneCVResult(run_dir, record, trained, skipped)


# ---------------------------------------------------------------- one fold


def _fold_json(run_dir: Path, k: int) -> Path:
    return run_dir / f"{FOLD_PREFIX}{k + 1}.json"


def _read_fold(run_dir: Path, k: int, cv_fp: str) -> dict[str, Any] | None:
    path = _fold_json(run_dir, k)
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s); training fold %d again", path, exc, k + 1)
        return None
    if done.get("fingerprint") != cv_fp or done.get("fold") != k:
        logger.warning("%s belongs to another run; training fold %d again", path, k + 1)
        return None
    return done


def _subset(ctx: _Context, rows: np.ndarray, manifest_rows: list[ManifestRow]) -> ImageSet:
    """The decoded images of these manifest row indices (unusable images left out)."""
    pos = [ctx.position[manifest_rows[i].relpath] for i in rows
           if manifest_rows[i].relpath in ctx.position]
    idx = torch.tensor(pos, dtype=torch.long)
    s = ctx.all_images
    return ImageSet([s.rows[i] for i in pos], s.pixels[idx], s.targets[idx])


def _train_fold(ctx: _Context, k: int, train: np.ndarray, test: np.ndarray, y: np.ndarray,
                groups: np.ndarray, folds: int) -> dict[str, Any]:
    """Train fold `k` (resuming its checkpoint if there is one), predict its held-out part,
    write and return its ``fold-<k>.json``."""
    cfg, run_dir = ctx.cfg, ctx.run_dir
    t0 = time.perf_counter()
    manifest_rows = ctx.manifest_rows
    f_idx, v_idx = calibration_split(y[train], groups[train], cfg.seed + k)
    sets = {"train": _subset(ctx, train[f_idx], manifest_rows),
            "val": _subset(ctx, train[v_idx], manifest_rows),
            "test": _subset(ctx, test, manifest_rows)}
    if len(sets["train"]) < 2 or len(sets["val"]) == 0:
        raise FitError(f"fold {k + 1}: {len(sets['train'])} usable training and "
                       f"{len(sets['val'])} validation images; too few to train")
    fold_dir = run_dir / f"{FOLD_PREFIX}{k + 1}"
    fold_dir.mkdir(exist_ok=True)
    torch.manual_seed(cfg.seed + k)  # head initialisation of this fold
    built = build_model(cfg.model, cfg, ctx.weights, ctx.weights_dir)
    frozen_until = apply_freeze(built, cfg.freeze)
    images = TrainImages(sets, ctx.normaliser, [], 0.0)
    feeder, _augmentation, cache_seconds = make_feeder(built, images, cfg, ctx.device,
                                                       ctx.progress)
    opt = Optimisation.build(built.model, built.backbone, sets["train"].targets, cfg,
                             ctx.device)
    training = Training(cfg, ctx.device, fold_dir, ctx.cv_fp, built.model, feeder, opt, images,
                        ctx.progress, cache_seconds)
    training.resume()
    logger.info("fold %d/%d:", k + 1, folds)
    training.describe(frozen_until)
    training.run()
    st = training.state
    assert st.best_state is not None
    training.model.load_state_dict({n: v.to(ctx.device) for n, v in st.best_state.items()})
    raw_val = _predict(feeder, "val", len(sets["val"]))
    raw_test = _predict(feeder, "test", len(sets["test"]))
    val_idx = fm.label_indices([r.label for r in sets["val"].rows])
    temperature = calibration.fit_temperature(calibration.log_proba(raw_val), val_idx)
    proba = calibration.apply_temperature(raw_test, temperature)
    done = {
        "fold": k, "fingerprint": ctx.cv_fp,
        "relpath": [r.relpath for r in sets["test"].rows],
        "proba": proba.tolist(), "raw_proba": raw_test.tolist(),
        "val_relpath": [r.relpath for r in sets["val"].rows],
        "n_fit": len(sets["train"]), "n_val": len(sets["val"]), "n_test": len(sets["test"]),
        "temperature": temperature, "best_epoch": st.best_epoch, "epochs_run": st.epoch,
        "best_val_score": st.best_score, "stopped_early": st.stopped_early,
        "stopped_by_budget": st.stopped_by_budget, "train_seconds": st.train_seconds,
        "cache_seconds": cache_seconds, "resumed_from_epoch": st.resumed_from,
        "seconds": time.perf_counter() - t0,
    }
    write_json_atomic(_fold_json(run_dir, k), done)
    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
        (fold_dir / name).unlink(missing_ok=True)
    logger.info("  fold %d/%d: train %d, val %d, held out %d; best epoch %d (val %s %.4f), "
                "T %.3f; %.0f s", k + 1, folds, done["n_fit"], done["n_val"], done["n_test"],
                st.best_epoch, cfg.select_metric, st.best_score, temperature, done["seconds"])
    return done


# ---------------------------------------------------------------- the run record


def _pool(outcomes: list[dict[str, Any]], manifest: Manifest, run_dir: Path
          ) -> tuple[list[ManifestRow], CVResult]:
    """The held-out predictions of every fold, one row per image in manifest order."""
    by_rel: dict[str, tuple[int, list[float]]] = {}
    for done in outcomes:
        for rel, p in zip(done["relpath"], done["proba"], strict=True):
            if rel in by_rel:
                raise FinetuneError(f"{rel} was held out by two folds; delete {run_dir}")
            by_rel[rel] = (int(done["fold"]), p)
    rows = [r for r in manifest.rows if r.relpath in by_rel]
    proba = np.asarray([by_rel[r.relpath][1] for r in rows], dtype=np.float64)
    fold_of = np.asarray([by_rel[r.relpath][0] for r in rows], dtype=np.int64)
    results = [FoldResult(
        int(d["fold"]), int(d["n_fit"]), int(d["n_val"]), int(d["n_test"]),
        {"best_epoch": d["best_epoch"], "epochs_run": d["epochs_run"],
         "temperature": d["temperature"]},
        float(d["best_val_score"]), float(d["seconds"])) for d in outcomes]
    seconds = sum(float(d["seconds"]) for d in outcomes)
    return rows, CVResult(proba.reshape(-1, len(LABELS)), fold_of, results, "temperature",
                          seconds, 0.0)


def _write_record(ctx: _Context, manifest: Manifest, outcomes: list[dict[str, Any]], folds: int,
                  skipped: list[tuple[str, str]], preload_seconds: float, t_start: float,
                  data_dir: str) -> runs.RunRecord:
    """folds.json (+ sidecar: the run's "model file"), then `runs.finish_run`."""
    cfg, run_dir = ctx.cfg, ctx.run_dir
    rows, res = _pool(outcomes, manifest, run_dir)
    metrics = cv_metrics([r.label for r in rows], [r.group for r in rows], res,
                         n_boot=cfg.n_boot, seed=cfg.seed)
    write_json_atomic(run_dir / FOLDS_FILE, {
        "folds": folds,
        "fold_of": {r.relpath: int(f) for r, f in zip(rows, res.fold, strict=True)},
        "per_fold": [{k: v for k, v in d.items()
                      if k not in ("relpath", "proba", "raw_proba", "fingerprint")}
                     for d in outcomes],
    })
    config = _record_config(ctx, manifest, res, len(rows), folds)
    config.update({
        "model_sha256": runs.write_sidecar(run_dir / FOLDS_FILE),
        "data_dir": data_dir,
        "timing": {
            "fit_seconds": res.seconds,
            "fold_seconds": [f.seconds for f in res.folds],
            "preload_seconds": preload_seconds,
            "total_seconds": time.perf_counter() - t_start,
        },
        "skipped": [{"relpath": r, "reason": why} for r, why in skipped],
    })
    pooled = [dataclasses.replace(r, split=POOLED) for r in rows]
    record = runs.finish_run(run_dir, config, metrics, pooled, res.proba,
                             folds=[int(f) for f in res.fold])
    logger.info("run record: %s", run_dir)
    return record


def _record_config(ctx: _Context, manifest: Manifest, res: CVResult, n: int, folds: int
                   ) -> dict[str, Any]:
    """config.json of the run (a data table; `_write_record` adds paths, timing, skipped)."""
    cfg = ctx.cfg
    backbone = None if cfg.model == BASIC_CNN else cfg.model
    return {
        "run_id": ctx.run_dir.name,
        "kind": "cv",
        "model": model_name(cfg, backbone is not None),
        "backbone": backbone,
        "head": None,
        "weights": ctx.weights_json,
        "preprocessing": ctx.preprocessing_json,
        "split": {"path": str(manifest.path), "sha256": manifest.sha256, "n": {POOLED: n}},
        "seed": cfg.seed,
        "model_file": FOLDS_FILE,
        "device": str(ctx.device),
        "precision": cfg.precision,
        "fingerprint": ctx.cv_fp,
        "finetune": {k: v for k, v in _plain(cfg).items() if k not in ("models", "overrides")},
        "versions": runs.versions(),
        "created": runs.now_iso(),
        "cv": {
            "folds": folds,
            "splitter": f"StratifiedGroupKFold(n_splits={folds}, shuffle=True, "
                        f"random_state={cfg.seed}) over all images, groups = duplicate groups "
                        "(the folds of featsvm cv with the same seed)",
            "inner": f"a grouped, stratified 1/{CALIBRATION_PARTS} of each fold's training part "
                     "is its validation part (best epoch, early stopping, temperature); the "
                     "model trains on the rest; the held-out fold is predicted once",
            "hyperparameters": [f.best_params for f in res.folds],
        },
        "calibration": {
            "method": "temperature",
            "fitted_on": "each fold's validation part (metrics.json folds[].n_calibration)",
            "note": "never on the fold's own held-out part",
        },
        "bootstrap": {"n_boot": cfg.n_boot, "seed": cfg.seed, "unit": "duplicate group"},
    }
