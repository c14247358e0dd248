"""Pooled, grouped K-fold cross-validation of a head over **all** images of a split manifest.

One test split of ~300 images cannot rank models whose errors are a handful of images: one
benign error moves specificity by 2 points. ``cross_validate`` scores every image exactly once
instead, by a model that never saw it nor any image of its duplicate group:

1. Outer folds: ``StratifiedGroupKFold(folds, shuffle=True, random_state=seed)`` over every
   image of the manifest (train, val and test alike), groups = the manifest's duplicate
   groups (the same groups the split keeps together), labels = the manifest labels.
2. Inside each fold's training part, the head is tuned exactly as `featsvm fit` tunes it
   (`models.heads.fit_head`: grid search with its own grouped, stratified inner CV, then a refit).
3. Probabilities. Logistic regression has its own. An SVM's are calibrated (temperature scaling
   by default, `models.heads.calibrate`) on a **calibration part of the fold's training data**:
   one of ``calibration_parts`` (default 9) grouped, stratified parts of it, chosen by
   ``StratifiedGroupKFold``; the head is tuned and fitted on the other parts. That mirrors
   `featsvm fit` (train 80 % / val 10 % of the images: 8 to 1) and never touches the fold's
   own test part. (Temperature scaling keeps every arg-max decision, so only the probability
   scale, i.e. ROC-AUC ties and calibration, depends on it.)
4. The out-of-fold probabilities of all folds are pooled: one row per image. Metrics are
   computed once over the pool, with 95 % CIs by bootstrap over duplicate groups
   (`evaluation.metrics.score_block`), plus every fold's own metrics and their spread.

The run record (kind ``cv``) has the usual files: ``predictions.csv`` (split ``pooled`` and a
``fold`` column), ``metrics.json`` (``{"pooled": block, "folds": [...], "fold_spread": {...}}``;
``pooled`` has the layout of a ``test`` block) and ``config.json``. Its "model file" is
``folds.json`` (fold of every image, hyperparameters chosen in every fold): a CV run holds no
deployable model (use ``featsvm fit`` for one).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from sklearn.model_selection import StratifiedGroupKFold
from threadpoolctl import threadpool_limits

from featsvm.cluster import joblib_backend
from featsvm.config import build, load_toml
from featsvm.data.manifest import Manifest, read_manifest
from featsvm.errors import CoverageError, FitError, ManifestError, UsageError
from featsvm.evaluation.metrics import score_block
from featsvm.features.key import FeatureKey
from featsvm.fileio import write_json_atomic
from featsvm.models.heads import HeadConfig, calibrate, fit_head, needs_calibration
from featsvm.names import HEADS
from featsvm.runs import RunRecord, finish_run, new_run_dir, now_iso, versions, write_sidecar

logger = logging.getLogger(__name__)

DEFAULT_FOLDS = 10
CALIBRATION_PARTS = 9  # the calibration part is 1/9 of a fold's training part (train:val 8:1)
POOLED = "pooled"  # the metrics block and the predictions.csv split name of a CV run
FOLDS_FILE = "folds.json"
CV_SECTION = "cv"
SPREAD_KEYS = (
    "accuracy", "balanced_accuracy", "macro_f1", "mcc", "roc_auc_ovr", "binary.sensitivity",
    "binary.specificity", "binary.precision", "binary.roc_auc",
)


# ---------------------------------------------------------------- configuration


def load_cv_head_config(path: str | os.PathLike[str] | None) -> HeadConfig:
    """The heads' settings inside `featsvm cv`: the file's ``[fit]`` section with its ``[cv]``
    section's keys on top (same keys as ``[fit]``; e.g. a smaller grid for the K nested
    searches). Defaults when `path` is None."""
    if path is None:
        return HeadConfig()
    doc = load_toml(path)
    return cv_head_config(doc, str(path))


def cv_head_config(doc: dict[str, Any], source: str = "") -> HeadConfig:
    fit = doc.get("fit") or {}
    over = doc.get(CV_SECTION) or {}
    if not isinstance(fit, dict) or not isinstance(over, dict):
        raise UsageError(f"{source}: [fit] and [{CV_SECTION}] must be tables")
    return build(HeadConfig, {**fit, **over}, f"{source} [fit] + [{CV_SECTION}]")


# ---------------------------------------------------------------- the folds


def outer_folds(
    y: np.ndarray, groups: np.ndarray, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, test indices) of every outer fold: stratified, whole groups only."""
    n_groups = len(np.unique(groups))
    if folds < 2:
        raise UsageError(f"cross-validation needs at least 2 folds, got {folds}")
    if n_groups < folds:
        raise FitError(f"{n_groups} duplicate groups cannot fill {folds} folds; use fewer folds")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.asarray(tr), np.asarray(te))
            for tr, te in splitter.split(np.zeros(len(y)), y, groups)]


def calibration_split(
    y: np.ndarray, groups: np.ndarray, seed: int, parts: int = CALIBRATION_PARTS
) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, calibration indices) inside one fold's training part: the calibration
    part is the first of `parts` stratified, grouped parts (fewer parts when the rarest class
    has fewer than `parts` groups: small data sets; the record keeps each fold's counts)."""
    per_class = [len(np.unique(groups[y == c])) for c in np.unique(y)]
    parts = max(2, min(parts, min(per_class)))
    n_groups = len(np.unique(groups))
    if n_groups < parts:
        raise FitError(f"a fold's training part has {n_groups} groups, too few to hold out a "
                       f"calibration part (1 of {parts})")
    splitter = StratifiedGroupKFold(n_splits=parts, shuffle=True, random_state=seed)
    fit_idx, cal_idx = next(splitter.split(np.zeros(len(y)), y, groups))
    return np.asarray(fit_idx), np.asarray(cal_idx)


@dataclass
class FoldResult:
    fold: int
    n_fit: int  # images the head was tuned and fitted on
    n_calibration: int  # images its probability map was fitted on (0: the head's own)
    n_test: int
    best_params: dict[str, Any]
    cv_best_score: float
    seconds: float


@dataclass
class CVResult:
    proba: np.ndarray  # (n, 4) out-of-fold probabilities, columns in LABELS order
    fold: np.ndarray  # (n,) fold index of every image
    folds: list[FoldResult] = field(default_factory=list)
    calibration: str = "none"
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of all folds (summed over the processes that ran them)


def cross_validate_features(
    X: Any,
    y: Any,
    groups: Any,
    head: str,
    cfg: HeadConfig | None = None,
    folds: int = DEFAULT_FOLDS,
    seed: int | None = None,
) -> CVResult:
    """Out-of-fold probabilities for every row of `X` (see the module doc, steps 1-4).

    `seed` (default: ``cfg.seed``) seeds the outer folds; every fold's calibration part is
    seeded by ``seed + fold``."""
    cfg = cfg or HeadConfig()
    seed = cfg.seed if seed is None else seed
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray([str(v) for v in y])
    groups = np.asarray(groups)
    if not len(X) == len(y) == len(groups):
        raise ValueError(f"X has {len(X)} rows, y {len(y)}, groups {len(groups)}")
    if head not in HEADS:
        raise UsageError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if head == "logreg" and cfg.calibration == "auto":
        # pooled CV keeps logistic regression's own probabilities, so the whole training part
        # of a fold trains it (runs with a val split temperature-scale it there, `fit`)
        cfg = dataclasses.replace(cfg, calibration="none")
    calibration = cfg.calibration_for(head)
    proba = np.full((len(y), 4), np.nan)
    fold_of = np.full(len(y), -1, dtype=np.int64)
    results: list[FoldResult] = []
    t_all = time.perf_counter()
    # Parallel over the outer folds (cfg.n_jobs processes), each fold's own grid search in
    # one process with one BLAS thread: every candidate of an inner fold then shares the
    # KernelSVC Gram cache, and no BLAS threads spin against each other (measured on the
    # 2-core machine: a logistic fit took 7x less CPU with one BLAS thread than with two).
    inner = dataclasses.replace(cfg, n_jobs=1, backend="local")
    jobs = (delayed(_fold)(k, tr, te, X, y, groups, head, inner, calibration, seed + k)
            for k, (tr, te) in enumerate(outer_folds(y, groups, folds, seed)))
    cpu = 0.0
    if cfg.n_jobs == 1:  # in this process (no worker start-up; what the tests patch)
        outputs: Any = (job[0](*job[1], **job[2]) for job in jobs)
    else:
        outputs = _parallel(cfg, jobs)
    for test, p_test, fr, fold_cpu in outputs:
        proba[test] = p_test
        fold_of[test] = fr.fold
        results.append(fr)
        cpu += fold_cpu
        logger.info("  fold %d/%d: fit %d, calibration %d, test %d; %s; %.1f s", fr.fold + 1,
                    folds, fr.n_fit, fr.n_calibration, fr.n_test, fr.best_params, fr.seconds)
    assert (fold_of >= 0).all(), "every image is scored by exactly one fold"
    return CVResult(proba, fold_of, results, calibration, time.perf_counter() - t_all, cpu)


def _parallel(cfg: HeadConfig, jobs: Any) -> Iterator[Any]:
    """The folds on cfg.n_jobs joblib workers of cfg.backend, in fold order (streamed back
    locally; joblib's Ray backend returns them all at once)."""
    with joblib_backend(cfg.backend, cfg.n_jobs):
        as_ = "generator" if cfg.backend == "local" else "list"
        yield from Parallel(n_jobs=cfg.n_jobs, return_as=as_)(jobs)


def _fold(
    k: int, train: np.ndarray, test: np.ndarray, X: np.ndarray, y: np.ndarray,
    groups: np.ndarray, head: str, cfg: HeadConfig, calibration: str, seed: int,
) -> tuple[np.ndarray, np.ndarray, FoldResult, float]:
    """One outer fold: (test indices, their probabilities, what was done, CPU seconds)."""
    t0, c0 = time.perf_counter(), time.process_time()
    with threadpool_limits(1):
        cal = np.zeros(0, dtype=np.int64)
        fit_rows = train
        if calibration != "none":
            f_idx, c_idx = calibration_split(y[train], groups[train], seed)
            fit_rows, cal = train[f_idx], train[c_idx]
        fitted = fit_head(X[fit_rows], y[fit_rows], groups[fit_rows], head, cfg)
        if needs_calibration(fitted):
            fitted = calibrate(fitted, X[cal], y[cal])
        p_test = fitted.predict_proba(X[test])
    fr = FoldResult(k, len(fit_rows), len(cal), len(test), fitted.best_params,
                    fitted.cv_best_score, time.perf_counter() - t0)
    return test, p_test, fr, time.process_time() - c0


# ---------------------------------------------------------------- metrics


def _dotted(block: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        block = block.get(part) if isinstance(block, dict) else None  # type: ignore[assignment]
    return block


def cv_metrics(
    y: Any, groups: Any, res: CVResult, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """``{"pooled": block, "folds": [...], "fold_spread": {...}}`` (metrics.json of a CV run)."""
    extras = {fr.fold: {"best_params": fr.best_params, "inner_cv_score": fr.cv_best_score,
                        "n_fit": fr.n_fit, "n_calibration": fr.n_calibration,
                        "seconds": fr.seconds} for fr in res.folds}
    return pooled_metrics(y, groups, res.proba, res.fold, extras, n_boot=n_boot, seed=seed)


def pooled_metrics(
    y: Any, groups: Any, proba: np.ndarray, fold: Any, fold_extras: Mapping[int, dict[str, Any]],
    n_boot: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """metrics.json of any pooled out-of-fold predictions (`cv_metrics`; also
    `featsvm.ensemble`): the pooled block with group-bootstrap CIs (`score_block`), every
    fold's block (no CIs) with `fold_extras[fold]` added, and the spread over the folds."""
    y = [str(v) for v in y]
    groups = list(groups)
    fold = np.asarray(fold)
    pooled = score_block(y, proba, groups, n_boot=n_boot, seed=seed)
    folds: list[dict[str, Any]] = []
    for k, extra in fold_extras.items():
        idx = np.flatnonzero(fold == k)
        block = score_block([y[i] for i in idx], proba[idx], [groups[i] for i in idx],
                            n_boot=0)
        block.pop("ci95", None)
        block.pop("bootstrap", None)
        folds.append({"fold": k, **block, **extra})
    spread: dict[str, Any] = {}
    for key in SPREAD_KEYS:
        vals = np.array([v for v in (_dotted(f, key) for f in folds) if v is not None], float)
        if vals.size:
            spread[key] = {"mean": float(vals.mean()),
                           "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
                           "min": float(vals.min()), "max": float(vals.max()),
                           "n_folds": int(vals.size)}
    return {POOLED: pooled, "folds": folds, "fold_spread": spread}


# ---------------------------------------------------------------- the run record


def _features_for_all(manifest: Manifest, cached: Any) -> np.ndarray:
    index = cached.index
    missing = [r.relpath for r in manifest.rows if r.sha256 not in index]
    if missing:
        hint = cached.attrs.get("extract_command") or "featsvm extract DATA_DIR --backbone ..."
        raise CoverageError(
            f"the feature cache {cached.path} lacks embeddings for {len(missing)} image(s) of "
            f"{manifest.path} (first: {missing[0]}); complete it with: {hint}"
        )
    return cached.lookup([r.sha256 for r in manifest.rows])



def cross_validate(
    backbone: str,
    head: str,
    split_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] = "cache",
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    runs_dir: str | os.PathLike[str] = "runs",
    config: HeadConfig | None = None,
    folds: int = DEFAULT_FOLDS,
    precision: str = "fp32",
    layer: str | None = None,
    progress: bool = True,
    options: Any = None,
) -> RunRecord:
    """K-fold CV of `head` on the cached `backbone` embeddings of every image of the manifest;
    writes a run record of kind ``cv`` (see the module doc). `options`: the
    `featsvm.features.preprocess.ImageOptions` (view, stain, colour) of the cache."""
    from featsvm.features.cache import locate_cache, read_cache

    if head not in HEADS:
        raise UsageError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    cfg = config or HeadConfig()
    t_start = time.perf_counter()
    manifest = read_manifest(split_path)
    if not manifest.rows:
        raise ManifestError(f"split manifest {manifest.path} lists no images")
    cache_file = locate_cache(cache_dir, backbone, weights, weights_dir, precision, layer,
                              options)
    cached = read_cache(cache_file)
    X = _features_for_all(manifest, cached)
    rows = manifest.rows
    y = [r.label for r in rows]
    groups = [r.group for r in rows]

    logger.info(f"cv {backbone} + {head}: {folds} grouped folds over {len(rows)} images "
                f"({len(set(groups))} groups), {X.shape[1]}-d features from {cache_file.name}")
    res = cross_validate_features(X, y, groups, head, cfg, folds)
    metrics = cv_metrics(y, groups, res, n_boot=cfg.n_boot, seed=cfg.seed)

    run_dir = new_run_dir(runs_dir, backbone, head, "cv")
    write_json_atomic(run_dir / FOLDS_FILE, {
        "folds": folds,
        "fold_of": {r.relpath: int(f) for r, f in zip(rows, res.fold, strict=True)},
        "per_fold": [dataclasses.asdict(f) for f in res.folds],
    })
    folds_sha = write_sidecar(run_dir / FOLDS_FILE)
    config_json = _run_config(run_dir, backbone, head, layer, cfg, folds, manifest, cached,
                              res, folds_sha, t_start, options)
    pooled = [dataclasses.replace(r, split=POOLED) for r in rows]
    record = finish_run(run_dir, config_json, metrics, pooled, res.proba,
                        folds=[int(f) for f in res.fold])
    logger.info("run record: %s", Path(run_dir))
    return record


def _run_config(
    run_dir: Path, backbone: str, head: str, layer: str | None, cfg: HeadConfig, folds: int,
    manifest: Manifest, cached: Any, res: CVResult,
    folds_sha: str, t_start: float, options: Any = None,
) -> dict[str, Any]:
    """config.json of a CV run (the keys of a head run's, kind ``cv``)."""
    key = cached.key
    model_backbone = f"{backbone}[{key.layer}]" if layer else backbone
    if options is not None and options.to_dict():  # e.g. "alexnet<cells> + logreg"
        from featsvm.features.preprocess import input_name

        model_backbone += f"<{input_name(options)}>"
    calibrated = res.calibration != "none"
    return {
        "run_id": run_dir.name,
        "kind": "cv",
        "model": f"{model_backbone} + {head}",
        "backbone": backbone,
        "head": head,
        "weights": cached.weights_record(),
        "preprocessing": key.preprocessing.to_json(),
        "not_imagenet_from": key.preprocessing.not_imagenet_from,
        "split": {"path": str(manifest.path), "sha256": manifest.sha256,
                  "n": {POOLED: len(manifest.rows)}},
        "seed": cfg.seed,
        "model_file": FOLDS_FILE,
        "model_sha256": folds_sha,
        "timing": {
            "fit_seconds": res.seconds,
            "fit_cpu_seconds": res.cpu_seconds,
            "n_jobs": cfg.n_jobs,
            "backend": cfg.backend,
            "fold_seconds": [f.seconds for f in res.folds],
            "total_seconds": time.perf_counter() - t_start,
        },
        "versions": versions(),
        "created": now_iso(),
        "cache": cached.record(),
        "head_config": cfg.to_json(),
        "cv": {
            "folds": folds,
            "splitter": f"StratifiedGroupKFold(n_splits={folds}, shuffle=True, "
                        f"random_state={cfg.seed}) over all images, groups = duplicate groups",
            "inner": f"grid search, StratifiedGroupKFold(n_splits={cfg.cv_folds}) inside each "
                     "fold's training part (as featsvm fit)",
            "hyperparameters": [f.best_params for f in res.folds],
        },
        "calibration": {
            "method": res.calibration,
            "fitted_on": (f"a grouped, stratified 1/{CALIBRATION_PARTS} of each fold's training "
                          "part (the head is tuned and fitted on the rest; counts per fold in "
                          "metrics.json folds[].n_calibration)") if calibrated else None,
            "note": ("never on the fold's own test part" if calibrated
                     else "the head's own probabilities"),
        },
        "bootstrap": {"n_boot": cfg.n_boot, "seed": cfg.seed, "unit": "duplicate group"},
    }


def find_cv_run(
    runs: list[RunRecord], key: FeatureKey, head: str, split_sha: str,
    head_config: HeadConfig, folds: int,
) -> RunRecord | None:
    """A complete CV run on the embeddings `key` names, with the same head, split, head
    settings and folds."""
    import json

    want = json.loads(json.dumps(head_config.to_json()))
    for r in reversed(runs):
        c = r.config
        if (c.get("kind") == "cv" and c.get("backbone") == key.backbone
                and c.get("head") == head
                and (c.get("split") or {}).get("sha256") == split_sha
                and (c.get("cache") or {}).get("fingerprint") == key.fingerprint
                and (c.get("cv") or {}).get("folds") == folds
                and c.get("head_config") == want):
            return r
    return None
