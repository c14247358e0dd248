"""Fault injection: what survives kill -9, a full disk, concurrent runs and tampering (issue 16).

A script, not a test, on tiny synthetic images with random weights (`--weights none`), so it
needs no data and no weights files. The kill cycles run the library call behind the command
(`featsvm.features.extract.extract`, `featsvm.models.finetune.finetune`, exactly what the
CLI calls) in a process forked from this one after the imports, so that each of the many
restarts does not pay the import of torch again (tens of seconds on a loaded 2-core machine);
the other scenarios run the command line itself (click's `featsvm` main) in forked processes
with their own stdout/stderr.
Scenarios:

* **extract kill cycles**: `featsvm extract` (AlexNet, random weights, GAP, batch 1) is started
  again and again and SIGKILLed at a random moment: most kills while a batch is appended
  (once this start has committed a row: within 30 ms of the next write to the file, i.e.
  inside the write / flush / read-back / commit sequence), the rest at a uniformly random
  time since start-up. After every kill the cache must open, hold no duplicate and only rows
  equal to an uninterrupted reference extraction; the next start must not crash. Finally the
  cache is completed and compared row by row with the reference;
* **finetune kill cycles**: `featsvm finetune` (basic-cnn, tiny) SIGKILLed at random moments
  of training and resumed by running the same command; the finished run must give the same
  metrics and weights as an uninterrupted run;
* **full disk during extract / during a checkpoint**: a small tmpfs (mounted here; skipped
  when mounting is not allowed) is filled by another file while the command writes. The command
  must stop with a one-line error naming the path and the space needed, commit no wrong row
  and leave no temp file; after freeing space the same command must finish with the reference
  result;
* **two `featsvm run` at once** on one study folder: one must be refused with a clear message
  (or wait); no duplicate run folders;
* **corrupt HDF5 cache** (damaged header; flipped bytes in the feature rows);
* **tampered model** (a swapped model.skops with a matching sidecar; an old pickle).

Prints what survived and writes benchmarks/results/faults.json.

Usage: nice -n 10 python benchmarks/faults.py [--extract-kills 50] [--finetune-kills 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "faults.json"
CLASS_FOLDERS = ("Benign", "Early", "Pre", "Pro")
EXTRACT_ARGS = ("--backbone", "alexnet", "--weights", "none", "--layer", "gap", "--device",
                "cpu", "--batch-size", "1", "--workers", "0", "--quiet")
FINETUNE_TOML = """[finetune]
model = "basic-cnn"
epochs = {epochs}
batch_size = 16
basic_cnn_size = 32
basic_cnn_channels = [8, 16]
basic_cnn_dense = 32
lr = 3e-3
warmup_epochs = 0.5
n_boot = 20
channels_last = false
workers = 1
device = "cpu"
threads = 1
patience = 0
"""


def log(msg: str) -> None:
    print(msg, flush=True)


def featsvm(*args: Any) -> list[str]:
    """The arguments of one `featsvm ...` command line (run by `run` / `start`)."""
    return [str(a) for a in args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def _cli(args: list[str], out_fd: int, err_fd: int) -> None:
    """In a forked child: the featsvm command line (click's main, as `python -m featsvm`
    runs it) with stdout/stderr sent to the given files; exits with the command's status."""
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    code = 0
    try:
        from featsvm.cli import main as cli_main

        cli_main(args=args, prog_name="featsvm")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - an uncaught error: traceback and status 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class CliChild:
    """`featsvm ARGS` in a process forked from this one (imports already done)."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        fo, self.out_path = tempfile.mkstemp(suffix=".out")
        fe, self.err_path = tempfile.mkstemp(suffix=".err")
        self.pid = os.fork()
        if self.pid == 0:
            _cli(args, fo, fe)
        os.close(fo)
        os.close(fe)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        t0 = time.monotonic()
        while self.poll() is None:
            if timeout is not None and time.monotonic() - t0 > timeout:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            time.sleep(0.01)
        out = Path(self.out_path).read_text(errors="replace")
        err = Path(self.err_path).read_text(errors="replace")
        os.unlink(self.out_path)
        os.unlink(self.err_path)
        return out, err


def start(cmd: list[str]) -> CliChild:
    return CliChild(cmd)


def run(cmd: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    child = CliChild(cmd)
    out, err = child.communicate(timeout)
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)


def error_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error:")]
    return lines[-1] if lines else ""


def one_line_error(res: subprocess.CompletedProcess) -> bool:
    """Exit 1 with exactly one 'Error: ...' line and no traceback."""
    out = res.stdout + res.stderr
    return res.returncode == 1 and len([ln for ln in out.splitlines()
                                        if ln.startswith("Error:")]) == 1 \
        and "Traceback" not in out


def make_data(root: Path, per_class: int, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    tints = np.array([[150, 60, 160], [90, 40, 170], [170, 50, 90], [60, 110, 160]])
    for k, folder in enumerate(CLASS_FOLDERS):
        d = root / "Original" / folder
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            img = np.full((size, size, 3), 200.0) + rng.normal(0, 12, (size, size, 3))
            for _ in range(int(rng.integers(2, 5))):
                cy, cx = rng.uniform(0, size, 2)
                r = rng.uniform(size / 10, size / 4)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = tints[k] + rng.normal(0, 15, 3)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                d / f"{folder}-{j:04d}.png")
    return root


def cache_file(cache: Path) -> Path | None:
    found = sorted(cache.glob("*.h5"))
    return found[0] if found else None


def read_rows(cache: Path) -> dict[str, np.ndarray]:
    from featsvm.features.cache import read_cache

    path = cache_file(cache)
    if path is None:
        return {}
    c = read_cache(path)
    if len(set(c.sha256)) != len(c.sha256):
        raise AssertionError(f"{path}: duplicate rows")
    return {s: c.features[i] for i, s in enumerate(c.sha256)}


def compare_rows(rows: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> tuple[int, float]:
    """(rows that differ from the reference, largest absolute difference)."""
    wrong, worst = 0, 0.0
    for s, v in rows.items():
        if s not in ref:
            wrong += 1
            continue
        d = float(np.max(np.abs(v - ref[s])))
        worst = max(worst, d)
        wrong += d > 0
    return wrong, worst


def kill_after(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL `proc` after `delay` s; False when it ended by itself first."""
    try:
        proc.wait(delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


class Child:
    """A process forked from this one running `fn(*args)`: exit 0 when it returns, 1 (with
    the error in `error()`) when it raises, -9 when killed."""

    def __init__(self, fn: Any, *args: Any) -> None:
        fd, self.err_path = tempfile.mkstemp(prefix="featsvm-faults-", suffix=".err")
        self.pid = os.fork()
        if self.pid == 0:  # the child
            code = 0
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - report any failure, then exit 1
                import traceback

                os.write(fd, (f"{type(exc).__name__}: {exc}\n"
                              + traceback.format_exc()).encode())
                code = 1
            finally:
                os._exit(code)
        os.close(fd)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        t0 = time.monotonic()
        while self.poll() is None:
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise subprocess.TimeoutExpired("child", timeout)
            time.sleep(0.005)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def error(self) -> str:
        text = Path(self.err_path).read_text(errors="replace")
        os.unlink(self.err_path)
        return text


def committed_rows(cache: Path) -> int:
    """n_rows of the cache file, peeked without its lock (read-only; -1 if unreadable now)."""
    import h5py

    path = cache_file(cache)
    if path is None:
        return 0
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs.get("n_rows", 0))
    except Exception:  # noqa: BLE001 - mid-write: try again
        return -1


def wait_for_commit(cache: Path, proc: Any, timeout: float) -> bool:
    """Wait until this run committed at least one row (appends are under way)."""
    t0 = time.monotonic()
    start = None
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        n = committed_rows(cache)
        if n >= 0:
            if start is None:
                start = n
            elif n > start:
                return True
        time.sleep(0.01)
    return False


def wait_for_growth(path_of: Any, proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until the file `path_of()` exists and is written to (size or mtime change)."""
    t0 = time.monotonic()
    start = None
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        p = path_of()
        if p is not None and p.exists():
            st = p.stat()
            now = (st.st_size, st.st_mtime_ns)  # every append writes: mtime moves
            if start is None:
                start = now
            elif now != start:
                return True
        time.sleep(0.002)
    return False


# ------------------------------------------------------------------ scenarios


def extract_kills(work: Path, data: Path, ref: dict[str, np.ndarray], n_kills: int,
                  rng: random.Random, startup: float) -> dict[str, Any]:
    cache = work / "cache-kill"
    cmd = featsvm("extract", data, *EXTRACT_ARGS, "--cache", cache)
    kills = crashes = lost = wrong = starts = 0
    from featsvm.features.extract import extract

    def job() -> None:
        extract(data, "alexnet", weights="none", cache_dir=cache, device="cpu", batch_size=1,
                workers=0, layer="gap", progress=False)

    during_writes = 0
    worst = 0.0
    prev = 0
    messages: list[str] = []
    t0 = time.perf_counter()
    while kills < n_kills:
        starts += 1
        proc = Child(job)
        if rng.random() < 0.8:  # while a batch is being appended: within 30 ms of a write
            if wait_for_commit(cache, proc, 600) and \
                    wait_for_growth(lambda: cache_file(cache), proc, 600):
                during_writes += 1
            killed = kill_after(proc, rng.uniform(0.0, 0.03))
        else:  # anywhere, start-up included
            killed = kill_after(proc, rng.uniform(0.0, startup + 0.25))
        err = proc.error()
        if killed:
            kills += 1
        elif proc.returncode != 0:
            crashes += 1
            messages.append(err.splitlines()[0] if err.strip() else str(proc.returncode))
        rows = read_rows(cache)
        lost += max(0, prev - len(rows))
        w, d = compare_rows(rows, ref)
        wrong += w
        worst = max(worst, d)
        prev = len(rows)
        if not killed and proc.returncode == 0 and len(rows) == len(ref):
            break  # finished before the planned kills
    final = run(cmd)
    rows = read_rows(cache)
    w, d = compare_rows(rows, ref)
    return {
        "kills": kills, "kills_while_writing": during_writes, "starts": starts,
        "crashes_on_resume": crashes, "crash_messages": messages[:5],
        "rows_lost": lost, "wrong_rows_seen_after_kills": wrong,
        "final_exit": final.returncode, "final_rows": len(rows), "reference_rows": len(ref),
        "final_wrong_rows": w, "final_max_abs_diff": d,
        "identical_to_reference": final.returncode == 0 and len(rows) == len(ref) and w == 0,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _finetune_cmd(data: Path, split: Path, cfg: Path, runs: Path) -> list[str]:
    return featsvm("finetune", data, "--split", split, "--config", cfg, "--runs", runs,
                   "--quiet")


def _complete_runs(runs: Path) -> list[Path]:
    from featsvm.runs import is_complete

    return sorted(d for d in runs.glob("*") if d.is_dir() and is_complete(d)) \
        if runs.is_dir() else []


def _run_result(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    metrics = json.loads((run_dir / "metrics.json").read_text())
    state = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    return metrics, state


def _same_result(a: Path, b: Path) -> bool:
    import torch

    ma, sa = _run_result(a)
    mb, sb = _run_result(b)
    return ma == mb and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def finetune_kills(work: Path, data: Path, split: Path, cfg: Path, ref_run: Path,
                   n_kills: int, rng: random.Random, startup: float, epoch_s: float
                   ) -> dict[str, Any]:
    runs = work / "runs-kill"
    cmd = _finetune_cmd(data, split, cfg, runs)
    kills = crashes = starts = 0
    from featsvm.config import load_toml
    from featsvm.models.finetune import finetune, finetune_config

    ft_cfg = finetune_config(load_toml(cfg), str(cfg)).for_model(None)

    def job() -> None:
        finetune(data, split, ft_cfg, runs_dir=runs, resume=True, progress=False)

    messages: list[str] = []
    t0 = time.perf_counter()
    while kills < n_kills and not _complete_runs(runs):
        starts += 1
        proc = Child(job)
        killed = kill_after(proc, startup * rng.uniform(0.0, 1.0)
                            + rng.uniform(0.0, 2.0 * epoch_s))
        err = proc.error()
        if killed:
            kills += 1
        elif proc.returncode != 0:
            crashes += 1
            messages.append(err.splitlines()[0] if err.strip() else str(proc.returncode))
    if not _complete_runs(runs):
        final = run(cmd)
        if final.returncode != 0:
            crashes += 1
            messages.append(error_line(final) or final.stderr[-300:])
    done = _complete_runs(runs)
    leftovers = sorted(p.name for d in runs.glob("*") for p in d.glob(".*.tmp"))
    return {
        "kills": kills, "starts": starts, "crashes_on_resume": crashes,
        "crash_messages": messages[:5], "complete_runs": len(done),
        "run_folders": len([d for d in runs.glob("*") if d.is_dir()]),
        "temp_files_left": leftovers,
        "identical_to_reference": len(done) == 1 and _same_result(done[0], ref_run),
        "seconds": round(time.perf_counter() - t0, 1),
    }


class Tmpfs:
    def __init__(self, path: Path, size: str) -> None:
        self.path, self.size, self.ok = path, size, False

    def __enter__(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs",
                              str(self.path)], capture_output=True, text=True)
        self.ok = res.returncode == 0
        self.why = res.stderr.strip()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ok:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of `folder` with one file, leaving `leave` bytes."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free - leave
    with open(filler, "ab") as f:
        chunk = b"\0" * (1 << 16)
        try:
            while free > 0:
                n = f.write(chunk[: min(len(chunk), free)])
                free -= n
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            pass
    return filler


def full_disk_extract(work: Path, data: Path, ref: dict[str, np.ndarray]) -> dict[str, Any]:
    with Tmpfs(work / "tmpfs-extract", "8m") as fs:
        if not fs.ok:
            return {"skipped": f"cannot mount a tmpfs: {fs.why}"}
        cache = fs.path / "cache"
        cmd = featsvm("extract", data, *EXTRACT_ARGS, "--cache", cache)
        proc = start(cmd)
        growing = wait_for_growth(lambda: cache_file(cache), proc, 600)
        filler = fill(fs.path)
        out, err = proc.communicate(timeout=600)
        res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        rows = read_rows(cache)
        wrong, _ = compare_rows(rows, ref)
        filler.unlink()
        again = run(cmd)
        rows2 = read_rows(cache)
        wrong2, d2 = compare_rows(rows2, ref)
        return {
            "filled_while_writing": growing, "exit": res.returncode,
            "one_line_error": one_line_error(res), "message": error_line(res),
            "names_path_and_space": str(cache) in error_line(res)
            and "free at least" in error_line(res),
            "rows_committed_before_the_error": len(rows), "wrong_rows_committed": wrong,
            "temp_files_left": sorted(p.name for p in cache.glob(".*.tmp")),
            "after_freeing_space_exit": again.returncode,
            "after_freeing_space_identical": again.returncode == 0 and len(rows2) == len(ref)
            and wrong2 == 0 and d2 == 0.0,
        }


def full_disk_checkpoint(work: Path, data: Path, split: Path, cfg: Path,
                         ref_run: Path) -> dict[str, Any]:
    with Tmpfs(work / "tmpfs-ckpt", "16m") as fs:
        if not fs.ok:
            return {"skipped": f"cannot mount a tmpfs: {fs.why}"}
        runs = fs.path / "runs"
        cmd = _finetune_cmd(data, split, cfg, runs)
        proc = start(cmd)

        def last_ck() -> Path | None:
            found = sorted(runs.glob("*/checkpoint-last.pt"))
            return found[0] if found else None

        t0 = time.monotonic()
        while last_ck() is None and proc.poll() is None and time.monotonic() - t0 < 300:
            time.sleep(0.01)
        filler = fill(fs.path)
        out, err = proc.communicate(timeout=600)
        res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        temps = sorted(p.name for d in runs.glob("*") for p in d.glob(".*.tmp"))
        filler.unlink()
        again = run(cmd)
        done = _complete_runs(runs)
        return {
            "exit": res.returncode, "one_line_error": one_line_error(res),
            "message": error_line(res),
            "names_path_and_space": "free at least" in error_line(res)
            and str(runs) in error_line(res),
            "temp_files_left_after_the_error": temps,
            "after_freeing_space_exit": again.returncode,
            "after_freeing_space_identical": len(done) == 1 and _same_result(done[0], ref_run),
        }


def two_runs_at_once(work: Path, data: Path) -> dict[str, Any]:
    study = work / "study"
    study.mkdir(exist_ok=True)
    cfg = study / "study.toml"
    cfg.write_text(
        "[study]\n"
        f'data = "{data}"\nsplit = "{study / "split.csv"}"\ncache = "{study / "cache"}"\n'
        f'runs = "{study / "runs"}"\nreport = "{study / "report"}"\n'
        'backbones = ["alexnet"]\nlayers = { alexnet = "gap" }\nheads = ["logreg"]\n'
        'weights = { alexnet = "none" }\n'
        "finetune = false\n\n[extract]\ndevice = \"cpu\"\nworkers = 0\n\n"
        "[fit]\ncv_folds = 3\nlogreg_C = [1.0]\nn_boot = 20\nn_jobs = 1\n",
        encoding="utf-8")
    cmd = featsvm("run", cfg, "--quiet")
    procs = [start(cmd) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    results = [subprocess.CompletedProcess(cmd, p.returncode, o, e)
               for p, (o, e) in zip(procs, outs, strict=True)]
    runs = [d for d in (study / "runs").glob("*") if d.is_dir()]
    return {
        "exits": [r.returncode for r in results],
        "messages": [error_line(r) for r in results],
        "run_folders": len(runs), "expected_run_folders": 1,
        "no_duplicates": len(runs) == 1,
        "one_refused_clearly": sorted(r.returncode for r in results) == [0, 1]
        and any("another" in error_line(r) for r in results),
    }


def corrupt_cache(work: Path, ref_cache: Path, split: Path, data: Path,
                  ref: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    src = cache_file(ref_cache)
    assert src is not None
    for how in ("header", "feature_rows"):
        cache = work / f"cache-corrupt-{how}"
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir()
        dst = cache / src.name
        shutil.copy(src, dst)
        if how == "header":
            offset = 0
        else:  # the first feature row, found through HDF5's own chunk index
            import h5py

            with h5py.File(dst, "r") as f:
                offset = f["features"].id.get_chunk_info(0).byte_offset + 16
        with open(dst, "r+b") as f:
            f.seek(offset)
            old = f.read(512 if how == "header" else 8)
            f.seek(offset)
            f.write(bytes(b ^ 0xFF for b in old))
        fit = featsvm("fit", "--backbone", "alexnet", "--head", "logreg", "--weights", "none",
                      "--layer", "gap", "--cache", cache, "--split", split,
                      "--runs", work / f"runs-corrupt-{how}", "--quiet")
        res = run(fit)
        out[how] = {"exit": res.returncode, "one_line_error": one_line_error(res),
                    "message": error_line(res)[:300], "warning": "CRC" in res.stderr,
                    "detected": res.returncode != 0 or "CRC" in res.stderr}
        if how == "feature_rows":  # the advice works: extract recomputes the row, fit runs
            again = run(featsvm("extract", data, *EXTRACT_ARGS, "--cache", cache))
            fit2 = run(fit)
            rows = read_rows(cache)
            wrong, _ = compare_rows(rows, ref)
            out[how].update({"extract_then_fit_exit": [again.returncode, fit2.returncode],
                             "repaired_identical": len(rows) == len(ref) and wrong == 0})
    return out


def tampered_model(work: Path, ref_cache: Path, split: Path, data: Path) -> dict[str, Any]:
    runs = work / "runs-tamper"
    fit = featsvm("fit", "--backbone", "alexnet", "--head", "logreg", "--weights", "none",
                  "--layer", "gap", "--cache", ref_cache, "--split", split, "--runs", runs,
                  "--quiet")
    a, b = run(fit), run(fit)
    if a.returncode or b.returncode:
        return {"error": (a.stderr or b.stderr)[-500:]}
    r1, r2 = sorted(d for d in runs.glob("*") if d.is_dir())[:2]
    img = next((data / "Original" / "Pro").iterdir())
    ok = run(featsvm("predict", "--run", r1, img, "--quiet"))
    # swap in another run's model and its sidecar: only config.json still knows
    shutil.copy(r2 / "model.skops", r1 / "model.skops")
    shutil.copy(r2 / "model.skops.sha256", r1 / "model.skops.sha256")
    swapped = run(featsvm("predict", "--run", r1, img, "--quiet"))
    # an old-style pickle that would run code on load
    evil = runs / "evil"
    shutil.copytree(r2, evil)
    marker = work / "pwned"
    import joblib

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    (evil / "model.skops").unlink()
    (evil / "model.skops.sha256").unlink()
    joblib.dump(Evil(), evil / "model.joblib")
    from featsvm.runs import write_sidecar

    sha = write_sidecar(evil / "model.joblib")
    cfg = json.loads((evil / "config.json").read_text())
    cfg.update({"model_file": "model.joblib", "model_sha256": sha,
                "artefacts": {**cfg["artefacts"], "model.joblib": sha}})
    cfg["artefacts"].pop("model.skops", None)
    (evil / "config.json").write_text(json.dumps(cfg))
    pickled = run(featsvm("predict", "--run", evil, img, "--quiet"))
    return {
        "untouched_run_predicts": ok.returncode == 0,
        "swapped_model_refused": swapped.returncode == 1 and one_line_error(swapped),
        "swapped_message": error_line(swapped)[:300],
        "pickle_refused_without_trust_pickle": pickled.returncode == 1
        and "--trust-pickle" in error_line(pickled),
        "pickle_code_ran": marker.exists(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extract-kills", type=int, default=50)
    ap.add_argument("--finetune-kills", type=int, default=10)
    ap.add_argument("--images-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--only", default="", help="comma-separated scenarios to run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: frugal, and fork-safe
    sys.path.insert(0, str(REPO))
    rng = random.Random(args.seed)
    only = set(filter(None, args.only.split(",")))
    work = args.work or Path(tempfile.mkdtemp(prefix="featsvm-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    data = work / "data"
    if not data.is_dir():
        make_data(data, args.images_per_class)
    split = work / "split.csv"
    if not split.is_file():
        res = run(featsvm("split", data, "--out", split))
        assert res.returncode == 0, res.stderr
    cfg = work / "finetune.toml"
    cfg.write_text(FINETUNE_TOML.format(epochs=args.epochs))

    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_at_start": os.getloadavg()[0]},
        "settings": vars(args) | {"work": str(work), "out": str(args.out),
                                  "images": 4 * args.images_per_class},
    }

    def want(name: str) -> bool:
        return not only or name in only

    import importlib

    for mod in ("featsvm.cli", "featsvm.features.extract", "featsvm.models.finetune",
                "featsvm.features.cache", "skops.io", "h5py"):
        importlib.import_module(mod)  # imported once here, shared by the forked children

    def extract_into(cache: Path) -> None:
        from featsvm.features.extract import extract

        extract(data, "alexnet", weights="none", cache_dir=cache, device="cpu", batch_size=1,
                workers=0, layer="gap", progress=False)

    t = time.perf_counter()
    ref_cache = work / "cache-ref"
    shutil.rmtree(work / "cache-kill", ignore_errors=True)
    child = Child(extract_into, ref_cache)  # (a complete one from an earlier run is kept)
    assert child.wait() == 0, child.error()
    child.error()
    ref_seconds = time.perf_counter() - t
    ref = read_rows(ref_cache)
    t = time.perf_counter()
    child = Child(extract_into, ref_cache)  # nothing left to do: start-up and scan only
    child.wait()
    child.error()
    startup = time.perf_counter() - t
    log(f"reference extract: {len(ref)} rows in {ref_seconds:.1f} s (start-up and scan "
        f"{startup:.1f} s)")
    results["reference"] = {"extract_seconds": round(ref_seconds, 1),
                            "extract_startup_seconds": round(startup, 1)}

    if want("extract_kills"):
        r = extract_kills(work, data, ref, args.extract_kills, rng, startup)
        results["extract_kills"] = r
        log(f"extract: {r['kills']} kills ({r['kills_while_writing']} while writing), "
            f"{r['crashes_on_resume']} crashes on resume, {r['rows_lost']} rows lost, "
            f"{r['wrong_rows_seen_after_kills']} wrong rows; final identical: "
            f"{r['identical_to_reference']}")
    if want("finetune_kills") or want("full_disk_checkpoint"):
        from featsvm.config import load_toml
        from featsvm.models.finetune import finetune, finetune_config

        ft_cfg = finetune_config(load_toml(cfg), str(cfg)).for_model(None)
        t = time.perf_counter()
        ref_child = Child(lambda: finetune(data, split, ft_cfg, runs_dir=work / "runs-ref",
                                           resume=False, progress=False))
        assert ref_child.wait() == 0, ref_child.error()
        ref_child.error()
        ft_seconds = time.perf_counter() - t
        (ref_run,) = _complete_runs(work / "runs-ref")
        hist = (ref_run / "history.csv").read_text().splitlines()[1:]
        epoch_s = float(np.mean([float(h.split(",")[-2]) for h in hist])) if hist else 1.0
        startup = max(0.5, ft_seconds - epoch_s * len(hist))
        results["reference"].update({"finetune_seconds": round(ft_seconds, 1),
                                     "finetune_epoch_seconds": round(epoch_s, 2)})
        log(f"reference finetune: {ft_seconds:.1f} s ({len(hist)} epochs of {epoch_s:.2f} s)")
        if want("finetune_kills"):
            r = finetune_kills(work, data, split, cfg, ref_run, args.finetune_kills, rng,
                               startup, epoch_s)
            results["finetune_kills"] = r
            log(f"finetune: {r['kills']} kills, {r['crashes_on_resume']} crashes on resume, "
                f"{r['run_folders']} run folder(s); final identical: "
                f"{r['identical_to_reference']}")
        if want("full_disk_checkpoint"):
            r = full_disk_checkpoint(work, data, split, cfg, ref_run)
            results["full_disk_checkpoint"] = r
            log(f"full disk during a checkpoint: {json.dumps(r)}")
    if want("full_disk_extract"):
        r = full_disk_extract(work, data, ref)
        results["full_disk_extract"] = r
        log(f"full disk during extract: {json.dumps(r)}")
    if want("two_runs"):
        r = two_runs_at_once(work, data)
        results["two_runs_at_once"] = r
        log(f"two featsvm run at once: {json.dumps(r)}")
    if want("corrupt_cache"):
        r = corrupt_cache(work, ref_cache, split, data, ref)
        results["corrupt_cache"] = r
        log(f"corrupt cache: {json.dumps(r)}")
    if want("tampered_model"):
        r = tampered_model(work, ref_cache, split, data)
        results["tampered_model"] = r
        log(f"tampered model: {json.dumps(r)}")
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    log(f"wrote {args.out} ({results['seconds']:.0f} s)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
