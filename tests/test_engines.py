"""--precision auto (the CPU probe), --engine onnxruntime | openvino and int8 calibration:
tiny images, random-init AlexNet (conv part)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset

from featsvm import device
from featsvm.data.dataset import scan
from featsvm.data.manifest import ManifestRow, read_manifest, write_manifest
from featsvm.errors import DeviceError, UsageError
from featsvm.features import engines
from featsvm.features.cache import extract_command, read_cache
from featsvm.features.extract import extract


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture
def cpu_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Set the CPU flags the probe reads (a fake /proc/cpuinfo)."""

    def set_flags(line: str) -> None:
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\n{line}\n\n", encoding="utf-8")
        monkeypatch.setattr(device, "CPUINFO", info)
        device.probe_cpu.cache_clear()

    yield set_flags
    device.probe_cpu.cache_clear()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    data = make_dataset(root / "data", per_class=4, size=64)
    rows = []
    for i, rec in enumerate(scan(data).records):
        split = ("train", "train", "val", "test")[i % 4]
        rows.append(ManifestRow(rec.relpath, rec.sha256, rec.label, i, split))
    write_manifest(root / "split.csv", rows)
    return {"root": root, "data": data, "split": root / "split.csv"}


@pytest.mark.parametrize(("line", "native"), [
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", True),
    ("flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile", True),
    ("Features\t: fp asimd asimddp bf16 i8mm", True),  # Arm
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni", False),
    ("", False),
])
def test_auto_resolves_per_probe(cpu_flags, line: str, native: bool) -> None:
    cpu_flags(line)
    probe = device.probe_cpu()
    assert probe.native_bf16 is native
    assert device.resolve_precision("cpu", "auto") == ("bf16" if native else "fp32")
    assert device.resolve_precision("cpu", "fp32") == "fp32"  # only auto is resolved
    rec = device.precision_record("cpu", "auto")
    assert rec["resolved"] == ("bf16" if native else "fp32")
    assert rec["cpu_probe"]["native_bf16"] is native
    assert "cpu_probe" not in device.precision_record("cpu", "fp32")


def test_auto_is_recorded_in_the_cache(cpu_flags, env: dict[str, Path], tmp_path: Path
                                       ) -> None:
    cpu_flags("flags\t\t: fpu sse2 avx2")  # no native bf16 -> fp32, the plain fp32 cache
    records = scan(env["data"]).records[:2]
    s = extract(env["data"], "alexnet", weights="none", layer="gap", cache_dir=tmp_path,
                device="cpu", precision="auto", progress=False, records=records, workers=0)
    assert s.precision == "fp32" and "-fp32-" in s.cache_path.name
    rec = read_cache(s.cache_path).record()
    assert rec["precision"] == "fp32"
    assert rec["precision_choice"]["requested"] == "auto"
    assert rec["precision_choice"]["cpu_probe"]["native_bf16"] is False
    plain = extract(env["data"], "alexnet", weights="none", layer="gap", cache_dir=tmp_path,
                    device="cpu", precision="fp32", progress=False, records=records)
    assert plain.cache_path == s.cache_path and plain.n_cached == 2  # the same features


def test_auto_keeps_fp32_for_a_network_whose_bf16_falls_short(
        cpu_flags, env: dict[str, Path], tmp_path: Path) -> None:
    """On a native-bf16 CPU auto gives bf16 to AlexNet, but EfficientNet-Lite0 (bf16 cosine
    below 0.999) and the hand-crafted baselines keep fp32, recorded as such; fit/cv look for
    the same tag."""
    cpu_flags("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16")
    assert device.resolve_precision("cpu", "auto", bf16_ok=False) == "fp32"
    assert device.resolve_precision("cpu", "bf16", bf16_ok=False) == "bf16"  # explicit wins
    assert engines.cache_tag("torch", "auto", backbone="alexnet") == "bf16"
    assert engines.cache_tag("torch", "auto", backbone="vgg16") == "bf16"
    assert engines.cache_tag("torch", "auto", backbone="efficientnet_lite0") == "fp32"
    assert engines.cache_tag("torch", "auto", backbone="colour_stats") == "fp32"
    records = scan(env["data"]).records[:2]
    s = extract(env["data"], "efficientnet_lite0", weights="none", cache_dir=tmp_path,
                device="cpu", precision="auto", progress=False, records=records, workers=0)
    assert s.precision == "fp32" and "-fp32-" in s.cache_path.name
    choice = read_cache(s.cache_path).record()["precision_choice"]
    assert choice["resolved"] == "fp32" and choice["network_keeps_fp32"] is True
    assert choice["cpu_probe"]["native_bf16"] is True
    a = extract(env["data"], "alexnet", weights="none", layer="gap", cache_dir=tmp_path,
                device="cpu", precision="auto", progress=False, records=records, workers=0)
    assert a.precision == "bf16" and "-bf16-" in a.cache_path.name


def test_engine_and_quantisation_are_in_the_fingerprint() -> None:
    from featsvm.features.backbones import describe
    from featsvm.features.key import FeatureKey, WeightsId

    pre = describe("alexnet", "none", layer="gap")[2]
    tags = [engines.compute_tag(e, p) for e, p in (
        ("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
        ("openvino", "fp32"), ("openvino", "int8"))]
    assert tags[:2] == ["fp32", "bf16"]  # torch caches keep their names
    keys = [FeatureKey("alexnet", WeightsId("w", "ab" * 32), t, pre) for t in tags]
    assert len({k.file_name for k in keys}) == len({k.fingerprint for k in keys}) == len(tags)
    assert all(engines.parse_tag(engines.compute_tag(e, p)) == (e, p)
               for e, p in (("torch", "bf16"), ("onnxruntime", "int8"), ("openvino", "fp32")))
    cmd = extract_command("DATA", "alexnet", cache_dir="c", precision="onnxruntime-int8")
    assert "--precision int8 --engine onnxruntime" in cmd and "--split" in cmd
    with pytest.raises(DeviceError, match="int8 needs --engine"):
        engines.compute_tag("torch", "int8")
    with pytest.raises(DeviceError, match="runs fp32 or int8"):
        engines.compute_tag("onnxruntime", "bf16")
    assert engines.cache_tag("onnxruntime", "auto") == "onnxruntime-fp32"


def test_refusals(env: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="int8"):
        extract(env["data"], "alexnet", weights="none", cache_dir=tmp_path, device="cpu",
                precision="int8", progress=False)
    with pytest.raises(UsageError, match="calibrated on training images"):
        extract(env["data"], "alexnet", weights="none", cache_dir=tmp_path, device="cpu",
                precision="int8", engine="onnxruntime", progress=False)
    with pytest.raises(UsageError, match="hand-crafted"):
        extract(env["data"], "colour_stats", cache_dir=tmp_path, engine="onnxruntime",
                progress=False)
    assert not list(tmp_path.glob("*.h5"))


def test_onnxruntime_fp32_and_int8_caches(env: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    from featsvm.features import quantise

    picked: list[list[str]] = []
    real = quantise.calibration_rows

    def spy(rows, n):
        out = real(rows, n)
        picked.append([r.split for r in out])
        return out

    monkeypatch.setattr(quantise, "calibration_rows", spy)
    man = read_manifest(env["split"])
    kw = dict(weights="none", layer="gap", cache_dir=tmp_path, device="cpu", progress=False,
              workers=0)
    ref = extract(env["data"], "alexnet", **kw)
    ort = extract(env["data"], "alexnet", engine="onnxruntime", **kw)
    first = scan(env["data"]).records[:8]
    q = extract(env["data"], "alexnet", engine="onnxruntime", precision="int8",
                split_rows=man.rows, calibration_images=100, records=first, **kw)
    assert len({ref.cache_path, ort.cache_path, q.cache_path}) == 3
    assert "onnxruntime-int8" in q.cache_path.name
    shas = [r.sha256 for r in man.rows]
    a, b, c = (read_cache(s.cache_path) for s in (ref, ort, q))
    assert _cos(a.lookup(shas), b.lookup(shas)).min() > 0.9999
    some = [r.sha256 for r in first]
    assert _cos(a.lookup(some), c.lookup(some)).min() > 0.99
    # calibrated on the train rows only: all of them (n = 100 > 8 train rows), nothing else
    assert picked == [["train"] * 8]
    assert c.attrs["int8_calibration_sha256"] == quantise.calibration_digest(
        sorted(r.sha256 for r in man.rows if r.split == "train"))
    info = json.loads(c.attrs["engine"])
    assert info["quantisation"]["calibration_images"] == 8
    assert info["model_sha256"] == engines.file_sha256(
        engines.quantised_model_path(q.cache_path))
    assert c.record()["engine"]["engine"] == "onnxruntime"
    # another calibration set for the same cache file is refused
    other = [ManifestRow(r.relpath, r.sha256, r.label, r.group,
                         "train" if r.split == "val" else "val") for r in man.rows]
    with pytest.raises(UsageError, match="calibrated on other train images"):
        extract(env["data"], "alexnet", engine="onnxruntime", precision="int8",
                split_rows=other, **kw)
    q2 = extract(env["data"], "alexnet", engine="onnxruntime", precision="int8",
                 split_rows=man.rows, **kw)  # the same calibration: the rest is added
    assert q2.n_new == len(shas) - 8 and q2.n_cached == 8


def test_calibration_rows_are_train_rows_in_a_fixed_order() -> None:
    from featsvm.features.quantise import calibration_rows

    rows = [ManifestRow(f"f{i}", f"{i:064x}"[::-1], "benign", i, s)
            for i, s in enumerate(["test", "train", "val", "train", "train"])]
    picked = calibration_rows(rows, 2)
    assert [r.split for r in picked] == ["train", "train"]
    assert picked == sorted([r for r in rows if r.split == "train"], key=lambda r: r.sha256)[:2]
    assert calibration_rows(list(reversed(rows)), 2) == picked


def test_openvino_runner_matches_torch() -> None:
    pytest.importorskip("openvino")
    import torch

    from featsvm.features.backbones import load_backbone

    lb = load_backbone("alexnet", weights="none", layer="gap")
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ref = lb.embedder(torch.from_numpy(x)).numpy()
    run = engines.build_runner("openvino", "fp32", lb.embedder, 224)
    assert run.info["inference_precision"] == "f32"
    assert _cos(run(x), ref).min() > 0.9999


def test_predict_runs_the_engine_the_cache_was_made_with(env: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """A head trained on int8 onnxruntime features: predict runs that very int8 graph by
    default (same probabilities as the run's predictions.csv); --engine torch runs fp32."""
    pytest.importorskip("onnxruntime")
    from featsvm.models.fit import fit
    from featsvm.models.heads import HeadConfig
    from featsvm.predict import predict
    from featsvm.runs import read_run

    man = read_manifest(env["split"])
    extract(env["data"], "alexnet", weights="none", layer="gap", cache_dir=tmp_path / "c",
            device="cpu", progress=False, workers=0, engine="onnxruntime", precision="int8",
            split_rows=man.rows)
    cfg = HeadConfig(cv_folds=2, logreg_C=(1.0,), class_weight=("none",), n_boot=10, n_jobs=1)
    rec = fit("alexnet", "logreg", env["split"], cache_dir=tmp_path / "c", weights="none",
              layer="gap", runs_dir=tmp_path / "runs", config=cfg, progress=False,
              precision=engines.cache_tag("onnxruntime", "int8"))
    assert rec.config["cache"]["precision"] == "onnxruntime-int8"
    assert rec.config["cache"]["engine"]["quantisation"]["calibration_images"] == 8
    own = read_run(rec.path).predictions()
    files = [env["data"] / r for r in own.relpath]
    res = predict(rec.path, files, data_root=env["data"], progress=False)
    got = np.array([p.proba for p in res.predictions])
    assert [p.file for p in res.predictions] == own.relpath
    assert np.abs(got - own.proba).max() < 1e-5
    fp32 = predict(rec.path, files, data_root=env["data"], progress=False, engine="torch")
    assert np.abs(np.array([p.proba for p in fp32.predictions]) - own.proba).max() > 0
