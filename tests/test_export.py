"""`featsvm export` (backbone + head + OOD flag as one ONNX graph) and `featsvm predict --onnx`:
parity with the run for a logistic and an SVM head, the OOD flag's graph equal to `OODFlag`,
an int8 run exported with its own int8 graph, numpy preprocessing equal to the torch
transform, no torch in the ONNX prediction path. Tiny images, random-init AlexNet conv part."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset
from PIL import Image
from test_report import make_split

from featsvm.cli import main
from featsvm.errors import UsageError

pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from featsvm.features.extract import extract

    root = tmp_path_factory.mktemp("export")
    data = make_dataset(root / "data", per_class=6, size=48, seed=5)
    split = make_split(data, root / "split.csv")
    extract(data, "alexnet", weights="none", layer="gap", cache_dir=root / "cache",
            batch_size=8, workers=0, progress=False, device="cpu")
    return {"root": root, "data": data, "split": split}


@pytest.fixture(scope="module", params=["logreg", "svm"])
def exported(request: pytest.FixtureRequest, tiny: dict[str, Path]) -> dict[str, Path]:
    from featsvm.export import export_run
    from featsvm.models.fit import fit
    from featsvm.models.heads import HeadConfig

    cfg = HeadConfig(cv_folds=2, logreg_C=(1.0,), svm_kernels=("rbf",), svm_C=(10.0,),
                     svm_gamma_scale=(1.0,), pca=(0.95,), n_boot=10, n_jobs=1)
    rec = fit("alexnet", request.param, tiny["split"], cache_dir=tiny["root"] / "cache",
              weights="none", layer="gap", runs_dir=tiny["root"] / "runs", config=cfg,
              progress=False)
    out = tiny["root"] / f"{request.param}.onnx"
    res = export_run(rec.path, out, data_dir=tiny["data"])
    return {**tiny, "run": rec.path, "model": res.path, "parity": res.parity,
            "head": request.param}


def test_export_reproduces_the_run(exported: dict) -> None:
    import onnx

    from featsvm.export import parity_path
    from featsvm.runs import read_run

    p = exported["parity"]
    n_test = len(read_run(exported["run"]).predictions().select("test").relpath)
    assert p["images"] == n_test > 0 and p["on"] == "test split"
    assert p["agreement"] == 1.0 and p["max_abs_prob_diff"] < 1e-4
    assert json.loads(parity_path(exported["model"]).read_text()) == p
    meta = {m.key: m.value for m in onnx.load(str(exported["model"])).metadata_props}
    stored = json.loads(meta["featsvm"])
    assert stored["parity"] == p and stored["run_id"] == read_run(exported["run"]).run_id
    assert stored["preprocessing"]["layer"] == "gap"
    # the run has an OOD flag: the graph computes it, checked against the run's own predictor
    assert p["ood_in_graph"] and stored["ood"]["threshold"] == p["ood_threshold"]
    assert p["ood_agreement"] == 1.0 and p["max_rel_ood_score_diff"] < 1e-4
    assert p["backbone_precision"] == p["run_precision"] == "fp32"


def _read(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return {r["file"]: r for r in csv.DictReader(f)}


def test_predict_onnx_equals_predict(exported: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    args = [str(exported["data"]), "--data-root", str(exported["data"])]
    a = runner.invoke(main, ["-q", "predict", "--onnx", str(exported["model"]), *args,
                             "--out", str(tmp_path / "onnx.csv")])
    b = runner.invoke(main, ["-q", "predict", "--run", str(exported["run"]), *args,
                             "--out", str(tmp_path / "torch.csv")])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    onnx_rows, torch_rows = _read(tmp_path / "onnx.csv"), _read(tmp_path / "torch.csv")
    assert onnx_rows.keys() == torch_rows.keys() and len(onnx_rows) == 24
    from featsvm.predict import abstention_threshold
    from featsvm.runs import read_run

    threshold = abstention_threshold(read_run(exported["run"]))
    for name, r in onnx_rows.items():
        t = torch_rows[name]
        assert r["pred_label"] == t["pred_label"]
        # the threshold is a val image's confidence: a 1e-7 difference may flip that image
        if threshold is None or abs(float(t["confidence"]) - threshold) > 1e-4:
            assert r["abstain"] == t["abstain"]
        assert r["ood"] == t["ood"] and r["ood"] in ("0", "1")  # the graph's flag
        probs = [k for k in r if k.startswith("prob_")]
        assert max(abs(float(r[k]) - float(t[k])) for k in probs) < 1e-4
    both = runner.invoke(main, ["predict", "--onnx", str(exported["model"]), "--run",
                                str(exported["run"]), str(exported["data"])])
    assert both.exit_code != 0 and "exactly one of --run" in both.output


def _ood_images(data: Path) -> list[Image.Image]:
    """The run's own train images (in distribution) and images unlike any cell picture."""
    from featsvm.data.dataset import decode_rgb, read_image_bytes

    rng = np.random.default_rng(1)
    train = sorted((data / "Original").glob("*/*-00[0-2].jpg"))
    own = [decode_rgb(read_image_bytes(p), p.name) for p in train]
    odd = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)),
           Image.new("RGB", (48, 48), (0, 0, 0)), Image.new("RGB", (64, 40), (255, 0, 0)),
           Image.fromarray(np.kron(np.indices((6, 6)).sum(0) % 2 * 255, np.ones((8, 8)))
                           .astype(np.uint8)).convert("RGB")]
    return own + odd


def test_exported_ood_flag_equals_the_runs(exported: dict) -> None:
    """On in-distribution and clearly out-of-distribution images the graph's ood_score and
    ood equal `OODFlag.score` / `.flag` of the run's own predictor's embeddings."""
    from featsvm.predict import Predictor
    from featsvm.predict_onnx import OnnxPredictor

    images = _ood_images(exported["data"])
    run = Predictor.from_run(exported["run"], device="cpu")
    flag = run.parts["ood_flag"]
    want = flag.score(run.parts["embed"](images))
    onnx_model = OnnxPredictor(exported["model"])
    assert onnx_model.has_ood and onnx_model.meta["ood"]["threshold"] == flag.threshold
    from featsvm.features.onnx_input import prepare_batch

    score, flags = onnx_model.session.run(["ood_score", "ood"], {
        "image": prepare_batch(images, onnx_model.preprocessing)})
    assert score.dtype == np.float32 and flags.dtype == np.bool_
    np.testing.assert_allclose(score, want, rtol=1e-4)
    assert flags.tolist() == (want > flag.threshold).tolist()
    assert flags.any() and not flags.all()  # both kinds occur: the comparison can fail
    assert flags[-4:].all()  # the noise, black, red and checkerboard images
    _, got = onnx_model.predict_with_ood(images)
    assert got == run.predict_with_ood(images)[1] == flags.tolist()


def test_ood_graph_equals_oodflag_on_the_features(exported: dict) -> None:
    """The OOD nodes alone, fed the run's cached features: float32 scores within 1e-4."""
    import onnxruntime as ort

    from featsvm.evaluation.ood_onnx import ood_to_onnx
    from featsvm.features.cache import read_cache
    from featsvm.predict import _load_ood_flag
    from featsvm.runs import read_run

    rec = read_run(exported["run"])
    flag = _load_ood_flag(rec)
    feats = read_cache(rec.config["cache"]["path"]).features[:].astype(np.float32)
    x = np.concatenate([feats, feats * 3.0, -feats])  # plus rows far off the train set
    model = ood_to_onnx(flag, x.shape[1])
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    score, flags = session.run(None, {"features": x})
    want = flag.score(x)
    np.testing.assert_allclose(score, want, rtol=1e-4)
    assert flags.tolist() == flag.flag(x).tolist() and flags.any() and not flags.all()


def _copy_run(run: Path, dest: Path, edit: dict) -> Path:
    shutil.copytree(run, dest)
    cfg = json.loads((dest / "config.json").read_text())
    for key, value in edit.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = {**cfg.get(key, {}), **value}
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_a_run_without_an_ood_flag_exports_without_it(exported: dict, tmp_path: Path) -> None:
    import onnx

    from featsvm.export import export_run
    from featsvm.predict_onnx import OnnxPredictor

    run = _copy_run(exported["run"], tmp_path / "run", {"ood": None})
    res = export_run(run, tmp_path / "m.onnx")  # no data: synthetic images vs the predictor
    p = res.parity
    assert p["on"] == "seeded synthetic images" and p["agreement"] == 1.0
    assert not p["ood_in_graph"] and "ood_agreement" not in p
    model = onnx.load(str(res.path))
    assert [o.name for o in model.graph.output] == ["probabilities"]
    loaded = OnnxPredictor(res.path)
    assert loaded.meta["ood"] is None and not loaded.has_ood
    image = Image.new("RGB", (48, 48), (0, 0, 0))
    assert loaded.predict_with_ood([image])[1] == [None]


def test_bf16_runs_export_an_fp32_backbone(exported: dict, tmp_path: Path) -> None:
    from featsvm.export import backbone_source
    from featsvm.runs import read_run

    run = _copy_run(exported["run"], tmp_path / "run", {"cache": {"precision": "bf16"}})
    src = backbone_source(read_run(run))
    assert (src.backbone_precision, src.run_precision, src.graph) == ("fp32", "bf16", None)


@pytest.fixture(scope="module")
def int8_run(tiny: dict[str, Path]) -> dict[str, Path]:
    """A logistic head fitted on int8 ONNX Runtime features (calibrated on train images)."""
    from featsvm.data.manifest import read_manifest
    from featsvm.features import engines
    from featsvm.features.extract import extract
    from featsvm.models.fit import fit
    from featsvm.models.heads import HeadConfig

    root = tiny["root"]
    extract(tiny["data"], "alexnet", weights="none", layer="gap", cache_dir=root / "c8",
            device="cpu", progress=False, workers=0, engine="onnxruntime", precision="int8",
            split_rows=read_manifest(tiny["split"]).rows)
    cfg = HeadConfig(cv_folds=2, logreg_C=(1.0,), class_weight=("none",), n_boot=10, n_jobs=1)
    rec = fit("alexnet", "logreg", tiny["split"], cache_dir=root / "c8", weights="none",
              layer="gap", runs_dir=root / "runs8", config=cfg, progress=False,
              precision=engines.cache_tag("onnxruntime", "int8"))
    return {**tiny, "run": rec.path}


def test_int8_run_exports_its_own_int8_graph(int8_run: dict, tmp_path: Path) -> None:
    import onnx

    from featsvm.export import export_run
    from featsvm.features import engines
    from featsvm.runs import read_run

    rec = read_run(int8_run["run"])
    res = export_run(int8_run["run"], tmp_path / "int8.onnx", data_dir=int8_run["data"])
    p = res.parity
    assert (p["backbone_precision"], p["run_precision"], p["run_engine"]) == (
        "int8", "int8", "onnxruntime")
    n_test = len(rec.predictions().select("test").relpath)
    assert p["images"] == n_test > 0 and p["agreement"] == 1.0
    assert p["max_abs_prob_diff"] < 1e-4
    assert p["ood_in_graph"] and p["ood_agreement"] == 1.0
    model = onnx.load(str(res.path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = json.loads({m.key: m.value for m in model.metadata_props}["featsvm"])
    graph = engines.quantised_model_path(rec.config["cache"]["path"])
    assert meta["backbone_precision"] == "int8"
    assert meta["backbone_graph_sha256"] == engines.file_sha256(graph)
    out = CliRunner().invoke(main, ["export", "--run", str(int8_run["run"]), "--out",
                                    str(tmp_path / "cli.onnx")])
    assert out.exit_code == 0, out.output
    assert "backbone int8 (the run's features: onnxruntime int8)" in out.output
    assert "OOD flag in the graph" in out.output


def test_int8_export_names_a_missing_graph(int8_run: dict, tmp_path: Path) -> None:
    from featsvm.errors import PredictError
    from featsvm.export import export_run

    gone = tmp_path / "elsewhere" / "features.h5"
    run = _copy_run(int8_run["run"], tmp_path / "run", {"cache": {"path": str(gone)}})
    with pytest.raises(PredictError, match=r"features\.int8\.onnx, which is not there"):
        export_run(run, tmp_path / "m.onnx")


def test_onnx_prediction_imports_no_torch(exported: dict, tmp_path: Path) -> None:
    image = next((exported["data"] / "Original" / "Benign").glob("*.jpg"))
    code = (
        "import sys\n"
        "from featsvm.cli import main\n"
        "try:\n"
        f"    main(['-q', 'predict', '--onnx', {str(exported['model'])!r}, {str(image)!r}])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "bad = sorted(m for m in ('torch', 'torchvision', 'timm', 'sklearn') if m in sys.modules)\n"
        "print('IMPORTED', bad)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "IMPORTED []" in res.stdout, res.stdout


@pytest.mark.parametrize("backbone", ["vgg16", "inception_v3", "efficientnet_lite0"])
@pytest.mark.parametrize("size", [(64, 64), (300, 200), (199, 257)])
def test_numpy_preprocessing_matches_the_torch_transform(backbone: str, size: tuple) -> None:
    from featsvm.features.backbones import describe, make_transform
    from featsvm.features.onnx_input import prepare

    _spec, _info, pre = describe(backbone, "none")
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    want = make_transform(pre)(image).numpy()
    got = prepare(image, pre.to_json())
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-5


def test_export_refuses_what_it_cannot_reproduce() -> None:
    from featsvm.features.onnx_input import check_exportable

    with pytest.raises(UsageError, match="field view only"):
        check_exportable({"view": "cells", "interpolation": "bilinear"})
    with pytest.raises(UsageError, match="hand-crafted"):
        check_exportable({"features": {}})
