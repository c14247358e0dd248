"""Pooled grouped K-fold cross-validation (featsvm.models.cv, `featsvm cv`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset

from featsvm.cli import main
from featsvm.data.dataset import scan
from featsvm.data.manifest import ManifestRow, write_manifest
from featsvm.errors import PredictError
from featsvm.features.extract import extract
from featsvm.labels import LABELS
from featsvm.models import cv as cv_mod
from featsvm.models.heads import HeadConfig
from featsvm.runs import read_run

SMALL = HeadConfig(svm_kernels=("rbf",), svm_C=(10.0,), svm_gamma_scale=(1.0,),
                   logreg_C=(1.0,), cv_folds=3, n_jobs=1, n_boot=50)


def _planted(n_groups: int = 60, per_group: int = 3, dim: int = 8, seed: int = 0):
    """Every group: its own random point (members = tiny jitter around it) and a random label
    that has nothing to do with the features. Only a model that saw the group can be right."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_groups, dim))
    labels = [LABELS[i % 4] for i in rng.permutation(n_groups)]
    X, y, g = [], [], []
    for k in range(n_groups):
        for _ in range(per_group):
            X.append(centres[k] + rng.normal(0, 1e-3, dim))
            y.append(labels[k])
            g.append(k)
    return np.array(X), np.array(y), np.array(g)


@pytest.mark.parametrize("head", ["svm", "logreg"])
def test_no_group_reaches_its_own_folds_training_part(head: str, monkeypatch) -> None:
    X, y, g = _planted()
    seen: list[dict[str, set[int]]] = []
    real_fit, real_cal = cv_mod.fit_head, cv_mod.calibrate

    def spy_fit(Xf, yf, gf, *a, **kw):
        seen.append({"fit": set(np.asarray(gf).tolist()), "cal": set()})
        return real_fit(Xf, yf, gf, *a, **kw)

    def spy_cal(fitted, Xc, yc):
        rows = {tuple(np.round(r, 9)) for r in np.asarray(Xc)}
        seen[-1]["cal"] = {int(gi) for xi, gi in zip(X, g, strict=True)
                           if tuple(np.round(xi, 9)) in rows}
        return real_cal(fitted, Xc, yc)

    monkeypatch.setattr(cv_mod, "fit_head", spy_fit)
    monkeypatch.setattr(cv_mod, "calibrate", spy_cal)
    res = cv_mod.cross_validate_features(X, y, g, head, SMALL, folds=5)
    assert len(seen) == 5
    for k, used in enumerate(seen):
        test_groups = set(g[res.fold == k].tolist())
        assert test_groups and not test_groups & used["fit"] and not test_groups & used["cal"]
        assert not used["fit"] & used["cal"]
        assert (bool(used["cal"]) == (head == "svm"))
    # every image scored once, whole groups per fold
    assert (res.fold >= 0).all() and np.isfinite(res.proba).all()
    for k in np.unique(g):
        assert len(set(res.fold[g == k].tolist())) == 1
    # labels are random per group: with no leak the pooled accuracy stays near chance (1/4);
    # a leaking CV would score ~100 % on these near-copies
    acc = float(np.mean(np.array(LABELS)[res.proba.argmax(1)] == y))
    assert acc < 0.6


def test_fold_spread_and_pooled_block() -> None:
    rng = np.random.default_rng(1)
    y = np.array([LABELS[i % 4] for i in range(80)])
    X = np.eye(4)[[LABELS.index(v) for v in y]] * 3 + rng.normal(0, 0.5, (80, 4))
    g = np.arange(80) // 2
    res = cv_mod.cross_validate_features(X, y, g, "logreg", SMALL, folds=4)
    m = cv_mod.cv_metrics(y, g, res, n_boot=50)
    assert m["pooled"]["n"] == 80 and m["pooled"]["ci95"]["accuracy"]
    assert len(m["folds"]) == 4 and sum(f["n"] for f in m["folds"]) == 80
    s = m["fold_spread"]["accuracy"]
    assert s["min"] <= s["mean"] <= s["max"] and s["n_folds"] == 4


def _manifest(tmp_path: Path, data: Path) -> Path:
    recs = scan(data).records
    rows = [ManifestRow(r.relpath, r.sha256, r.label, i // 2, "train") for i, r in
            enumerate(sorted(recs, key=lambda r: (r.label, r.relpath)))]
    path = tmp_path / "split.csv"
    write_manifest(path, rows)
    return path


def test_cli_cv_run_record_covers_every_image_once(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=10)
    split = _manifest(tmp_path, data)
    extract(data, "alexnet", weights="none", layer="gap", cache_dir=tmp_path / "cache",
            device="cpu", workers=0, progress=False)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[fit]\nn_jobs = 1\nn_boot = 40\ncv_folds = 3\nlogreg_C = [1.0]\n"
                   "[cv]\nsvm_kernels = ['linear']\nsvm_linear_C = [0.1]\n")
    res = CliRunner().invoke(main, [
        "cv", "--backbone", "alexnet", "--weights", "none", "--layer", "gap", "--head", "svm",
        "--folds", "4", "--split", str(split), "--cache", str(tmp_path / "cache"), "--runs",
        str(tmp_path / "runs"),
        "--config", str(cfg), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "4-fold CV over 40 images in 20 groups" in res.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    rec = read_run(run_dir)
    assert rec.config["kind"] == "cv" and rec.config["cv"]["folds"] == 4
    assert rec.config["head_config"]["svm_kernels"] == ["linear"]  # [cv] over [fit]
    assert rec.config["calibration"]["method"] == "temperature"
    pred = rec.predictions()
    manifest_rel = sorted(p.relpath for p in scan(data).records)
    assert sorted(pred.relpath) == manifest_rel  # every image exactly once
    assert set(pred.split) == {"pooled"} and sorted(set(pred.fold)) == [0, 1, 2, 3]
    folds = json.loads((run_dir / "folds.json").read_text())
    assert folds["fold_of"] == dict(zip(pred.relpath, pred.fold, strict=True))
    assert set(rec.metrics) == {"pooled", "folds", "fold_spread"}
    assert rec.metrics["pooled"]["n"] == 40 and len(rec.metrics["folds"]) == 4
    with pytest.raises(PredictError, match="cross-validation run"):
        from featsvm.predict import Predictor

        Predictor.from_run(run_dir)


def test_too_few_groups_is_a_clear_error() -> None:
    X, y, g = _planted(n_groups=4, per_group=2)
    with pytest.raises(Exception, match="groups cannot fill 10 folds"):
        cv_mod.cross_validate_features(X, y, g, "logreg", SMALL, folds=10)


def test_parallel_folds_give_the_same_predictions() -> None:
    import dataclasses

    X, y, g = _planted(n_groups=40, per_group=2)
    one = cv_mod.cross_validate_features(X, y, g, "svm", SMALL, folds=4)
    two = cv_mod.cross_validate_features(X, y, g, "svm", dataclasses.replace(SMALL, n_jobs=2),
                                         folds=4)
    np.testing.assert_array_equal(one.fold, two.fold)
    np.testing.assert_allclose(one.proba, two.proba, rtol=1e-9, atol=1e-12)
    assert [f.best_params for f in one.folds] == [f.best_params for f in two.folds]
    assert two.cpu_seconds > 0
