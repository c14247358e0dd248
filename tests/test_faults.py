"""Nothing lost under faults (issue 16): full disk, kill -9 mid-write, broken files, no pickle.

Each test reproduces one fault first; the fault-injection figures are in benchmarks/faults.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import make_dataset

from featsvm import fileio
from featsvm.data.dataset import ImageRecord
from featsvm.errors import CacheError, CacheFullError, ImageError, RunRecordError
from featsvm.features.backbones import get_spec, preprocessing_for
from featsvm.features.cache import CacheWriter, cache_path, read_cache
from featsvm.features.key import FeatureKey, WeightsId
from featsvm.features.weights import WeightsInfo
from featsvm.runs import verify_sidecar, write_sidecar

# ---------------------------------------------------------------- atomic writes


def test_atomic_write_fsyncs_the_file_and_its_folder(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    fileio.write_json_atomic(tmp_path / "sub" / "config.json", {"a": 1})
    assert synced.count("file") >= 1 and synced.count("dir") >= 1
    assert synced.index("file") < len(synced) - 1 - synced[::-1].index("dir")  # file, then dir
    assert (tmp_path / "sub" / "config.json").read_text().strip().startswith("{")


def test_temp_files_of_killed_saves_are_removed(tmp_path: Path) -> None:
    # what a save killed between mkstemp and os.replace leaves behind
    stale = tmp_path / ".checkpoint-last.pt.abc123.tmp"
    stale.write_bytes(b"x" * 100)
    keep = tmp_path / "checkpoint-last.pt"
    keep.write_bytes(b"real")
    other = tmp_path / "notes.tmp"  # not one of ours
    other.write_bytes(b"")
    removed = fileio.remove_temp_files(tmp_path)
    assert removed == [stale]
    assert not stale.exists() and keep.exists() and other.exists()


# ---------------------------------------------------------------- run records


def test_empty_or_garbled_sidecar_is_a_run_record_error(tmp_path: Path) -> None:
    model = tmp_path / "model.skops"
    model.write_bytes(b"model bytes")
    write_sidecar(model)
    sidecar = tmp_path / "model.skops.sha256"
    for text in ("", "\n", "not-a-hash  model.skops\n"):
        sidecar.write_text(text, encoding="utf-8")
        with pytest.raises(RunRecordError, match="sidecar"):
            verify_sidecar(model)


# ---------------------------------------------------------------- the HDF5 cache

RANDOM = WeightsInfo("random", None, "random init")


def _key(layer: str = "gap") -> FeatureKey:
    pre = preprocessing_for(get_spec("alexnet"), RANDOM, layer)
    return FeatureKey("alexnet", WeightsId.from_info(RANDOM), "fp32", pre)


def _cache_attrs(layer: str = "gap") -> dict:
    return {**_key(layer).cache_attrs(),
            "extract_command": "featsvm extract DATA --backbone alexnet --weights none"}


def _append(writer: CacheWriter, feats: np.ndarray, sha: list[str], rel: list[str],
            lab: list[str]) -> None:
    writer.append(feats, [ImageRecord(r, s, b, 0, 0)
                          for r, s, b in zip(rel, sha, lab, strict=True)])


def _rows(start: int, n: int, dim: int = 256):
    """Deterministic, never-zero rows: row i holds i + 1 + arange(dim) / dim."""
    ids = np.arange(start, start + n)
    feats = (ids[:, None] + 1 + np.arange(dim)[None, :] / dim).astype(np.float32)
    return (feats, [f"{i:064x}" for i in ids], [f"Original/Benign/ä-{i}.jpg" for i in ids],
            ["benign"] * n)


def _check_rows(c) -> None:
    n = len(c)
    want = _rows(0, n)
    assert c.sha256 == want[1] and c.relpath == want[2] and c.label == want[3]
    np.testing.assert_array_equal(c.features, want[0])


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 1 MiB tmpfs (a really full disk); skipped where mounting is not allowed."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("space_check", ["on", "blind"])
def test_full_disk_commits_no_wrong_rows(small_tmpfs: Path, space_check: str,
                                         monkeypatch) -> None:
    """"blind": the free-space check is fooled (another process fills the disk between the
    check and the write), so the write itself meets ENOSPC."""
    if space_check == "blind":
        import featsvm.features.cache as cache_mod

        real = shutil.disk_usage
        monkeypatch.setattr(cache_mod.shutil, "disk_usage",
                            lambda p: real(p)._replace(free=1 << 40))
    path = cache_path(small_tmpfs, "alexnet", RANDOM, "fp32", layer="gap")
    w = CacheWriter(path, _key(), _cache_attrs())
    w.expect_rows(5000)
    with pytest.raises(CacheFullError) as err:
        for start in range(0, 5000, 8):
            _append(w, *_rows(start, 8))
    w.close()
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "free" in msg and "MB" in msg
    c = read_cache(path)
    assert 0 < len(c) < 5000
    _check_rows(c)  # every committed row is the row written: no zeros
    assert np.all(np.abs(c.features).sum(axis=1) > 0)


def _writer_child(path: Path, ready_fd: int) -> None:  # runs in a forked child
    try:
        with CacheWriter(path, _key(), _cache_attrs()) as w:
            os.write(ready_fd, b"r")
            i = w.n_rows
            while True:
                _append(w, *_rows(i, 3))
                i += 3
    except BaseException as exc:  # noqa: BLE001 - report any failure of the resumed writer
        os.write(2, f"writer child failed: {type(exc).__name__}: {exc}\n".encode())
        os._exit(3)
    os._exit(0)


def kill_cycles(path: Path, cycles: int, seed: int = 0) -> list[int]:
    """Fork a writer that resumes the cache and appends rows without pause; SIGKILL it at a
    random moment (often inside a flush); repeat. Returns the committed rows after each kill."""
    rng = np.random.default_rng(seed)
    counts = []
    for _ in range(cycles):
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _writer_child(path, wfd)
        os.close(wfd)
        ready = os.read(r, 1)
        os.close(r)
        time.sleep(float(rng.uniform(0.0, 0.15)))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert ready == b"r" and os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9, (
            f"the resumed writer failed (status {status}) instead of being killed")
        c = read_cache(path)
        _check_rows(c)
        counts.append(len(c))
    return counts


def test_kill_9_inside_flushes_never_breaks_the_cache(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "alexnet", RANDOM, "fp32", layer="gap")
    with CacheWriter(path, _key(), _cache_attrs()) as w:
        _append(w, *_rows(0, 3))
    counts = kill_cycles(path, int(os.environ.get("FEATSVM_TEST_KILL_CYCLES", "12")))
    assert counts == sorted(counts) and counts[-1] > 3
    with CacheWriter(path, _key(), _cache_attrs()) as w:  # a final clean resume appends after them
        n = w.n_rows
        _append(w, *_rows(n, 2))
    _check_rows(read_cache(path))


def _write_layout_1(path: Path, n: int, nan_rows: tuple[int, ...] = ()) -> None:
    """A cache file as featsvm wrote it before layout 2 (variable-length strings)."""
    attrs = _cache_attrs()
    feats, sha, rel, lab = _rows(0, n)
    feats[list(nan_rows)] = np.nan
    with h5py.File(path, "w") as f:
        str_dt = h5py.string_dtype("utf-8")
        f.create_dataset("features", data=feats, maxshape=(None, 256), chunks=(64, 256))
        f.create_dataset("sha256", data=np.array([s.encode() for s in sha], dtype="S64"),
                         maxshape=(None,), chunks=(1024,))
        f.create_dataset("relpath", data=rel, dtype=str_dt, maxshape=(None,), chunks=(1024,))
        f.create_dataset("label", data=lab, dtype=str_dt, maxshape=(None,), chunks=(1024,))
        for k, v in attrs.items():
            f.attrs[k] = json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
        f.attrs["n_rows"] = n
        f.attrs["format_version"] = 1


def test_layout_1_caches_stay_readable_and_are_migrated_by_a_writer(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "alexnet", RANDOM, "fp32", layer="gap")
    _write_layout_1(path, 10)
    _check_rows(read_cache(path))  # readers need no migration
    with CacheWriter(path, _key(), _cache_attrs()) as w:
        assert w.n_rows == 10 and not w.dropped
        _append(w, *_rows(10, 2))
    assert path.name == cache_path(tmp_path, "alexnet", RANDOM, "fp32", layer="gap").name
    c = read_cache(path)
    _check_rows(c)
    assert len(c) == 12 and c.attrs["layout"] == 2 and c.attrs["backbone"] == "alexnet"
    with h5py.File(path) as f:
        assert f["relpath"].dtype.kind == "S" and f["label"].dtype.kind == "S"


def test_non_finite_rows_are_refused_and_old_ones_dropped_for_recomputation(
        tmp_path: Path) -> None:
    path = cache_path(tmp_path, "alexnet", RANDOM, "fp32", layer="gap")
    _write_layout_1(path, 6, nan_rows=(1, 4))
    with CacheWriter(path, _key(), _cache_attrs()) as w:
        assert [d[1] for d in w.dropped] == ["Original/Benign/ä-1.jpg", "Original/Benign/ä-4.jpg"]
        assert w.n_rows == 4 and not w.has(f"{1:064x}") and w.has(f"{2:064x}")
        feats, sha, rel, lab = _rows(100, 2)
        feats[1, 3] = np.inf
        with pytest.raises(CacheError, match=r"non-finite .*ä-101\.jpg"):
            _append(w, feats, sha, rel, lab)
        assert w.n_rows == 4
    c = read_cache(path)
    assert len(c) == 4 and np.isfinite(c.features).all()


def test_extract_skips_non_finite_embeddings_and_a_rerun_recomputes_them(
        tmp_path: Path, monkeypatch) -> None:
    import torch

    import featsvm.features.extract as ex

    data = make_dataset(tmp_path / "data", per_class=2, size=32)
    real = ex.load_backbone

    def poisoned(*a, **k):
        loaded = real(*a, **k)
        inner = loaded.embedder

        class NaNFirst(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x):
                out = self.inner(x).clone()
                out[0, 0] = float("nan")
                return out

        loaded.embedder = NaNFirst()
        return loaded

    monkeypatch.setattr(ex, "load_backbone", poisoned)
    s = ex.extract(data, "alexnet", weights="none", cache_dir=tmp_path / "c", batch_size=4,
                   workers=0, layer="gap", progress=False)
    assert s.n_new == 6 and len(s.skipped) == 2
    assert all("non-finite" in why for _, why in s.skipped)
    monkeypatch.setattr(ex, "load_backbone", real)
    s2 = ex.extract(data, "alexnet", weights="none", cache_dir=tmp_path / "c", batch_size=4,
                    workers=0, layer="gap", progress=False)
    assert (s2.n_new, s2.n_cached, s2.skipped) == (2, 6, [])
    assert np.isfinite(read_cache(s2.cache_path).features).all()


def test_extract_on_a_full_disk_is_one_line_naming_path_and_space(
        small_tmpfs: Path, tmp_path: Path) -> None:
    from test_errors import _one_line_failure

    data = make_dataset(tmp_path / "data", per_class=2, size=32)
    filler = small_tmpfs / "filler"  # leave ~200 KB: the file fits, the rows do not
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_tmpfs).free - 200_000))
    msg = _one_line_failure(["extract", str(data), "--backbone", "alexnet", "--weights", "none",
                             "--layer", "gap", "--workers", "0", "--cache", str(small_tmpfs),
                             "--quiet"])
    assert "disk full" in msg and str(small_tmpfs) in msg and "free at least" in msg
    for h5 in small_tmpfs.glob("*.h5"):  # nothing committed
        assert len(read_cache(h5)) == 0


# ---------------------------------------------------------------- bad input files


def _scan_with_timeout(root: Path, fifo: Path | None = None, seconds: float = 60.0):
    """scan() in a thread; a FIFO reader that blocks is released by opening its writer end."""
    from featsvm.data.dataset import scan

    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", scan(root, workers=2)),
                         daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive() and fifo is not None:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
    assert "r" in out, "scan hung"
    return out["r"]


def test_special_files_are_skipped_with_a_reason(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=2, size=32)
    benign = data / "Original" / "Benign"
    os.mkfifo(benign / "x.jpg")
    (benign / "zero.jpg").symlink_to("/dev/zero")
    (benign / "link.jpg").symlink_to(benign / "img-Benign-000.jpg")  # a link to an image: fine
    res = _scan_with_timeout(data, fifo=benign / "x.jpg", seconds=30)
    reasons = dict(res.skipped)
    assert "FIFO" in reasons["Original/Benign/x.jpg"]
    assert "character device" in reasons["Original/Benign/zero.jpg"]
    assert len(res.records) == 9


def test_reads_are_bounded_and_the_pixel_guard_comes_first(tmp_path: Path, monkeypatch) -> None:
    import tracemalloc

    from PIL import Image

    import featsvm.data.dataset as ds

    big = tmp_path / "big.bmp"
    Image.new("RGB", (3000, 2000)).save(big)  # 6 MP, an 18 MB file
    monkeypatch.setattr(ds, "MAX_PIXELS", 5_000_000)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="6 MP"):
            ds.load_rgb(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # refused from the header: the 18 MB were never read
    monkeypatch.setattr(ds, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ImageError, match="larger than"):
        ds.load_rgb(big)


def test_non_utf8_file_names_are_named_skipped_and_the_rest_goes_on(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from featsvm.cli import main
    from featsvm.data.manifest import read_manifest

    data = make_dataset(tmp_path / "data", per_class=4, size=32)
    src = data / "Original" / "Pre" / "img-Pre-000.jpg"
    bad = os.path.join(os.fsencode(src.parent), b"caf\xe9-\xff.jpg")
    os.rename(src, bad)
    res = CliRunner().invoke(main, ["split", str(data), "--out", str(tmp_path / "split.csv")])
    assert res.exit_code == 0, res.output
    assert "caf\\xe9-\\xff.jpg" in res.output and "UTF-8" in res.output
    man = read_manifest(tmp_path / "split.csv")
    assert len(man.rows) == 15
    from featsvm.features.extract import extract

    s = extract(data, "alexnet", weights="none", cache_dir=tmp_path / "c", workers=0,
                layer="gap", progress=False)
    assert s.n_new == 15 and any("UTF-8" in why for _, why in s.skipped)


def test_animated_gif_and_webp_are_listed_not_dropped(tmp_path: Path) -> None:
    from PIL import Image

    data = make_dataset(tmp_path / "data", per_class=2, size=32)
    early = data / "Original" / "Early"
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    frames[0].save(early / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(early / "anim.webp", save_all=True, append_images=frames[1:])
    frames[0].save(early / "still.gif")
    res = _scan_with_timeout(data)
    reasons = dict(res.skipped)
    assert "animated" in reasons["Original/Early/anim.gif"]
    assert "animated" in reasons["Original/Early/anim.webp"]
    assert any(r.relpath == "Original/Early/still.gif" for r in res.records)


# ---------------------------------------------------------------- manifest checks


def _manifest_lines(tmp_path: Path) -> tuple[Path, list[str]]:
    from featsvm.data.manifest import ManifestRow, write_manifest

    rows = [ManifestRow(f"Original/Benign/{i}.jpg", f"{i:064x}", "benign", i,
                        ("train", "train", "val", "test")[i % 4]) for i in range(8)]
    path = tmp_path / "split.csv"
    write_manifest(path, rows)
    return path, path.read_text().splitlines()


def test_hand_edited_split_with_an_image_in_two_partitions_is_refused(tmp_path: Path) -> None:
    from featsvm.data.manifest import read_manifest
    from featsvm.errors import ManifestError

    path, lines = _manifest_lines(tmp_path)
    read_manifest(path)  # as written: fine
    # line 3 (train) gets the sha256 of line 4 (val): the same image in train and val
    cols = lines[2].split(",")
    cols[1] = lines[3].split(",")[1]
    lines[2] = ",".join(cols)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"sha256 .* lines? 3 .*train.* 4 .*val"):
        read_manifest(path)


def test_hand_edited_split_with_a_group_in_two_partitions_is_refused(tmp_path: Path) -> None:
    from featsvm.data.manifest import read_manifest
    from featsvm.errors import ManifestError

    path, lines = _manifest_lines(tmp_path)
    cols = lines[4].split(",")  # line 5 (test) joins the group of line 2 (train)
    cols[3] = lines[1].split(",")[3]
    lines[4] = ",".join(cols)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"group .* lines? 2 .*train.* 5 .*test"):
        read_manifest(path)


# ---------------------------------------------------------------- no code execution on load


def _tiny_head(head: str = "svm", calibration: str = "temperature"):
    from featsvm.labels import LABELS
    from featsvm.models.heads import HeadConfig, calibrate, fit_head

    rng = np.random.default_rng(0)
    y = np.array(list(LABELS) * 10)
    X = rng.normal(size=(40, 8)) + np.repeat(np.eye(4, 8)[None], 10, axis=0).reshape(40, 8) * 3
    cfg = HeadConfig(cv_folds=2, n_jobs=1, pca=(0, 4), calibration=calibration,
                     svm_C=(1.0,), svm_gamma_scale=(1.0,), svm_linear_C=(0.1,), logreg_C=(1.0,))
    fitted = fit_head(X, y, np.arange(40), head, cfg)
    if calibration in ("temperature", "sigmoid", "isotonic"):
        fitted = calibrate(fitted, X, y)
    return fitted, X


def _head_run(tmp_path: Path, fitted, legacy: bool = False) -> Path:
    """A complete head run record around `fitted` (legacy: a joblib pickle, as before)."""
    from test_report import make_split

    from featsvm.data.manifest import read_manifest
    from featsvm.models.modelfile import save_model
    from featsvm.runs import finish_run, new_run_dir, save_joblib, versions

    data = make_dataset(tmp_path / "data", per_class=6, size=32)
    man = read_manifest(make_split(data, tmp_path / "split.csv"))
    scored = [r for r in man.rows if r.split in ("val", "test")]
    run_dir = new_run_dir(tmp_path / "runs", "x-svm")
    name = "model.joblib" if legacy else "model.skops"
    sha = save_joblib(run_dir, fitted, name) if legacy else save_model(run_dir, fitted, name)
    proba = np.full((len(scored), 4), 0.25)
    config = {"run_id": run_dir.name, "kind": "head", "model": "x + svm", "backbone": "alexnet",
              "head": "svm", "weights": {"label": "random", "sha256": None},
              "preprocessing": {"layer": "gap"}, "split": {"path": str(man.path),
                                                           "sha256": man.sha256},
              "seed": 0, "model_file": name, "model_sha256": sha, "timing": {},
              "versions": versions(), "created": "2026-01-01T00:00:00Z"}
    finish_run(run_dir, config, {"val": {}, "test": {}}, scored, proba)
    return run_dir


@pytest.mark.parametrize(("head", "calibration"), [("svm", "temperature"), ("svm", "sigmoid"),
                                                    ("svm", "isotonic"), ("logreg", "none")])
def test_heads_are_saved_as_skops_and_load_without_pickle(tmp_path: Path, head: str,
                                                          calibration: str) -> None:
    import pickle
    import zipfile

    from featsvm.models.modelfile import load_model, save_model

    fitted, X = _tiny_head(head, calibration)
    sha = save_model(tmp_path, fitted)
    path = tmp_path / "model.skops"
    assert zipfile.is_zipfile(path)
    with pytest.raises(pickle.UnpicklingError):  # not a pickle at all
        pickle.loads(path.read_bytes())
    back = load_model(path, expected_sha256=sha)
    np.testing.assert_allclose(back.predict_proba(X), fitted.predict_proba(X))


class Evil:
    def __reduce__(self):  # what a malicious pickle would run on load
        return (os.system, ("touch /tmp/featsvm-pwned",))


def test_a_model_file_with_an_untrusted_type_is_refused(tmp_path: Path) -> None:
    import skops.io as sio

    from featsvm.models.modelfile import load_model

    fitted, _ = _tiny_head("logreg", "none")
    fitted.timing = {"x": Evil()}  # type: ignore[dict-item]
    path = tmp_path / "model.skops"
    sio.dump(fitted, path)
    sha = write_sidecar(path)  # a consistent record: only the content is hostile
    with pytest.raises(RunRecordError, match=r"untrusted type.*Evil"):
        load_model(path, expected_sha256=sha)
    assert not Path("/tmp/featsvm-pwned").exists()


def test_old_pickle_runs_need_trust_pickle(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from featsvm.cli import main
    from featsvm.models.modelfile import load_head
    from featsvm.runs import read_run

    fitted, X = _tiny_head("logreg", "none")
    run_dir = _head_run(tmp_path, fitted, legacy=True)
    record = read_run(run_dir)
    with pytest.raises(RunRecordError, match="--trust-pickle"):
        load_head(record)
    back = load_head(record, trust_pickle=True)
    np.testing.assert_allclose(back.predict_proba(X), fitted.predict_proba(X))
    img = next((tmp_path / "data" / "Original" / "Pro").iterdir())
    res = CliRunner().invoke(main, ["predict", "--run", str(run_dir), str(img), "--quiet"])
    assert res.exit_code == 1 and "--trust-pickle" in res.output, res.output


def test_swapped_model_with_a_matching_sidecar_is_refused(tmp_path: Path) -> None:
    from featsvm.models.modelfile import load_head, save_model
    from featsvm.runs import read_run

    fitted, _ = _tiny_head("logreg", "none")
    run_dir = _head_run(tmp_path, fitted)
    other, _ = _tiny_head("svm", "temperature")
    save_model(run_dir, other)  # swaps model.skops AND rewrites its sidecar
    with pytest.raises(RunRecordError, match="config.json"):
        load_head(read_run(run_dir))


def test_every_artefact_sha256_is_recorded_and_checked(tmp_path: Path) -> None:
    from featsvm.runs import list_runs, read_run

    fitted, _ = _tiny_head("logreg", "none")
    run_dir = _head_run(tmp_path, fitted)
    rec = read_run(run_dir)
    assert set(rec.config["artefacts"]) == {"model.skops", "predictions.csv", "metrics.json"}
    assert rec.config["artefacts"]["model.skops"] == fileio.sha256_file(run_dir / "model.skops")
    with open(run_dir / "predictions.csv", "a") as f:
        f.write("\n")
    with pytest.raises(RunRecordError, match="predictions.csv"):
        read_run(run_dir)
    found, skipped = list_runs(tmp_path / "runs")
    assert not found and skipped[0].startswith(run_dir.name)


def test_flipped_bytes_in_cached_rows_are_left_out_and_recomputed(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "alexnet", RANDOM, "fp32", layer="gap")
    with CacheWriter(path, _key(), _cache_attrs()) as w:
        _append(w, *_rows(0, 6))
    with h5py.File(path, "r+") as f:  # a row changed on disk, behind featsvm's back
        row = f["features"][2]
        row[7] += 1.0
        f["features"][2] = row
    c = read_cache(path)
    assert len(c) == 5 and f"{2:064x}" not in c.sha256 and c.attrs["damaged_rows"] == 1
    with CacheWriter(path, _key(), _cache_attrs()) as w:
        assert [d[1] for d in w.dropped] == ["Original/Benign/ä-2.jpg"]
        assert "CRC" in w.dropped[0][2] and not w.has(f"{2:064x}")


def test_a_damaged_cache_file_is_a_one_line_cache_error(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "alexnet", RANDOM, "fp32", layer="gap")
    with CacheWriter(path, _key(), _cache_attrs()) as w:
        _append(w, *_rows(0, 6))
    data = bytearray(path.read_bytes())
    data[:512] = b"\xff" * 512
    path.write_bytes(bytes(data))
    for action in (lambda: read_cache(path), lambda: CacheWriter(path, _key(), _cache_attrs())):
        with pytest.raises(CacheError, match="delete it") as err:
            action()
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- fine-tuning checkpoints


@pytest.fixture(scope="module")
def ft_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from featsvm.data.dataset import scan
    from featsvm.data.manifest import ManifestRow, write_manifest

    root = tmp_path_factory.mktemp("ft-faults")
    data = make_dataset(root / "data", per_class=6, size=32, seed=5)
    rows = []
    for i, rec in enumerate(scan(data).records):
        j = i % 6
        split = "train" if j < 4 else ("val" if j < 5 else "test")
        rows.append(ManifestRow(rec.relpath, rec.sha256, rec.label, i, split))
    write_manifest(root / "split.csv", rows)
    return data, root / "split.csv"


def _ft(ft_split, runs_dir: Path, **kw):
    from featsvm.models import finetune as ft

    cfg = ft.FinetuneConfig(epochs=3, batch_size=8, basic_cnn_size=32, basic_cnn_channels=(4, 8),
                            basic_cnn_dense=8, n_boot=10, channels_last=False, workers=1,
                            device="cpu", patience=0)
    data, split = ft_split
    kw.setdefault("resume", True)
    return ft.finetune(data, split, cfg, runs_dir=runs_dir, progress=False, **kw)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 torn zip"])
def test_an_empty_or_broken_last_checkpoint_is_refused_not_resumed_forever(
        ft_split, tmp_path: Path, content: bytes, caplog) -> None:
    from featsvm.errors import FinetuneError
    from featsvm.models import finetune as ft

    part = _ft(ft_split, tmp_path / "runs", max_epochs_this_call=1)
    (part.run_dir / ft.LAST_CHECKPOINT).write_bytes(content)
    with pytest.raises(FinetuneError, match=r"checkpoint-last\.pt.*damaged") as err:
        _ft(ft_split, tmp_path / "runs", resume=part.run_dir)
    assert str(part.run_dir) in str(err.value) and "\n" not in str(err.value)
    caplog.clear()
    fresh = _ft(ft_split, tmp_path / "runs")  # automatic resume skips it, and says so
    assert fresh.finished and fresh.run_dir != part.run_dir
    assert any("damaged" in m and part.run_dir.name in m for m in caplog.messages)


def test_a_kill_between_the_two_checkpoint_writes_keeps_best_weights_consistent(
        ft_split, tmp_path: Path, monkeypatch) -> None:
    """Scores go 0.5, 0.6 (killed between its two checkpoint writes), then the redone epoch 2
    scores 0.4 (as on a GPU, where a redone epoch differs) and epoch 3 0.45. The final model
    must be the weights of the recorded best epoch, whatever the kill left behind."""
    from featsvm.models import finetune as ft

    scores = iter([0.5, 0.6, 0.4, 0.45])
    monkeypatch.setattr(ft, "_val_scores", lambda p, t: dict.fromkeys(
        ("loss", "accuracy", "macro_f1", "balanced_accuracy"), next(scores)))
    states: dict[int, dict] = {}  # weights after each epoch, as checkpointed
    real_save = ft._save_torch
    calls = {"n": 0}

    class Killed(BaseException):
        pass

    def save(obj, path):
        if path.name in (ft.LAST_CHECKPOINT, ft.BEST_CHECKPOINT):
            calls["n"] += 1
            if calls["n"] == 4:  # epoch 2's second checkpoint write: kill -9 here
                raise Killed
        if path.name == ft.LAST_CHECKPOINT:
            states[obj["epoch"]] = {k: v.clone() for k, v in obj["model"].items()}
        real_save(obj, path)

    monkeypatch.setattr(ft, "_save_torch", save)
    with pytest.raises(Killed):
        _ft(ft_split, tmp_path / "runs")
    done = _ft(ft_split, tmp_path / "runs")
    assert done.finished and done.resumed_from_epoch >= 1
    best = done.record.config["best_epoch"]
    final = torch.load(done.run_dir / ft.MODEL_FILE, weights_only=True)["state_dict"]
    assert all(torch.equal(final[k], states[best][k]) for k in final)


def test_temp_files_of_killed_saves_are_cleaned_on_resume(ft_split, tmp_path: Path,
                                                         caplog) -> None:
    from featsvm.models import finetune as ft

    part = _ft(ft_split, tmp_path / "runs", max_epochs_this_call=1)
    stale = part.run_dir / f".{ft.LAST_CHECKPOINT}.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 4096)
    caplog.clear()
    done = _ft(ft_split, tmp_path / "runs")
    assert done.run_dir == part.run_dir and not stale.exists()
    assert any(stale.name in m for m in caplog.messages)


def test_a_run_killed_before_its_first_checkpoint_is_started_again_in_its_folder(
        ft_split, tmp_path: Path) -> None:
    """benchmarks/faults.py found an abandoned folder (fingerprint only) next to the finished
    run after 10 kills: a kill before the first checkpoint made the next start open a new one."""
    from featsvm.models import finetune as ft

    part = _ft(ft_split, tmp_path / "runs", max_epochs_this_call=1)
    for f in part.run_dir.iterdir():  # as if killed before the first epoch ended
        if f.name != ft.FINGERPRINT_FILE:
            f.unlink()
    done = _ft(ft_split, tmp_path / "runs")
    assert done.finished and done.run_dir == part.run_dir
    assert [d for d in (tmp_path / "runs").iterdir() if d.is_dir()] == [part.run_dir]


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_temp_file(
        ft_split, small_tmpfs: Path) -> None:
    from featsvm.errors import FinetuneError

    runs_dir = small_tmpfs / "runs"
    filler = small_tmpfs / "filler"  # leave room for the small files, not for a checkpoint
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_tmpfs).free - 24_000))
    with pytest.raises(FinetuneError, match="disk full") as err:
        _ft(ft_split, runs_dir)
    msg = str(err.value)
    assert "\n" not in msg and "free at least" in msg and str(runs_dir) in msg
    assert not list(runs_dir.glob("*/.*.tmp"))
    filler.unlink()
    done = _ft(ft_split, runs_dir)  # space freed: the same call finishes
    assert done.finished


# ---------------------------------------------------------------- two `featsvm run` at once


def test_a_second_featsvm_run_on_the_same_runs_folder_is_refused(tmp_path: Path) -> None:
    from test_errors import _one_line_failure

    from featsvm import study as st
    from featsvm.fileio import FileLock

    data = make_dataset(tmp_path / "data", per_class=2, size=32)
    cfg = tmp_path / "study.toml"
    cfg.write_text(f'[study]\ndata = "{data}"\nruns = "{tmp_path / "runs"}"\n'
                   f'split = "{tmp_path / "split.csv"}"\n', encoding="utf-8")
    (tmp_path / "runs").mkdir()
    held = FileLock(tmp_path / "runs" / st.STUDY_LOCK, True, lambda p, e: RuntimeError(str(p)))
    with held:  # another `featsvm run` is working on this runs folder
        msg = _one_line_failure(["run", str(cfg)])
    assert "another featsvm run" in msg and str(tmp_path / "runs") in msg
    assert not (tmp_path / "split.csv").exists()  # refused before any step
