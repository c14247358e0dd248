"""models.heads: KernelSVC == SVC, grids, grouped CV without leaks, probabilities, calibration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from sklearn.svm import SVC

from featsvm.config import ConfigError
from featsvm.labels import LABELS
from featsvm.models import heads as H

REPO = Path(__file__).resolve().parents[1]

# A small, fast grid (one process: loky start-up would dominate these tiny fits).
SMALL = H.HeadConfig(cv_folds=3, n_jobs=1, svm_C=(1.0, 10.0), svm_gamma_scale=(1.0,),
                     svm_linear_C=(0.1,), logreg_C=(0.1, 1.0), class_weight=("balanced",))


def blobs(n: int = 240, d: int = 16, seed: int = 0, sep: float = 3.0,
          classes: tuple[str, ...] = LABELS) -> tuple[np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(classes), n)
    centres = rng.normal(0, sep, (len(classes), d))
    X = centres[y] + rng.normal(0, 1, (n, d))
    return X, [classes[i] for i in y], np.arange(n) // 2  # pairs of images share a group


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_kernel_svc_matches_sklearn_svc(kernel: str, class_weight: str | None) -> None:
    X, y, _ = blobs(150, 10, sep=0.8)
    ours = H.KernelSVC(kernel=kernel, C=2.0, gamma=0.05, class_weight=class_weight).fit(X, y)
    ref = SVC(kernel=kernel, C=2.0, gamma=0.05, class_weight=class_weight).fit(X, y)
    Xt = blobs(50, 10, seed=1, sep=0.8)[0]
    np.testing.assert_allclose(ours.decision_function(Xt), ref.decision_function(Xt),
                               rtol=1e-6, atol=1e-8)
    assert (ours.predict(Xt) == ref.predict(Xt)).all()
    assert list(ours.classes_) == list(ref.classes_)
    assert (ours.n_support_ == ref.n_support_).all()


def test_gamma_scale_multiplies_sklearn_scale() -> None:
    X, y, _ = blobs(80, 12)
    ours = H.KernelSVC(gamma="scale", gamma_scale=3.0).fit(X, y)
    assert ours.gamma_ == pytest.approx(3.0 / (X.shape[1] * X.var()))
    ref = SVC(gamma=ours.gamma_).fit(X, y)
    # same model up to libsvm's stopping tolerance (the kernels differ in the last bits)
    np.testing.assert_allclose(ours.decision_function(X[:20]), ref.decision_function(X[:20]),
                               atol=1e-3)


def test_gram_cache_is_keyed_by_content() -> None:
    X, y, _ = blobs(30, 5)
    k1, e1 = H._gram(X)
    k2, e2 = H._gram(X.copy())
    assert k1 == k2 and e1 is e2  # same content, same cached matrix
    X2 = X.copy()
    X2[0, 0] += 1e-9
    assert H._gram(X2)[1] is not e1


def test_cached_and_uncached_prediction_agree() -> None:
    X, y, _ = blobs(120, 8, sep=0.8)
    model = H.KernelSVC(C=3.0).fit(X[:80], y[:80])
    cached = model.decision_function(X[80:])  # test x train products from the fold cache
    assert H._cross_dots(model._train_key, X[80:]) is not None
    H._GRAM_CACHE.clear()  # as in a fresh process that loaded the model from disk
    fresh = model.decision_function(X[80:])
    np.testing.assert_allclose(cached, fresh, rtol=1e-9, atol=1e-9)


def test_config_defaults_match_configs_file_and_validate(tmp_path: Path) -> None:
    assert H.load_head_config(REPO / "configs" / "heads.toml") == H.HeadConfig()
    assert H.load_head_config(None) == H.HeadConfig()
    bad = tmp_path / "bad.toml"
    bad.write_text('[fit]\nsvm_c = [1.0]\n')
    with pytest.raises(ConfigError, match="unknown key"):
        H.load_head_config(bad)
    with pytest.raises(ConfigError, match="scoring"):
        H.HeadConfig(scoring="accuracy")
    with pytest.raises(ConfigError, match="class_weight"):
        H.HeadConfig(class_weight=("heavy",))
    with pytest.raises(ConfigError, match="no probabilities"):
        H.HeadConfig(calibration="none").calibration_for("svm")
    assert H.HeadConfig().calibration_for("svm") == "temperature"
    assert H.HeadConfig().calibration_for("logreg") == "temperature"
    assert H.HeadConfig(calibration="none").calibration_for("logreg") == "none"
    with pytest.raises(ConfigError, match="target_error"):
        H.HeadConfig(target_error=1.5)


def test_pipeline_and_grids() -> None:
    cfg = H.HeadConfig(pca=(0, 8), class_weight=("none", "balanced"))
    pipe = H.build_pipeline("svm", cfg)
    assert [name for name, _ in pipe.steps] == ["scale", "pca", "clf"]
    grid = H.param_grid("svm", cfg)
    kernels = sorted(g["clf__kernel"][0] for g in grid)
    assert kernels == ["linear", "rbf"]
    rbf = next(g for g in grid if g["clf__kernel"] == ["rbf"])
    assert rbf["clf__C"] == list(cfg.svm_C) and rbf["clf__gamma_scale"] == list(cfg.svm_gamma_scale)
    linear = next(g for g in grid if g["clf__kernel"] == ["linear"])
    assert linear["clf__C"] == list(cfg.svm_linear_C) and "clf__gamma_scale" not in linear
    assert rbf["clf__class_weight"] == [None, "balanced"]
    assert rbf["pca"][0] == "passthrough" and rbf["pca"][1].n_components == 8
    lr = H.param_grid("logreg", cfg)
    assert lr[0]["clf__C"] == list(cfg.logreg_C)
    with pytest.raises(ValueError, match="unknown head"):
        H.build_pipeline("knn", cfg)


@pytest.mark.parametrize("head", ["svm", "logreg"])
def test_fit_head_learns_and_gives_four_probabilities(head: str) -> None:
    X, y, g = blobs(240, 16)
    fitted = H.fit_head(X[:160], y[:160], g[:160], head, SMALL)
    if head == "svm":
        with pytest.raises(AttributeError):
            fitted.predict_proba(X[:5])  # an uncalibrated SVM has no probabilities
    assert H.needs_calibration(fitted)  # temperature on val by default, both heads
    fitted = H.calibrate(fitted, X[160:200], y[160:200])
    proba = fitted.predict_proba(X[200:])
    assert proba.shape == (40, 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    acc = np.mean(np.array(fitted.predict(X[200:])) == np.array(y[200:]))
    assert acc > 0.9
    assert fitted.cv_best_score > 0.8
    assert len(fitted.cv_results) == (3 if head == "svm" else 2)  # rbf x2 C + linear x1 C
    assert {c["rank"] for c in fitted.cv_results} >= {1}


def test_class_missing_from_train_gets_a_zero_column() -> None:
    X, y, g = blobs(200, 8, classes=("benign", "pre_b", "pro_b"))
    fitted = H.fit_head(X, y, g, "logreg", SMALL)
    proba = fitted.predict_proba(X[:10])
    assert proba.shape == (10, 4)
    assert (proba[:, LABELS.index("early_pre_b")] == 0).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)


def test_grouped_cv_does_not_leak_duplicates() -> None:
    """Groups of 8 identical feature rows with random labels per group: nothing generalises
    across groups, so an honest grouped CV scores near chance, while a CV that split groups
    would memorise the copies and score near 1."""
    rng = np.random.default_rng(3)
    n_groups, size = 40, 8
    centres = rng.normal(0, 1, (n_groups, 12))
    group_labels = [LABELS[i] for i in rng.integers(0, 4, n_groups)]
    X = np.repeat(centres, size, axis=0) + rng.normal(0, 1e-3, (n_groups * size, 12))
    y = [lab for lab in group_labels for _ in range(size)]
    g = np.repeat(np.arange(n_groups), size)
    cfg = H.HeadConfig(cv_folds=4, n_jobs=1, svm_kernels=("rbf",), svm_C=(100.0,),
                       svm_gamma_scale=(10.0,), class_weight=("none",))
    fitted = H.fit_head(X, y, g, "svm", cfg)
    assert fitted.cv_best_score < 0.6
    for train, test in H.make_cv(cfg, np.array(y), g).split(X, y, g):
        assert not set(g[train]) & set(g[test])


def test_temperature_calibration_keeps_labels_and_needs_every_class_in_val() -> None:
    X, y, g = blobs(240, 16, sep=1.0)
    fitted = H.fit_head(X[:160], y[:160], g[:160], "svm", SMALL)
    before = fitted.estimator.predict(X[200:])
    cal = H.calibrate(fitted, X[160:200], y[160:200])
    assert cal.calibration == "temperature"
    assert list(before) == cal.predict(X[200:])
    assert "calibration_seconds" in cal.timing
    only_two = [i for i in range(160, 240) if y[i] in ("benign", "pre_b")]
    with pytest.raises(ValueError, match="never occur in the val split"):
        H.calibrate(fitted, X[only_two], [y[i] for i in only_two])
    own = dataclasses.replace(SMALL, calibration="none")
    with pytest.raises(ValueError, match="nothing to fit"):
        H.calibrate(H.fit_head(X[:160], y[:160], g[:160], "logreg", own), X[:10], y[:10])


@pytest.mark.parametrize("head", ["svm", "logreg"])
def test_temperature_is_read_back_and_reproduces_the_calibrated_probabilities(head: str) -> None:
    """calibrated = softmax(log(uncalibrated) / T): the stored T is the one in use, and the
    uncalibrated probabilities are the head's own (logreg) / softmax of decision values."""
    from featsvm.evaluation.calibration import apply_temperature

    X, y, g = blobs(240, 16, sep=1.0)
    fitted = H.fit_head(X[:160], y[:160], g[:160], head, SMALL)
    raw = H.decision_proba(fitted, X[200:])
    if head == "logreg":
        np.testing.assert_allclose(raw, fitted.predict_proba(X[200:]), atol=1e-9)
    cal = H.calibrate(fitted, X[160:200], y[160:200])
    t = H.temperature_of(cal)
    assert t is not None and t > 0
    np.testing.assert_allclose(H.decision_proba(cal, X[200:]), raw, atol=1e-12)
    np.testing.assert_allclose(cal.predict_proba(X[200:]), apply_temperature(raw, t),
                               atol=1e-6)


def test_sigmoid_calibration_and_pca_option() -> None:
    X, y, g = blobs(240, 16)
    cfg = H.HeadConfig(cv_folds=3, n_jobs=1, svm_kernels=("linear",), svm_linear_C=(1.0,),
                       class_weight=("none",), pca=(6,), calibration="sigmoid")
    fitted = H.calibrate(H.fit_head(X[:160], y[:160], g[:160], "svm", cfg), X[160:200],
                         y[160:200])
    assert fitted.estimator.estimator.estimator.named_steps["pca"].n_components_ == 6
    proba = fitted.predict_proba(X[200:])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert np.mean(np.array(fitted.predict(X[200:])) == np.array(y[200:])) > 0.9


def test_bad_training_input_is_named() -> None:
    X, y, g = blobs(40, 4)
    with pytest.raises(ValueError, match="fewer than cv_folds"):
        H.fit_head(X[:6], y[:6], [0, 0, 0, 1, 1, 1], "logreg", SMALL)
    X_bad = X.copy()
    X_bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        H.fit_head(X_bad, y, g, "logreg", SMALL)
    with pytest.raises(ValueError, match="rows"):
        H.fit_head(X, y[:-1], g, "logreg", SMALL)
