"""Fit a classical head on cached embeddings and write its run record.

``fit(backbone, head, split_path, ...)``:

1. reads the split manifest and finds the feature cache for this backbone, weights,
   precision and layer (`features.cache.locate_cache`); a missing cache, or one that lacks any
   image of the split, is an error that names the ``featsvm extract`` command to run;
2. grid-searches the head on the train split (grouped CV, `models.heads.fit_head`), refits it
   on all of train, and calibrates its probabilities on the val split (temperature scaling by
   default, SVM and logreg);
3. predicts val and test once, scores them (`evaluation.metrics.score_predictions`), adds the
   calibration (ECE / Brier before and after) and abstention blocks (`evaluation.trust`; the
   confidence threshold is chosen on val), and writes
   ``runs/<backbone>-<head>-<date>-<time>/`` through `featsvm.runs` (model.skops + sidecar,
   predictions.csv, metrics.json, then config.json last).

The test split is used for nothing but the final scoring.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from featsvm.data.manifest import Manifest, read_manifest
from featsvm.errors import CoverageError, FitError, ManifestError, UsageError
from featsvm.evaluation.metrics import score_predictions
from featsvm.evaluation.ood import fit_ood_flag
from featsvm.evaluation.trust import run_blocks
from featsvm.models.heads import (
    FittedHead,
    HeadConfig,
    calibrate,
    decision_proba,
    fit_head,
    needs_calibration,
    temperature_of,
)
from featsvm.models.modelfile import MODEL_FILE, save_model, save_ood_flag
from featsvm.names import HEADS
from featsvm.runs import RunRecord, finish_run, new_run_dir, now_iso, versions

logger = logging.getLogger(__name__)


def _extract_hint(cached: Any) -> str:
    cmd = cached.attrs.get("extract_command") or ""
    return cmd or "featsvm extract DATA_DIR --backbone ... --cache ..."


def load_split_features(
    manifest: Manifest, cached: Any
) -> tuple[dict[str, np.ndarray], dict[str, list[Any]]]:
    """Features and manifest rows per split (train/val/test), looked up by sha256.

    Raises CoverageError listing how many images of each split are missing from the cache.
    """
    index = cached.index
    missing: dict[str, list[str]] = {}
    for r in manifest.rows:
        if r.sha256 not in index:
            missing.setdefault(r.split, []).append(r.relpath)
    if missing:
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(missing.items()))
        first = next(iter(missing.values()))[0]
        raise CoverageError(
            f"the feature cache {cached.path} lacks embeddings for images of the split "
            f"{manifest.path} ({counts}; first: {first}). It was probably built from another "
            f"image folder or interrupted. Complete it with: {_extract_hint(cached)}"
        )
    feats: dict[str, np.ndarray] = {}
    rows: dict[str, list[Any]] = {}
    for split in ("train", "val", "test"):
        rows[split] = manifest.subset(split)
        feats[split] = cached.lookup([r.sha256 for r in rows[split]])
    return feats, rows



def fit(
    backbone: str,
    head: str,
    split_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] = "cache",
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    runs_dir: str | os.PathLike[str] = "runs",
    config: HeadConfig | None = None,
    precision: str = "fp32",
    layer: str | None = None,
    progress: bool = True,
    options: Any = None,
) -> RunRecord:
    """Fit `head` on the cached `backbone` embeddings of the split's train images, score val
    and test, and write a complete run record with an OOD flag (`fit_ood_flag`). `options`:
    the `ImageOptions` (view, stain, colour) the cache was extracted with."""
    from featsvm.features.cache import locate_cache, read_cache

    if head not in HEADS:
        raise UsageError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    cfg = config or HeadConfig()
    t_start = time.perf_counter()
    manifest = read_manifest(split_path)
    cache_file = locate_cache(cache_dir, backbone, weights, weights_dir, precision, layer,
                              options)
    cached = read_cache(cache_file)
    feats, rows = load_split_features(manifest, cached)
    if not rows["train"]:
        raise ManifestError(f"split manifest {manifest.path} has no train images")
    if not rows["test"]:
        raise ManifestError(f"split manifest {manifest.path} has no test images")
    t_loaded = time.perf_counter()
    logger.info(f"fit {backbone} + {head}: {len(rows['train'])} train / {len(rows['val'])} "
                f"val / {len(rows['test'])} test images, {feats['train'].shape[1]}-d features "
                f"from {cache_file.name}")
    fitted = fit_and_calibrate(feats, rows, head, cfg, manifest, progress)
    fit_seconds = time.perf_counter() - t_loaded
    logger.info(f"best {fitted.best_params} (CV {cfg.scoring} {fitted.cv_best_score:.4f}); "
                f"fit {fit_seconds:.1f} s")

    t_pred = time.perf_counter()
    scored = rows["val"] + rows["test"]
    proba = np.concatenate(
        [fitted.predict_proba(feats[s]) for s in ("val", "test") if rows[s]], axis=0
    )
    predict_seconds = time.perf_counter() - t_pred
    metrics = score_predictions(manifest, scored, proba, n_boot=cfg.n_boot, seed=cfg.seed)
    metrics["calibration"], metrics["selective"], abstention = trust_blocks(
        fitted, feats, rows, proba, cfg)

    ood_flag, ood_info = fit_ood_flag(feats["train"], feats["val"], feats["test"])
    run_dir = new_run_dir(runs_dir, backbone, head)
    model_sha = save_model(run_dir, fitted, MODEL_FILE)
    ood_info = save_ood_flag(run_dir, ood_flag, ood_info)
    timing: dict[str, Any] = {
        "fit_seconds": fit_seconds, **fitted.timing, "predict_seconds": predict_seconds,
        "load_seconds": t_loaded - t_start, "total_seconds": time.perf_counter() - t_start,
        "backend": cfg.backend}
    for key in ("images_per_s", "extract_images_per_s"):
        if key in cached.attrs:
            timing["extract_images_per_s"] = cached.attrs[key]
    config_json = _run_config(run_dir.name, backbone, head, layer, cfg, manifest, rows, cached,
                              fitted, model_sha, timing, options=options, ood=ood_info)
    config_json["abstention"] = abstention
    record = finish_run(run_dir, config_json, metrics, scored, proba)
    logger.info("run record: %s", Path(run_dir))
    return record


def fit_and_calibrate(feats: dict[str, np.ndarray], rows: dict[str, list[Any]], head: str,
                      cfg: HeadConfig, manifest: Manifest, progress: bool) -> FittedHead:
    """Grid-search the head on train (grouped CV); calibrate it on val where it needs it."""
    fitted: FittedHead = fit_head(
        feats["train"], [r.label for r in rows["train"]], [r.group for r in rows["train"]],
        head, cfg, verbose=1 if progress else 0,
    )
    if needs_calibration(fitted):
        if not rows["val"]:
            raise FitError(
                f"{head} probabilities are calibrated on the val split ({fitted.calibration}), "
                f"but {manifest.path} has no val images; set [fit] calibration or re-split"
            )
        fitted = calibrate(fitted, feats["val"], [r.label for r in rows["val"]])
    return fitted


def trust_blocks(fitted: FittedHead, feats: dict[str, np.ndarray], rows: dict[str, list[Any]],
                 proba: np.ndarray, cfg: HeadConfig
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Calibration (before / after the val-fitted map) and abstention blocks
    (`featsvm.evaluation.trust`); `proba` = the head's val rows then its test rows."""
    calibrated = needs_calibration(fitted)
    n_val = len(rows["val"])
    # before = the frozen head's own softmax of decision values (T = 1)
    before = (np.concatenate([decision_proba(fitted, feats[s]) for s in ("val", "test")
                              if rows[s]], axis=0) if calibrated else None)
    scored = rows["val"] + rows["test"]

    def part(sl: slice) -> tuple[list[str], np.ndarray | None, np.ndarray, list[Any]]:
        rs = scored[sl]
        return ([r.label for r in rs], None if before is None else before[sl], proba[sl],
                [r.group for r in rs])

    return run_blocks(part(slice(0, n_val)), part(slice(n_val, None)), temperature_of(fitted),
                      fitted.calibration if calibrated else "none",
                      target_error=cfg.target_error, n_boot=cfg.n_boot, seed=cfg.seed)


def _run_config(run_id: str, backbone: str, head: str, layer: str | None, cfg: HeadConfig,
                manifest: Manifest, rows: dict[str, list[Any]], cached: Any,
                fitted: FittedHead, model_sha: str, timing: dict[str, Any],
                options: Any = None, ood: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a head run."""
    key = cached.key
    # an explicitly chosen embedding layer is part of the model's name (report rows)
    model_backbone = f"{backbone}[{key.layer}]" if layer else backbone
    if options is not None and options.to_dict():  # e.g. "alexnet<cells+reinhard> + logreg"
        from featsvm.features.preprocess import input_name

        model_backbone += f"<{input_name(options)}>"
    return {
        "run_id": run_id,
        "kind": "head",
        "model": f"{model_backbone} + {head}",
        "backbone": backbone,
        "head": head,
        "weights": cached.weights_record(),
        "preprocessing": key.preprocessing.to_json(),
        "not_imagenet_from": key.preprocessing.not_imagenet_from,
        "split": {
            "path": str(manifest.path),
            "sha256": manifest.sha256,
            "n": {s: len(rows[s]) for s in ("train", "val", "test")},
        },
        "seed": cfg.seed,
        "model_file": MODEL_FILE,
        "model_sha256": model_sha,
        "timing": timing,
        "versions": versions(),
        "created": now_iso(),
        "cache": cached.record(),
        "head_config": cfg.to_json(),
        "hyperparameters": fitted.best_params,
        "cv": _cv_block(cfg, fitted),
        "calibration": _calibration_block(fitted),
        "bootstrap": {"n_boot": cfg.n_boot, "seed": cfg.seed, "unit": "duplicate group"},
        "ood": ood,
    }


def _cv_block(cfg: HeadConfig, fitted: FittedHead) -> dict[str, Any]:
    return {
        "scoring": cfg.scoring,
        "splitter": f"StratifiedGroupKFold(n_splits={cfg.cv_folds}, shuffle=True, "
                    f"random_state={cfg.seed}) on train, groups = duplicate groups",
        "best_score": fitted.cv_best_score,
        "candidates": fitted.cv_results,
    }


def _calibration_block(fitted: FittedHead) -> dict[str, Any]:
    return {
        "method": fitted.calibration,
        "temperature": temperature_of(fitted),
        "fitted_on": "val" if needs_calibration(fitted) else None,
        "note": (
            "probability map fitted on the val split: val metrics are in-sample for it; "
            "test is untouched"
            if needs_calibration(fitted)
            else "the head's own probabilities"
        ),
    }
