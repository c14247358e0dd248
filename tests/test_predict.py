"""`featsvm predict` agrees with a run's own predictions.csv on the same images."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset
from test_report import make_split

from featsvm.cli import main
from featsvm.predict import PredictError, Predictor, predict
from featsvm.runs import RunRecordError, read_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    data = make_dataset(root / "data", per_class=6, size=40, seed=3)
    split = make_split(data, root / "split.csv")
    return {"root": root, "data": data, "split": split}


@pytest.fixture(scope="module")
def head_run(tiny: dict[str, Path]) -> Path:
    from featsvm.features.extract import extract
    from featsvm.models.fit import fit
    from featsvm.models.heads import HeadConfig

    cache = tiny["root"] / "cache"
    extract(tiny["data"], "efficientnet_lite0", weights="none", cache_dir=cache, batch_size=8,
            workers=0, progress=False)
    cfg = HeadConfig(cv_folds=2, logreg_C=(1.0,), class_weight=("none",), n_boot=10, n_jobs=1)
    rec = fit("efficientnet_lite0", "logreg", tiny["split"], cache_dir=cache, weights="none",
              runs_dir=tiny["root"] / "runs", config=cfg, progress=False)
    return rec.path


@pytest.fixture(scope="module")
def cnn_run(tiny: dict[str, Path]) -> Path:
    from featsvm.models.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(model="basic-cnn", epochs=1, batch_size=4, basic_cnn_size=32,
                         basic_cnn_channels=(4, 8), basic_cnn_dense=8, n_boot=10, workers=1,
                         device="cpu")
    res = finetune(tiny["data"], tiny["split"], cfg, runs_dir=tiny["root"] / "runs-e2e",
                   progress=False)
    assert res.record is not None
    return res.run_dir


def _agrees_with_record(run_dir: Path, data: Path, atol: float, limit: int | None = None) -> None:
    record = read_run(run_dir)
    own = record.predictions()
    rels = own.relpath[:limit]
    res = predict(run_dir, [data / r for r in rels], data_root=data, progress=False,
                  batch_size=5)
    assert not res.skipped
    got = {p.file: p for p in res.predictions}
    assert sorted(got) == sorted(rels)
    for i, rel in enumerate(rels):
        assert got[rel].sha256 == own.sha256[i]
        assert got[rel].pred_label == own.pred_label[i], rel
        np.testing.assert_allclose(got[rel].proba, own.proba[i], atol=atol)


def test_head_run_predictions_match_record(head_run: Path, tiny: dict[str, Path]) -> None:
    _agrees_with_record(head_run, tiny["data"], atol=1e-4)


def test_end_to_end_run_predictions_match_record(cnn_run: Path, tiny: dict[str, Path]) -> None:
    _agrees_with_record(cnn_run, tiny["data"], atol=1e-4)


def test_bad_files_are_reported_and_skipped(head_run: Path, tiny: dict[str, Path]) -> None:
    folder = tiny["root"] / "mixed"
    folder.mkdir()
    shutil.copy(next((tiny["data"] / "Original" / "Pro").iterdir()), folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    res = predict(head_run, [folder, tiny["root"] / "nope.jpg"], progress=False)
    assert [p.file for p in res.predictions] == [str(folder / "good.jpg")]
    reasons = dict(res.skipped)
    assert set(reasons) == {str(folder / "broken.jpg"), str(folder / "empty.png"),
                            str(tiny["root"] / "nope.jpg")}
    assert "empty" in reasons[str(folder / "empty.png")]


def test_tampered_model_is_refused(head_run: Path, tiny: dict[str, Path]) -> None:
    copy = tiny["root"] / "tampered"
    shutil.copytree(head_run, copy)
    with open(copy / "model.skops", "ab") as f:
        f.write(b"\0")
    with pytest.raises(RunRecordError, match="sidecar"):
        Predictor.from_run(copy)


def test_missing_weights_are_named(head_run: Path, tiny: dict[str, Path], monkeypatch) -> None:
    """A run whose recorded weights cannot be found is refused with advice, never re-run with
    other (e.g. random) weights."""
    import json

    copy = tiny["root"] / "other-weights"
    shutil.copytree(head_run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["weights"] = {"label": "some file", "sha256": "12" * 32, "source": "/nowhere.pth"}
    (copy / "config.json").write_text(json.dumps(cfg))
    monkeypatch.delenv("FEATSVM_WEIGHTS_DIR", raising=False)
    import featsvm.features.weights as fw

    def offline(url: str) -> Path:
        raise OSError("offline")

    monkeypatch.setattr(fw, "_fetch_url", offline)
    with pytest.raises(PredictError, match="--weights-dir"):
        Predictor.from_run(copy)


def test_cli_predict_writes_csv(head_run: Path, tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "preds.csv"
    files = sorted((tiny["data"] / "Original" / "Benign").iterdir())[:3]
    result = CliRunner().invoke(main, ["predict", "--run", str(head_run), *map(str, files),
                                       "--out", str(out), "--data-root", str(tiny["data"]),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert "P(malig.)" in result.output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [f.relative_to(tiny["data"]).as_posix() for f in files]
    for r in rows:
        probs = [float(r[f"prob_{lab}"]) for lab in ("benign", "early_pre_b", "pre_b", "pro_b")]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert float(r["prob_malignant"]) == pytest.approx(sum(probs[1:]), abs=1e-5)


def test_head_run_with_real_weights_resolves_them_by_sha256(
    tiny: dict[str, Path], shared_weights: Path, tmp_path: Path, monkeypatch
) -> None:
    """The shared EfficientNet-Lite0 file: found again at its recorded path, or through a
    weights folder when the recorded path is gone; predictions match the run's own."""
    import json

    from featsvm.features.extract import extract
    from featsvm.models.fit import fit
    from featsvm.models.heads import HeadConfig

    monkeypatch.delenv("FEATSVM_WEIGHTS_DIR", raising=False)
    cache = tmp_path / "cache"
    extract(tiny["data"], "efficientnet_lite0", weights_dir=shared_weights, cache_dir=cache,
            batch_size=8, workers=0, progress=False)
    cfg = HeadConfig(cv_folds=2, logreg_C=(1.0,), class_weight=("none",), n_boot=10, n_jobs=1)
    rec = fit("efficientnet_lite0", "logreg", tiny["split"], cache_dir=cache,
              weights_dir=shared_weights, runs_dir=tmp_path / "runs", config=cfg,
              progress=False)
    assert rec.config["weights"]["sha256"].startswith("0e570cb8")
    _agrees_with_record(rec.path, tiny["data"], atol=1e-4, limit=5)

    moved = tmp_path / "moved"
    shutil.copytree(rec.path, moved)
    cfg_json = json.loads((moved / "config.json").read_text())
    cfg_json["weights"]["source"] = str(tmp_path / "gone.pth")
    (moved / "config.json").write_text(json.dumps(cfg_json))
    import featsvm.features.weights as fw

    def offline(url: str) -> Path:
        raise OSError("offline")

    monkeypatch.setattr(fw, "_fetch_url", offline)  # never download in a test
    with pytest.raises(PredictError, match="efficientnet_lite0 weights"):
        Predictor.from_run(moved)
    monkeypatch.setenv("FEATSVM_WEIGHTS_DIR", str(shared_weights))
    _agrees_with_record(moved, tiny["data"], atol=1e-4, limit=3)
