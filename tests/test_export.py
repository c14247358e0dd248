"""`featsvm export` (backbone + head as one ONNX graph) and `featsvm predict --onnx`: parity
with the run for a logistic and an SVM head, numpy preprocessing equal to the torch transform,
no torch in the ONNX prediction path. Tiny images, random-init AlexNet conv part."""

from __future__ import annotations

import csv
import json
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
    return {**tiny, "run": rec.path, "model": res.path, "parity": res.parity}


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
        probs = [k for k in r if k.startswith("prob_")]
        assert max(abs(float(r[k]) - float(t[k])) for k in probs) < 1e-4
    both = runner.invoke(main, ["predict", "--onnx", str(exported["model"]), "--run",
                                str(exported["run"]), str(exported["data"])])
    assert both.exit_code != 0 and "exactly one of --run" in both.output


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
