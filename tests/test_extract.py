"""Extraction end to end on tiny images with random weights: CLI, resume after SIGKILL,
duplicates, bad images, device/precision refusals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset

from featsvm.cli import main
from featsvm.data.dataset import scan
from featsvm.device import DeviceError, resolve_device
from featsvm.features.cache import read_cache
from featsvm.features.extract import SLEEP_ENV, extract

REPO = Path(__file__).resolve().parents[1]


def test_cli_end_to_end_and_cached_rerun(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copy(tiny_dataset / "Original/Benign/img-Benign-000.jpg",
                tiny_dataset / "Original/Pro/copy-of-benign.jpg")  # same content, other label
    (tiny_dataset / "Original/Pre/broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    args = ["extract", str(tiny_dataset), "--backbone", "alexnet", "--layer", "gap", "--weights",
            "none", "--cache", str(cache), "--batch-size", "8", "--workers", "1", "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "25 records: 24 computed, 0 already cached, 1 duplicate" in res.output
    assert "Original/Pre/broken.jpg" in res.output and "skipped 1 file" in res.output
    (path,) = cache.glob("*.h5")
    c = read_cache(path)
    assert c.features.shape == (24, 256) and np.isfinite(c.features).all()
    assert c.attrs["weights_label"] == "random" and c.attrs["precision"] == "fp32"
    assert c.attrs["preprocessing"]["layer"] == "gap"
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "0 computed, 24 already cached" in res.output


def test_bad_files_inside_workers_are_skipped(tiny_dataset: Path, tmp_path: Path) -> None:
    records = scan(tiny_dataset).records
    (tiny_dataset / records[0].relpath).write_bytes(b"garbage")  # changed after the scan
    (tiny_dataset / records[5].relpath).unlink()  # vanished after the scan
    s = extract(tiny_dataset, "alexnet", weights="none", cache_dir=tmp_path, batch_size=4,
                workers=2, layer="gap", progress=False, records=records)
    assert s.n_new == 22 and s.n_total == 24
    reasons = dict(s.skipped)
    assert set(reasons) == {records[0].relpath, records[5].relpath}
    assert "sha256 differs" in reasons[records[0].relpath]
    assert len(read_cache(s.cache_path)) == 22


def test_resume_after_sigkill(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=3, size=48)
    cache = tmp_path / "cache"
    code = (
        "from featsvm.features.extract import extract; "
        f"extract({str(data)!r}, 'alexnet', weights='none', cache_dir={str(cache)!r}, "
        "batch_size=4, workers=0, layer='gap', progress=False)"
    )
    env = {**os.environ, SLEEP_ENV: "120"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "committed 4 rows" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            assert line or proc.poll() is None, "extract subprocess died before its first batch"
        assert "committed 4 rows" in line
        proc.send_signal(signal.SIGKILL)  # a real, uncatchable kill while holding the lock
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    (path,) = cache.glob("*.h5")
    killed = read_cache(path)  # readable, lock gone with the process
    assert len(killed) == 4
    s = extract(data, "alexnet", weights="none", cache_dir=cache, batch_size=8, workers=0,
                layer="gap", progress=False)
    assert (s.n_cached, s.n_new, s.cache_path) == (4, 8, path)
    full = read_cache(path)
    assert len(full) == 12 and len(set(full.sha256)) == 12
    # rows from the killed run equal a fresh computation (same seeded 'random' model)
    done = {r.sha256: r for r in scan(data).records}
    fresh = extract(data, "alexnet", weights="none", cache_dir=tmp_path / "fresh", workers=0,
                    layer="gap", progress=False, records=[done[s] for s in killed.sha256])
    np.testing.assert_allclose(read_cache(fresh.cache_path).lookup(killed.sha256),
                               killed.features, rtol=1e-4, atol=1e-5)


def test_device_and_precision_refusals(tiny_dataset: Path, tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(DeviceError, match="fp16 is not supported on the CPU"):
        extract(tiny_dataset, "alexnet", weights="none", cache_dir=tmp_path, device="cpu",
                precision="fp16", progress=False)
    res = CliRunner().invoke(main, ["extract", str(tiny_dataset), "--backbone", "alexnet",
                                    "--weights", "none", "--device", "cpu", "--precision",
                                    "fp16", "--cache", str(tmp_path)])
    assert res.exit_code != 0 and "use --precision bf16" in res.output
    assert not list(tmp_path.glob("*.h5"))


def test_bf16_matches_fp32(tiny_dataset: Path, tmp_path: Path) -> None:
    records = scan(tiny_dataset).records[:3]
    out = {}
    for precision in ("fp32", "bf16"):
        s = extract(tiny_dataset, "alexnet", weights="none", cache_dir=tmp_path, device="cpu",
                    precision=precision, layer="gap", progress=False, records=records,
                    workers=0)
        out[precision] = read_cache(s.cache_path).lookup([r.sha256 for r in records])
    a, b = out["fp32"], out["bf16"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_default_batch_size_comes_from_the_backbone_spec() -> None:
    import torch

    from featsvm.features.backbones import get_spec
    from featsvm.features.extract import default_batch_size

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert default_batch_size(cpu, get_spec("vgg16")) == 4
    assert default_batch_size(cpu, get_spec("alexnet")) == 32
    assert default_batch_size(gpu, get_spec("vgg16")) == 64


def test_zero_batch_size_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        extract(tmp_path / "does-not-matter", "alexnet", weights="none", device="cpu",
                batch_size=0, cache_dir=tmp_path / "cache")
