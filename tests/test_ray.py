"""Scale-out on Ray (featsvm.features.ray_extract, featsvm.cluster) on a REAL local Ray cluster
(``ray.init(num_cpus=2)``), not a mock: Ray features equal the single-process fp32 features
(same file, rows and bytes), a worker killed mid-run is restarted and its batches re-sent,
an interrupted run resumes, and fit / cv give the same results on joblib's Ray backend.

One cluster for the module (starting Ray costs seconds; all Ray tests live here, so the
cluster stops when they are done instead of idling through the rest of the suite). Without
Ray installed these tests skip, except in CI (CI=true, set by .ci/run) or with
FEATSVM_REQUIRE_RAY=1, where a missing Ray fails them.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset

from featsvm.cli import main
from featsvm.data.dataset import scan
from featsvm.data.manifest import ManifestRow, write_manifest
from featsvm.features.cache import read_cache
from featsvm.features.extract import SLEEP_ENV, extract

REPO = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("CI") == "true" or os.environ.get("FEATSVM_REQUIRE_RAY") == "1"
TOML = """[fit]
cv_folds = 2
n_jobs = 2
svm_C = [1.0, 10.0]
svm_gamma_scale = [1.0]
svm_linear_C = [1.0]
logreg_C = [0.1]
n_boot = 50
"""


@pytest.fixture(scope="module")
def ray_cluster():
    if importlib.util.find_spec("ray") is None:
        if REQUIRED:
            pytest.fail("ray is not installed but CI / FEATSVM_REQUIRE_RAY=1 needs these tests: "
                        "pip install 'featsvm[ray]'")
        pytest.skip("ray is not installed (pip install 'featsvm[ray]')")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """32 tiny images (one broken file more), their split manifest and the single-process
    fp32 cache of alexnet (random weights) in the folder `local`."""
    root = tmp_path_factory.mktemp("ray")
    data = make_dataset(root / "data", per_class=8, size=48)
    rows = []
    for i, rec in enumerate(scan(data).records):
        j = i % 8
        split = "train" if j < 4 else ("val" if j < 6 else "test")
        rows.append(ManifestRow(rec.relpath, rec.sha256, rec.label, i // 2, split))
    write_manifest(root / "split.csv", rows)
    (data / "Original/Pre/broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    local = extract(data, "alexnet", weights="none", layer="gap", cache_dir=root / "local",
                    batch_size=4, progress=False)
    return {"root": root, "data": data, "split": root / "split.csv", "local": local.cache_path}


def _same_cache(a: Path, b: Path) -> None:
    ca, cb = read_cache(a), read_cache(b)
    assert a.name == b.name and ca.attrs["fingerprint"] == cb.attrs["fingerprint"]
    assert list(ca.sha256) == list(cb.sha256) and list(ca.relpath) == list(cb.relpath)
    assert ca.features.dtype == cb.features.dtype == np.float32
    assert np.array_equal(ca.features, cb.features)  # bit-identical, not just close


def test_ray_features_equal_single_process(ray_cluster, env, tmp_path: Path) -> None:
    from featsvm.features.ray_extract import RaySource, extract_ray

    source = RaySource("alexnet", "none", None, "gap", batch_size=4, workers=2)
    s = extract_ray(env["data"], "alexnet", weights="none", layer="gap", cache_dir=tmp_path,
                    progress=False, source=source)
    assert s.n_new == 32 and s.device == "ray (cpu)"
    assert [rel for rel, _ in s.skipped] == ["Original/Pre/broken.jpg"]
    assert len({w["pid"] for w in source.worker_info}) == 2
    _same_cache(env["local"], s.cache_path)
    again = extract_ray(env["data"], "alexnet", weights="none", layer="gap",
                        cache_dir=tmp_path, progress=False, workers=2)
    assert again.n_new == 0 and again.n_cached == 32


def test_interrupted_run_resumes_with_the_missing_rows(ray_cluster, env, tmp_path) -> None:
    """A first run stops after 12 images (as a killed driver would, its committed batches
    kept); `featsvm extract --engine ray` then computes only the other 20."""
    from featsvm.features.ray_extract import extract_ray

    records = scan(env["data"]).records
    first = extract_ray(env["data"], "alexnet", weights="none", layer="gap", cache_dir=tmp_path,
                        batch_size=4, workers=1, progress=False, records=records[:12])
    assert first.n_new == 12
    res = CliRunner().invoke(main, [
        "extract", str(env["data"]), "--backbone", "alexnet", "--layer", "gap", "--weights",
        "none", "--cache", str(tmp_path), "--batch-size", "4", "--engine", "ray", "--workers",
        "1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "32 records: 20 computed, 12 already cached" in res.output
    assert "on ray (cpu)" in res.output and "Original/Pre/broken.jpg" in res.output
    (path,) = tmp_path.glob("*.h5")
    _same_cache(env["local"], path)  # 12 = 3 batches of 4: the same batches as one run
    bad = CliRunner().invoke(main, ["extract", str(env["data"]), "--backbone", "alexnet",
                                    "--address", "auto", "--cache", str(tmp_path)])
    assert bad.exit_code != 0 and "need --engine ray" in bad.output


def test_more_workers_than_the_cluster_holds_are_refused(ray_cluster, env, tmp_path) -> None:
    from featsvm.errors import UsageError
    from featsvm.features.ray_extract import extract_ray

    with pytest.raises(UsageError, match="--workers 3 need 3 CPUs but the Ray cluster has 2"):
        extract_ray(env["data"], "alexnet", weights="none", layer="gap", cache_dir=tmp_path,
                    workers=3, progress=False)


def test_killed_worker_is_restarted_and_the_cache_is_complete(
        ray_cluster, env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from featsvm.features.ray_extract import RaySource, extract_ray

    monkeypatch.setenv(SLEEP_ENV, "0.3")  # the driver waits after each commit: a slow run
    source = RaySource("alexnet", "none", None, "gap", batch_size=4, workers=2)
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["summary"] = extract_ray(env["data"], "alexnet", weights="none", layer="gap",
                                         cache_dir=tmp_path, progress=False, source=source)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while source.batches_done < 1 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert source.batches_done >= 1 and source.batches_done < 8, "the run ended too soon"
    victim = source.worker_info[0]["pid"]
    os.kill(victim, signal.SIGKILL)  # a real kill of the actor's process, two batches queued
    thread.join(180)
    assert not thread.is_alive()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)
    s = out["summary"]
    assert s.n_new == 32 and len(s.skipped) == 1  # type: ignore[attr-defined]
    _same_cache(env["local"], s.cache_path)  # type: ignore[attr-defined]


def test_cli_fit_and_cv_backend_ray_equal_local(ray_cluster, env, tmp_path: Path) -> None:
    """`featsvm fit` (SVM grid search) and `featsvm cv` (logistic regression, 3 folds) with
    n_jobs = 2 on local processes and on joblib's Ray backend: the same predictions (every
    probability) and the same metrics, timings aside."""
    cfg = tmp_path / "small.toml"
    cfg.write_text(TOML)
    common = ["--backbone", "alexnet", "--layer", "gap", "--weights", "none", "--cache",
              str(env["local"].parent), "--split", str(env["split"]), "--config", str(cfg),
              "--quiet"]
    out = {}
    for backend in ("local", "ray"):
        runs = tmp_path / backend
        for cmd in (["fit", "--head", "svm"], ["cv", "--head", "logreg", "--folds", "3"]):
            res = CliRunner().invoke(main, [*cmd, *common, "--runs", str(runs),
                                            "--backend", backend])
            assert res.exit_code == 0, res.output
        for run in sorted(runs.iterdir()):
            config = json.loads((run / "config.json").read_text())
            assert config["timing"]["backend"] == backend
            assert "backend" not in config["head_config"]  # not a setting of the model
            with open(run / "predictions.csv", newline="") as f:
                out[(backend, config["kind"])] = (
                    list(csv.reader(f)), json.loads((run / "metrics.json").read_text()))
    for kind in ("head", "cv"):
        preds_local, metrics_local = out[("local", kind)]
        preds_ray, metrics_ray = out[("ray", kind)]
        assert preds_local == preds_ray
        assert _no_timing(metrics_local) == _no_timing(metrics_ray)


def _no_timing(value):
    """`value` without its timings (keys naming seconds), at every depth."""
    if isinstance(value, dict):
        return {k: _no_timing(v) for k, v in value.items() if "second" not in k}
    if isinstance(value, list):
        return [_no_timing(v) for v in value]
    return value


def test_study_backend_option_overrides_fit_and_cv() -> None:
    from featsvm.study import load_study, with_backend

    study = load_study(REPO / "configs" / "cpu.toml")
    assert (study.fit.backend, study.cv.backend) == ("local", "local")
    on_ray = with_backend(study, "ray")
    assert (on_ray.fit.backend, on_ray.cv.backend) == ("ray", "ray")
    assert on_ray.fit.to_json() == study.fit.to_json()  # the same runs: found again
    assert with_backend(study, None) is study


def test_nothing_imports_ray_without_engine_ray(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=2, size=32)
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from featsvm.cli import main\n"
        f"res = CliRunner().invoke(main, ['extract', {str(data)!r}, '--backbone', "
        f"'colour_stats', '--cache', {str(tmp_path / 'cache')!r}, '--quiet'])\n"
        "assert res.exit_code == 0, res.output\n"
        "import featsvm.models.cv, featsvm.models.fit, featsvm.study\n"
        "mods = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print('RAY-MODULES', mods)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "RAY-MODULES []" in res.stdout
