"""Pooled grouped K-fold CV of end-to-end models (featsvm.models.finetune_cv, `finetune --cv`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset

from featsvm.cli import main
from featsvm.data.dataset import scan
from featsvm.data.manifest import ManifestRow, read_manifest, write_manifest
from featsvm.evaluation.report import write_report
from featsvm.models import cv as cv_mod
from featsvm.models import finetune as ft
from featsvm.models import finetune_cv as fcv
from featsvm.models.heads import HeadConfig
from featsvm.runs import PROB_COLUMNS, read_run

# basic-cnn at 24 px, one epoch, few bootstrap resamples: a few seconds per fold on a CPU.
TINY = ft.FinetuneConfig(
    epochs=1, batch_size=8, basic_cnn_size=24, basic_cnn_channels=(4, 8),
    basic_cnn_dense=8, warmup_epochs=0.0, n_boot=20, channels_last=False, workers=1,
    device="cpu",
)
FOLDS = 3


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """4 classes x 12 images in planted duplicate groups of 3 (16 groups, one class each); the
    manifest's train/val/test column is unused by CV."""
    root = tmp_path_factory.mktemp("ftcv")
    data = make_dataset(root / "data", per_class=12, size=32, seed=11)
    recs = sorted(scan(data).records, key=lambda r: r.relpath)
    rows = [ManifestRow(rec.relpath, rec.sha256, rec.label, i // 3,
                        ("train", "train", "val", "test")[(i // 3) % 4])
            for i, rec in enumerate(recs)]
    write_manifest(root / "split.csv", rows)
    return data, root / "split.csv"


def _predictions(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_groups_stay_out_of_their_folds_training_and_every_image_pooled_once(
        planted, tmp_path, monkeypatch) -> None:
    data, split = planted
    man = read_manifest(split)
    group_of = {r.relpath: r.group for r in man.rows}
    seen: list[dict[str, set[int]]] = []
    real = fcv.make_feeder

    def spy(built, images, *a, **kw):  # what each fold really trains, validates and predicts on
        seen.append({name: {group_of[r.relpath] for r in s.rows}
                     for name, s in images.sets.items()})
        return real(built, images, *a, **kw)

    monkeypatch.setattr(fcv, "make_feeder", spy)
    out = fcv.finetune_cv(data, split, TINY, FOLDS, runs_dir=tmp_path / "runs", progress=False)
    assert len(seen) == FOLDS and out.folds_trained == [0, 1, 2]
    for parts in seen:
        assert parts["test"] and parts["val"] and parts["train"]
        assert not parts["test"] & (parts["train"] | parts["val"])  # held-out groups unseen
        assert not parts["val"] & parts["train"]  # the validation part is grouped too

    rec = out.record
    assert rec.config["kind"] == "cv" and rec.config["model"] == "basic-cnn"
    assert rec.config["head"] is None and rec.config["cv"]["folds"] == FOLDS
    preds = _predictions(rec.path)
    assert sorted(p["relpath"] for p in preds) == sorted(group_of)  # every image exactly once
    assert {p["split"] for p in preds} == {"pooled"}
    assert rec.metrics["pooled"]["n"] == len(man.rows)
    assert [f["fold"] for f in rec.metrics["folds"]] == [0, 1, 2]
    assert "accuracy" in rec.metrics["fold_spread"]

    # the fold of every image is the one `featsvm cv` gives it (same manifest, K and seed)
    y = [r.label for r in man.rows]
    g = [r.group for r in man.rows]
    X = np.random.default_rng(0).normal(size=(len(y), 3))
    head_cv = cv_mod.cross_validate_features(
        X, y, g, "logreg", HeadConfig(logreg_C=(1.0,), cv_folds=2, n_jobs=1), folds=FOLDS)
    expected = {r.relpath: int(f) for r, f in zip(man.rows, head_cv.fold, strict=True)}
    assert {p["relpath"]: int(p["fold"]) for p in preds} == expected
    folds_json = json.loads((rec.path / cv_mod.FOLDS_FILE).read_text())
    assert folds_json["fold_of"] == expected
    for k, part in enumerate(folds_json["per_fold"]):  # validation images: never held out by k
        assert all(expected[rel] != k for rel in part["val_relpath"])

    # the report lists it in the pooled-CV headline table
    report = write_report(tmp_path / "runs", tmp_path / "report")
    rows = json.loads((report.out_dir / "cv_table.json").read_text())["rows"]
    assert [(r["run_id"], r["model"], r["n"]) for r in rows] == [
        (rec.run_id, "basic-cnn", len(man.rows))]
    html = (report.out_dir / "index.html").read_text()
    assert f"Pooled cross-validation: every image scored once (n = {len(man.rows)})" in html


def test_an_interrupted_run_resumes_at_its_fold(planted, tmp_path, monkeypatch) -> None:
    data, split = planted
    real = fcv._train_fold

    def fail_in_fold_2(ctx, k, *a, **kw):
        if k == 1:
            raise KeyboardInterrupt("killed in fold 2")
        return real(ctx, k, *a, **kw)

    monkeypatch.setattr(fcv, "_train_fold", fail_in_fold_2)
    with pytest.raises(KeyboardInterrupt):
        fcv.finetune_cv(data, split, TINY, FOLDS, runs_dir=tmp_path / "runs", progress=False)
    (unfinished,) = (tmp_path / "runs").iterdir()
    assert (unfinished / "fold-1.json").is_file() and not (unfinished / "fold-2.json").exists()

    monkeypatch.setattr(fcv, "_train_fold", real)
    out = fcv.finetune_cv(data, split, TINY, FOLDS, runs_dir=tmp_path / "runs", progress=False)
    assert out.run_dir == unfinished  # continued in the same folder
    assert out.folds_trained == [1, 2]  # fold 1 was read back, not retrained
    assert not list(unfinished.glob("fold-*/checkpoint-*.pt"))

    fresh = fcv.finetune_cv(data, split, TINY, FOLDS, runs_dir=tmp_path / "fresh",
                            progress=False)
    assert fresh.folds_trained == [0, 1, 2]
    resumed_p = {p["relpath"]: p for p in _predictions(out.run_dir)}
    fresh_p = {p["relpath"]: p for p in _predictions(fresh.run_dir)}
    assert resumed_p.keys() == fresh_p.keys()
    for rel, p in fresh_p.items():  # same seeds, deterministic CPU: the same predictions
        assert p["fold"] == resumed_p[rel]["fold"]
        for col in PROB_COLUMNS:
            assert float(p[col]) == pytest.approx(float(resumed_p[rel][col]), abs=1e-6)


def test_cli_and_study_step(planted, tmp_path) -> None:
    data, split = planted
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("[finetune]\nepochs = 1\nbatch_size = 8\nbasic_cnn_size = 24\n"
                   "basic_cnn_channels = [4, 8]\nbasic_cnn_dense = 8\nn_boot = 10\n"
                   "workers = 1\ndevice = \"cpu\"\nchannels_last = false\n")
    res = CliRunner().invoke(main, ["-q", "finetune", str(data), "--split", str(split),
                                    "--model", "basic-cnn", "--cv", "2", "--config", str(cfg),
                                    "--runs", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    assert "2-fold CV over 48 images in 16 groups" in res.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert read_run(run_dir).config["kind"] == "cv"
    res = CliRunner().invoke(main, ["predict", "--run", str(run_dir), str(data)])
    assert res.exit_code == 1 and "Predict with a `featsvm finetune` run" in res.output


STUDY = """
[study]
data = "{data}"
split = "{root}/split.csv"
cache = "{root}/cache"
runs = "{root}/runs"
report = "{root}/report"
ratios = [0.5, 0.25, 0.25]
backbones = ["colour_stats"]
heads = ["logreg"]
finetune = true
finetune_cv = 2

[fit]
cv_folds = 2
logreg_C = [1.0]
class_weight = ["none"]
n_jobs = 1
n_boot = 10

[finetune]
models = ["basic-cnn"]
epochs = 1
batch_size = 8
basic_cnn_size = 24
basic_cnn_channels = [4, 8]
basic_cnn_dense = 8
n_boot = 10
workers = 1
device = "cpu"

[report]
best = 1
examples = 1
"""


def test_study_runs_finetune_cv_and_reuses_it(tmp_path) -> None:
    from featsvm.study import run_study

    data = make_dataset(tmp_path / "data", per_class=8, size=32, seed=5)
    cfg = tmp_path / "study.toml"
    cfg.write_text(STUDY.format(data=data, root=tmp_path))
    res = run_study(cfg, progress=False)
    assert not res.failed, [(s.name, s.detail) for s in res.failed]
    assert {s.name: s.status for s in res.steps}["finetune-cv basic-cnn"] == "done"
    rows = json.loads((tmp_path / "report" / "cv_table.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["basic-cnn"] and rows[0]["n"] == 32
    again = run_study(cfg, progress=False)
    assert {s.name: s.status for s in again.steps}["finetune-cv basic-cnn"] == "skipped"
