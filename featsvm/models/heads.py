"""Classical heads on cached embeddings: scikit-learn pipelines and their search grids.

A head is ``Pipeline([scale, pca, clf])``: ``StandardScaler``, optional ``PCA``, then an SVM
(`KernelSVC`: RBF and linear kernels) or a multinomial ``LogisticRegression``. Its
hyperparameters are chosen by ``GridSearchCV`` over ``StratifiedGroupKFold`` on the *train*
split only (groups = duplicate groups from the split manifest, so near-copies of one cell never
sit on both sides of a CV fold), scored by balanced accuracy or macro-F1, then refitted on the
whole train split.

Probabilities. An SVM has none of its own; logistic regression has, but they are often
over- or under-confident. Both are calibrated on val by default:

* ``temperature`` (default for both), ``sigmoid`` or ``isotonic``: the refitted pipeline is
  frozen and a calibration map from its decision values to probabilities is fitted on the
  **val** split (`calibrate`, scikit-learn's ``CalibratedClassifierCV`` on a
  ``FrozenEstimator``). That is what the val split is for; the val metrics of such a run are
  therefore in-sample for the map (the run record says so), the test split stays untouched.
  Temperature scaling (one parameter, softmax of decision values / T) keeps every predicted
  label; per-class sigmoid or isotonic maps can change some arg-max decisions.
* ``none`` (logistic regression only): its own softmax probabilities.

`decision_proba` gives the probabilities *before* calibration (softmax of the decision
values, i.e. T = 1; logistic regression's own probabilities), so a run can report
calibration before and after; `temperature_of` reads the fitted T.

(libsvm's own Platt scaling, ``SVC(probability=True)``, is deprecated in scikit-learn 1.9 and
its internal 5-fold CV ignores duplicate groups, so it is not offered.)

Speed: libsvm evaluates kernels one pair at a time, about 20-35 s per fit on 2,000 x 4,096
features here. `KernelSVC` hands libsvm a precomputed Gram matrix instead (one BLAS matrix
product, cached per training matrix so every candidate of a CV fold shares it): the same
model, about 100x faster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.validation import check_is_fitted

from featsvm.cluster import joblib_backend
from featsvm.config import ConfigError, load_toml, section
from featsvm.errors import FitError, UsageError
from featsvm.labels import LABELS
from featsvm.names import BACKENDS, HEADS

SCORINGS = ("balanced_accuracy", "f1_macro")
CALIBRATIONS = ("auto", "temperature", "sigmoid", "isotonic", "none")
VAL_CALIBRATIONS = ("temperature", "sigmoid", "isotonic")
SECTION = "fit"
EXECUTION_ONLY = ("backend",)  # HeadConfig fields that cannot change a result


@dataclass(frozen=True)
class HeadConfig:
    """The ``[fit]`` section: search grids and fitting options (defaults in configs/heads.toml).

    ``pca``: grid of PCA sizes, 0 = no PCA, an integer >= 1 = that many components, a fraction
    in (0, 1) = the share of variance to keep. ``class_weight``: grid of "none" / "balanced"
    (default balanced only: benign is 15 % of the images, and on the real embeddings the CV
    scores of the two differed by < 0.003 while listing both doubles the search time).
    ``svm_C`` and ``svm_gamma_scale`` form the RBF grid; ``svm_gamma_scale`` holds multiples
    of scikit-learn's ``gamma="scale"`` (1 / (n_features x variance)), so one grid suits 512-d
    and 4,096-d features alike. ``svm_linear_C`` is the linear kernel's own C grid: CNN
    embeddings of a few thousand images are usually linearly separable, so a linear SVM needs
    much smaller C values than an RBF one before C changes anything.
    """

    scoring: str = "balanced_accuracy"
    cv_folds: int = 5
    seed: int = 0
    n_jobs: int = -1
    class_weight: tuple[str, ...] = ("balanced",)
    pca: tuple[float, ...] = (0,)
    svm_kernels: tuple[str, ...] = ("rbf", "linear")
    svm_C: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    svm_gamma_scale: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    svm_linear_C: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    logreg_C: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    logreg_max_iter: int = 3000
    calibration: str = "auto"
    n_boot: int = 1000
    # selective prediction: the val-chosen confidence threshold aims at this error rate
    target_error: float = 0.01
    # where the grid search and CV folds run: "local" processes or joblib's Ray backend
    # (featsvm.cluster). Not a setting of the model: left out of to_json, so runs made on
    # either backend are the same run (the run record notes it under timing).
    backend: str = "local"

    def to_json(self) -> dict[str, Any]:
        """The settings as a run record holds them (tuples as lists; without `backend`)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items() if k not in EXECUTION_ONLY}

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ConfigError(f"[fit] scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(
                f"[fit] calibration must be one of {CALIBRATIONS}, got {self.calibration!r}"
            )
        if not 0.0 <= self.target_error < 1.0:
            raise ConfigError(f"[fit] target_error must be in [0, 1), got {self.target_error}")
        if self.cv_folds < 2:
            raise ConfigError(f"[fit] cv_folds must be >= 2, got {self.cv_folds}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"[fit] backend must be one of {BACKENDS}, got {self.backend!r}")
        bad_cw = [c for c in self.class_weight if c not in ("none", "balanced")]
        if bad_cw or not self.class_weight:
            raise ConfigError(f"[fit] class_weight entries must be 'none' or 'balanced': {bad_cw}")
        bad_k = [k for k in self.svm_kernels if k not in ("rbf", "linear")]
        if bad_k or not self.svm_kernels:
            raise ConfigError(f"[fit] svm_kernels entries must be 'rbf' or 'linear': {bad_k}")
        if any(p < 0 for p in self.pca):
            raise ConfigError(f"[fit] pca entries must be >= 0 (0 = no PCA): {self.pca}")
        for name in ("svm_C", "svm_gamma_scale", "svm_linear_C", "logreg_C", "pca"):
            if not getattr(self, name):
                raise ConfigError(f"[fit] {name} must list at least one value")

    def calibration_for(self, head: str) -> str:
        """The calibration actually used: "auto" = temperature on val (SVM and logreg)."""
        if self.calibration == "auto":
            return "temperature"
        if head == "svm" and self.calibration == "none":
            raise ConfigError(
                "[fit] calibration = 'none' gives an SVM no probabilities; use 'temperature', "
                "'sigmoid' or 'isotonic' (fitted on the val split)"
            )
        return self.calibration


def load_head_config(path: str | os.PathLike[str] | None) -> HeadConfig:
    """The ``[fit]`` section of a TOML file (defaults when `path` is None or it has none)."""
    if path is None:
        return HeadConfig()
    return section(HeadConfig, load_toml(path), SECTION, str(path))


# ---------------------------------------------------------------- the SVM


@dataclass
class _TrainEntry:
    X: np.ndarray  # the training matrix itself (a reference, not a copy)
    gram: np.ndarray  # X X^T
    sq: np.ndarray  # squared row norms
    cross: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict)  # test X -> X_t X^T

    @property
    def nbytes(self) -> int:
        return self.X.nbytes + self.gram.nbytes + sum(c.nbytes for c in self.cross.values())


_GRAM_CACHE: OrderedDict[str, _TrainEntry] = OrderedDict()
_GRAM_CACHE_BYTES = 1 << 30  # per process
_CROSS_PER_TRAIN = 4


def _fingerprint(X: np.ndarray) -> str:
    X = np.ascontiguousarray(X)
    h = hashlib.blake2b(digest_size=16)
    h.update(str((X.shape, X.dtype.str)).encode())
    h.update(memoryview(X).cast("B"))
    return h.hexdigest()


def _gram(X: np.ndarray) -> tuple[str, _TrainEntry]:
    """(key, entry with X X^T and squared row norms), cached by content: every grid candidate
    of a CV fold sees the same scaled training matrix, so the product is done once per fold."""
    key = _fingerprint(X)
    hit = _GRAM_CACHE.get(key)
    if hit is not None:
        _GRAM_CACHE.move_to_end(key)
        return key, hit
    entry = _TrainEntry(X=X.copy(), gram=X @ X.T, sq=np.einsum("ij,ij->i", X, X))
    _GRAM_CACHE[key] = entry
    while len(_GRAM_CACHE) > 1 and sum(e.nbytes for e in _GRAM_CACHE.values()) > (
        _GRAM_CACHE_BYTES
    ):
        _GRAM_CACHE.popitem(last=False)
    return key, entry


def _cross_dots(train_key: str, X: np.ndarray) -> np.ndarray | None:
    """X @ X_train^T for a training matrix still in this process's cache (else None): every
    candidate of a CV fold scores the same validation rows against the same training rows."""
    entry = _GRAM_CACHE.get(train_key)
    if entry is None:
        return None
    key = _fingerprint(X)
    dots = entry.cross.get(key)
    if dots is None:
        dots = X @ entry.X.T
        entry.cross[key] = dots
        while len(entry.cross) > _CROSS_PER_TRAIN:
            entry.cross.popitem(last=False)
    return dots


class KernelSVC(ClassifierMixin, BaseEstimator):
    """``sklearn.svm.SVC`` with an RBF or linear kernel, computed with BLAS.

    Same model and parameters as ``SVC(kernel=..., C=..., gamma=...)`` (tests check the
    decision values agree), but the kernel matrix is one matrix product handed to libsvm as
    ``kernel="precomputed"``. Only the support vectors are kept for prediction.

    ``gamma`` is a float or "scale" (1 / (n_features x X.var()), as in SVC); ``gamma_scale``
    multiplies it, which makes grids independent of the feature dimension.
    """

    def __init__(
        self,
        kernel: str = "rbf",
        C: float = 1.0,
        gamma: float | str = "scale",
        gamma_scale: float = 1.0,
        class_weight: dict | str | None = None,
        tol: float = 1e-3,
        random_state: int | None = None,
    ) -> None:
        self.kernel = kernel
        self.C = C
        self.gamma = gamma
        self.gamma_scale = gamma_scale
        self.class_weight = class_weight
        self.tol = tol
        self.random_state = random_state

    def _kernel(self, sq_a: np.ndarray, sq_b: np.ndarray, dots: np.ndarray) -> np.ndarray:
        if self.kernel == "linear":
            return dots
        d2 = np.maximum(sq_a[:, None] + sq_b[None, :] - 2.0 * dots, 0.0)
        return np.exp(-self.gamma_ * d2)

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> KernelSVC:
        if self.kernel not in ("rbf", "linear"):
            raise ValueError(f"KernelSVC kernel must be 'rbf' or 'linear', got {self.kernel!r}")
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X must be (n, d) with one row per label; got {X.shape}, {len(y)}")
        if self.gamma == "scale":
            var = X.var()
            self.gamma_ = float(self.gamma_scale / (X.shape[1] * var)) if var > 0 else 1.0
        else:
            self.gamma_ = float(self.gamma) * float(self.gamma_scale)
        self._train_key, entry = _gram(X)
        sq = entry.sq
        K = self._kernel(sq, sq, entry.gram)
        svc = SVC(
            kernel="precomputed", C=self.C, class_weight=self.class_weight, tol=self.tol,
            random_state=self.random_state,
        )
        svc.fit(K, y, sample_weight=sample_weight)
        self.svc_ = svc
        self.classes_ = svc.classes_
        self.n_features_in_ = X.shape[1]
        self.support_vectors_ = X[svc.support_].copy()
        self._sv_sq = sq[svc.support_].copy()
        self._n_train = X.shape[0]
        return self

    def _test_kernel(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "svc_")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has shape {X.shape}; the model expects {self.n_features_in_} "
                             "features per row")
        cross = _cross_dots(getattr(self, "_train_key", ""), X)
        # inside a grid search: reuse this fold's test x train products
        dots = cross[:, self.svc_.support_] if cross is not None else X @ self.support_vectors_.T
        k_sv = self._kernel(np.einsum("ij,ij->i", X, X), self._sv_sq, dots)
        # libsvm reads a precomputed test kernel only at the support-vector columns
        K = np.zeros((X.shape[0], self._n_train))
        K[:, self.svc_.support_] = k_sv
        return K

    def decision_function(self, X: Any) -> np.ndarray:
        return self.svc_.decision_function(self._test_kernel(X))

    def predict(self, X: Any) -> np.ndarray:
        return self.svc_.predict(self._test_kernel(X))

    @property
    def n_support_(self) -> np.ndarray:
        return self.svc_.n_support_


# ---------------------------------------------------------------- pipelines and grids


def _class_weights(cfg: HeadConfig) -> list[str | None]:
    return [None if c == "none" else c for c in cfg.class_weight]


def _pca_options(cfg: HeadConfig) -> list[Any]:
    out: list[Any] = []
    for p in cfg.pca:
        if p == 0:
            out.append("passthrough")
        else:
            n = int(p) if p >= 1 else float(p)
            out.append(PCA(n_components=n, random_state=cfg.seed))
    return out


def build_pipeline(head: str, cfg: HeadConfig | None = None) -> Pipeline:
    """Unfitted ``Pipeline([scale, pca, clf])`` for `head` with the first grid value of each
    option (GridSearchCV then sets the rest)."""
    cfg = cfg or HeadConfig()
    if head == "svm":
        clf: Any = KernelSVC(
            kernel=cfg.svm_kernels[0], C=cfg.svm_C[0], gamma_scale=cfg.svm_gamma_scale[0],
            class_weight=_class_weights(cfg)[0], random_state=cfg.seed,
        )
    elif head == "logreg":
        # lbfgs on more than two classes fits the multinomial (softmax) model.
        clf = LogisticRegression(
            C=cfg.logreg_C[0], class_weight=_class_weights(cfg)[0], max_iter=cfg.logreg_max_iter,
            random_state=cfg.seed,
        )
    else:
        raise UsageError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    return Pipeline([("scale", StandardScaler()), ("pca", _pca_options(cfg)[0]), ("clf", clf)])


def param_grid(head: str, cfg: HeadConfig | None = None) -> list[dict[str, list[Any]]]:
    """The GridSearchCV grid for `head` (RBF and linear SVM sub-grids, or logistic C)."""
    cfg = cfg or HeadConfig()
    common = {"pca": _pca_options(cfg), "clf__class_weight": _class_weights(cfg)}
    if head == "svm":
        grids = []
        for kernel in cfg.svm_kernels:
            g: dict[str, list[Any]] = {**common, "clf__kernel": [kernel]}
            if kernel == "rbf":
                g["clf__C"] = list(cfg.svm_C)
                g["clf__gamma_scale"] = list(cfg.svm_gamma_scale)
            else:
                g["clf__C"] = list(cfg.svm_linear_C)
            grids.append(g)
        return grids
    if head == "logreg":
        return [{**common, "clf__C": list(cfg.logreg_C)}]
    raise UsageError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")


def _describe(value: Any) -> Any:
    """JSON-friendly form of a grid value (estimators become their repr)."""
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return repr(value)


# ---------------------------------------------------------------- fitting


@dataclass
class FittedHead:
    """A fitted head: the estimator plus what was chosen and how well it did in CV.

    `predict_proba` always returns the 4 columns of LABELS (a class absent from train gets
    probability 0). This object is what ``model.skops`` holds (`featsvm.models.modelfile`).
    """

    head: str
    estimator: Any
    best_params: dict[str, Any]
    cv_best_score: float
    cv_results: list[dict[str, Any]]
    scoring: str
    calibration: str = "none"
    timing: dict[str, float] = field(default_factory=dict)
    n_train: int = 0

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.estimator.classes_]

    def predict_proba(self, X: Any) -> np.ndarray:
        proba = np.asarray(self.estimator.predict_proba(X), dtype=np.float64)
        out = np.zeros((proba.shape[0], len(LABELS)))
        for j, cls in enumerate(self.classes):
            out[:, LABELS.index(cls)] = proba[:, j]
        return out

    def predict(self, X: Any) -> list[str]:
        return [LABELS[i] for i in self.predict_proba(X).argmax(axis=1)]


def make_cv(cfg: HeadConfig, y: np.ndarray, groups: np.ndarray) -> StratifiedGroupKFold:
    """StratifiedGroupKFold with cfg.cv_folds folds; errors when there are too few groups."""
    n_groups = len(np.unique(groups))
    if n_groups < cfg.cv_folds:
        raise FitError(
            f"train split has {n_groups} duplicate groups, fewer than cv_folds={cfg.cv_folds}; "
            "lower [fit] cv_folds in the config"
        )
    return StratifiedGroupKFold(n_splits=cfg.cv_folds, shuffle=True, random_state=cfg.seed)


def fit_head(
    X_train: Any,
    y_train: Any,
    groups_train: Any,
    head: str,
    cfg: HeadConfig | None = None,
    verbose: int = 0,
) -> FittedHead:
    """Grid-search `head` on the train split (grouped, stratified CV), refit on all of train.

    The returned head has probabilities unless its calibration is one of VAL_CALIBRATIONS, in
    which case `calibrate` must be called with the val split.
    """
    cfg = cfg or HeadConfig()
    X = np.asarray(X_train, dtype=np.float64)
    y = np.asarray([str(v) for v in y_train])
    groups = np.asarray(groups_train)
    if not (len(X) == len(y) == len(groups)):
        raise ValueError(
            f"X_train has {len(X)} rows, y_train {len(y)}, groups_train {len(groups)}"
        )
    if len(np.unique(y)) < 2:
        raise FitError("the train split holds fewer than two classes; nothing to learn")
    if not np.all(np.isfinite(X)):
        raise FitError("training features contain NaN or infinite values; run featsvm extract "
                       "again: it drops non-finite rows from the cache and recomputes them")
    calibration = cfg.calibration_for(head)
    search = GridSearchCV(
        build_pipeline(head, cfg),
        param_grid(head, cfg),
        scoring=cfg.scoring,
        cv=make_cv(cfg, y, groups),
        n_jobs=cfg.n_jobs,
        refit=True,
        error_score="raise",
        verbose=verbose,
    )
    t0 = time.perf_counter()
    with joblib_backend(cfg.backend, cfg.n_jobs):
        search.fit(X, y, groups=groups)
    seconds = time.perf_counter() - t0
    res = search.cv_results_
    cv_results = [
        {
            "params": {k: _describe(v) for k, v in res["params"][i].items()},
            "mean_test_score": float(res["mean_test_score"][i]),
            "std_test_score": float(res["std_test_score"][i]),
            "rank": int(res["rank_test_score"][i]),
            "mean_fit_time": float(res["mean_fit_time"][i]),
        }
        for i in range(len(res["params"]))
    ]
    return FittedHead(
        head=head,
        estimator=search.best_estimator_,
        best_params={k: _describe(v) for k, v in search.best_params_.items()},
        cv_best_score=float(search.best_score_),
        cv_results=cv_results,
        scoring=cfg.scoring,
        calibration=calibration,
        timing={"grid_search_seconds": seconds, "refit_seconds": float(search.refit_time_)},
        n_train=len(y),
    )


def decision_proba(fitted: FittedHead, X: Any) -> np.ndarray:
    """Probabilities before any calibration map, LABELS columns: the softmax of the head's
    decision values (what temperature scaling starts from, T = 1). For logistic regression
    these are its own probabilities; a class absent from train gets 0."""
    est = decision_estimator(fitted)
    z = np.asarray(est.decision_function(np.asarray(X, dtype=np.float64)), dtype=np.float64)
    if z.ndim == 1:  # two classes: the decision value of the second
        z = np.stack([-z, z], axis=1)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    out = np.zeros((p.shape[0], len(LABELS)))
    for j, cls in enumerate(est.classes_):
        out[:, LABELS.index(str(cls))] = p[:, j]
    return out


def decision_estimator(fitted: FittedHead) -> Any:
    """The head without its calibration map (the frozen pipeline inside a calibrated head):
    its decision values are the logits the map starts from (T = 1)."""
    est = fitted.estimator
    if isinstance(est, CalibratedClassifierCV):
        est = est.estimator.estimator if isinstance(est.estimator, FrozenEstimator) else (
            est.estimator)
    return est


def temperature_of(fitted: FittedHead) -> float | None:
    """The temperature T of a head calibrated with method "temperature" (None otherwise)."""
    est = fitted.estimator
    if fitted.calibration != "temperature" or not isinstance(est, CalibratedClassifierCV):
        return None
    try:
        beta = float(est.calibrated_classifiers_[0].calibrators[0].beta_)
    except (AttributeError, IndexError):
        return None
    return 1.0 / beta if beta > 0 else None


def needs_calibration(fitted: FittedHead) -> bool:
    return fitted.calibration in VAL_CALIBRATIONS


def calibrate(fitted: FittedHead, X_val: Any, y_val: Any) -> FittedHead:
    """Fit the probability map of a frozen head on the val split (temperature, sigmoid or
    isotonic).

    The head itself is not refitted; only the map from its decision values to probabilities
    is learnt on val. The test split is never used. Every class the head knows must occur in
    val (a map cannot be fitted for an absent class).
    """
    if not needs_calibration(fitted):
        raise FitError(f"head calibration is {fitted.calibration!r}; nothing to fit on val")
    y = np.asarray([str(v) for v in y_val])
    if len(y) == 0:
        raise FitError("the val split is empty; calibration needs val images")
    absent = sorted(set(fitted.classes) - set(y.tolist()))
    if absent:
        raise FitError(
            f"cannot calibrate on val: class(es) {absent} never occur in the val split; "
            "re-split so that val holds every class, or set [fit] calibration"
        )
    t0 = time.perf_counter()
    everything = np.arange(len(y))
    # The estimator is frozen, so "cross-validation" is a single pass over all of val.
    cal = CalibratedClassifierCV(
        FrozenEstimator(fitted.estimator), method=fitted.calibration,
        cv=[(everything, everything)],
    )
    cal.fit(np.asarray(X_val, dtype=np.float64), y)
    return FittedHead(
        head=fitted.head,
        estimator=cal,
        best_params=fitted.best_params,
        cv_best_score=fitted.cv_best_score,
        cv_results=fitted.cv_results,
        scoring=fitted.scoring,
        calibration=fitted.calibration,
        timing={**fitted.timing, "calibration_seconds": time.perf_counter() - t0},
        n_train=fitted.n_train,
    )
