"""featsvm.models.fit and `featsvm fit`: cache lookup, coverage errors, complete run records."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset

from featsvm.cli import main
from featsvm.data.dataset import scan
from featsvm.data.manifest import ManifestRow, read_manifest, write_manifest
from featsvm.features.cache import CacheMissingError, read_cache
from featsvm.models.fit import CoverageError, fit
from featsvm.models.heads import HeadConfig
from featsvm.models.modelfile import load_head
from featsvm.runs import REQUIRED_CONFIG_KEYS, is_complete

TINY = HeadConfig(cv_folds=2, n_jobs=1, svm_C=(1.0, 10.0), svm_gamma_scale=(1.0,),
                  svm_linear_C=(1.0,),
                  logreg_C=(0.1,), class_weight=("balanced",), n_boot=50)
TINY_TOML = """[fit]
cv_folds = 2
n_jobs = 1
svm_C = [1.0]
svm_gamma_scale = [1.0]
svm_linear_C = [1.0]
logreg_C = [0.1]
class_weight = ["balanced"]
n_boot = 50
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny dataset, its split manifest and an alexnet (random weights) feature cache."""
    from featsvm.features.extract import extract

    root = tmp_path_factory.mktemp("fit")
    data = make_dataset(root / "data", per_class=8, size=64)
    rows = []
    for i, rec in enumerate(scan(data).records):
        j = i % 8
        split = "train" if j < 4 else ("val" if j < 6 else "test")
        rows.append(ManifestRow(rec.relpath, rec.sha256, rec.label, i // 2, split))
    write_manifest(root / "split.csv", rows)
    summary = extract(data, "alexnet", weights="none", cache_dir=root / "cache", device="cpu",
                      progress=False)
    assert summary.n_new == 32
    return {"root": root, "data": data, "split": root / "split.csv", "cache": root / "cache",
            "cache_file": summary.cache_path}


@pytest.mark.parametrize("head", ["svm", "logreg"])
def test_fit_writes_a_complete_run_record(env: dict[str, Path], head: str) -> None:
    runs = env["root"] / "runs"
    rec = fit("alexnet", head, env["split"], cache_dir=env["cache"], weights="none",
              runs_dir=runs, config=TINY, progress=False)
    assert is_complete(rec.path) and rec.path.parent == runs
    assert rec.path.name.startswith(f"alexnet-{head}-")
    cfg = rec.config
    assert set(REQUIRED_CONFIG_KEYS) <= set(cfg)
    assert cfg["kind"] == "head" and cfg["head"] == head and cfg["backbone"] == "alexnet"
    assert cfg["model"] == f"alexnet + {head}"  # default layer: not named
    assert cfg["weights"]["label"] == "random" and cfg["weights"]["sha256"] is None
    cached = read_cache(env["cache_file"])
    assert cfg["cache"]["fingerprint"] == cached.attrs["fingerprint"]
    assert cfg["cache"]["dim"] == 4096
    assert cfg["preprocessing"] == cached.attrs["preprocessing"]
    assert cfg["split"]["sha256"] == read_manifest(env["split"]).sha256
    assert cfg["split"]["n"] == {"train": 16, "val": 8, "test": 8}
    assert cfg["hyperparameters"] and cfg["cv"]["best_score"] is not None
    assert len(cfg["cv"]["candidates"]) == (3 if head == "svm" else 1)  # rbf + linear
    # temperature scaling on val by default, for both heads
    assert cfg["calibration"]["fitted_on"] == "val"
    assert cfg["calibration"]["method"] == "temperature"
    assert cfg["calibration"]["temperature"] > 0
    assert cfg["timing"]["fit_seconds"] > 0
    # metrics: one block per scored split, the documented shape, plus calibration/abstention
    assert set(rec.metrics) == {"val", "test", "calibration", "selective"}
    calib = rec.metrics["calibration"]
    assert calib["temperature"] == cfg["calibration"]["temperature"]
    for when in ("before", "after"):
        for split in ("val", "test"):
            block = calib[when][split]
            assert 0 <= block["ece"] <= 1 and 0 <= block["brier"] <= 2
            assert len(block["bins"]) == 15
    sel = rec.metrics["selective"]
    assert sel["chosen_on"] == "val" and sel["target_error"] == 0.01
    assert cfg["abstention"]["threshold"] == sel["threshold"]
    assert 0 <= sel["test"]["coverage"] <= 1 and "coverage" in sel["test"]["ci95"]
    test = rec.metrics["test"]
    assert test["n"] == 8
    for key in ("accuracy", "binary.sensitivity", "binary.specificity", "binary.precision",
                "macro_f1"):
        assert key in test["ci95"]
    # predictions: val + test only, and the saved model reproduces them
    preds = rec.predictions()
    assert sorted(set(preds.split)) == ["test", "val"] and len(preds.split) == 16
    assert rec.model_path.name == "model.skops"
    model = load_head(rec)  # no pickle
    test_rows = preds.select("test")
    again = model.predict_proba(cached.lookup(test_rows.sha256))
    np.testing.assert_allclose(again, test_rows.proba, atol=1e-6)
    assert model.predict(cached.lookup(test_rows.sha256)) == test_rows.pred_label


def test_explicit_layer_is_named_in_the_model(env: dict[str, Path]) -> None:
    from featsvm.features.extract import extract

    extract(env["data"], "alexnet", weights="none", cache_dir=env["cache"], device="cpu",
            layer="gap", progress=False)
    rec = fit("alexnet", "logreg", env["split"], cache_dir=env["cache"], weights="none",
              runs_dir=env["root"] / "runs-layer", config=TINY, progress=False, layer="gap")
    assert rec.config["model"] == "alexnet[gap] + logreg"
    assert rec.config["cache"]["dim"] == 256


def test_missing_cache_names_the_extract_command(env: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CacheMissingError, match="featsvm extract"):
        fit("alexnet", "svm", env["split"], cache_dir=tmp_path / "empty", weights="none",
            runs_dir=tmp_path / "runs", config=TINY, progress=False)
    assert not (tmp_path / "runs").exists()


def test_cache_that_misses_split_images_is_refused(env: dict[str, Path], tmp_path: Path) -> None:
    rows = list(read_manifest(env["split"]).rows)
    rows.append(ManifestRow("Original/Pro/new.jpg", "f" * 64, "pro_b", 999, "test"))
    write_manifest(tmp_path / "split.csv", rows)
    with pytest.raises(CoverageError, match=r"lacks embeddings.*1 test.*featsvm extract"):
        fit("alexnet", "logreg", tmp_path / "split.csv", cache_dir=env["cache"],
            weights="none", runs_dir=tmp_path / "runs", config=TINY, progress=False)
    assert not (tmp_path / "runs").exists()


def test_cli_fit_prints_results(env: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(main, [
        "fit", "--backbone", "alexnet", "--head", "logreg", "--weights", "none",
        "--cache", str(env["cache"]), "--split", str(env["split"]), "--runs", str(runs),
        "--config", str(cfg), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert "sensitivity" in result.output and "\ntest " in result.output
    (run_dir,) = runs.iterdir()
    with open(run_dir / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 16
    bad = CliRunner().invoke(main, [
        "fit", "--backbone", "alexnet", "--head", "svm", "--weights", "none",
        "--cache", str(tmp_path / "nothing"), "--split", str(env["split"]),
        "--runs", str(runs),
    ])
    assert bad.exit_code != 0 and "featsvm extract" in bad.output
