"""Scale-out on Ray (`featsvm extract --engine ray`) against the single-process path.

(a) identical: a 256-image subset of the real data (every k-th file of all-taleqani, copied to
    a scratch folder; or synthetic images when the data is absent) through AlexNet (--weights-dir,
    else random weights) in one process and on 2 local Ray workers: same cache file name, same
    rows in the same order, bit-identical fp32 features.
(b) overhead: the same two runs, timed (alternating, --reps times). Three figures each:
    end to end (a Ray run starts its local cluster and its actors), the compute phase that
    `ExtractSummary.compute_seconds` reports, and the steady rate between the first and the last
    committed batch (timestamps of every cache append, the same hook for both paths).
(c) streaming: --synthetic small generated images (default 20,000) through Ray in a child
    process that only does that; its peak resident memory (getrusage ru_maxrss) and a VmRSS
    sample every 2 s show whether embeddings are streamed to the cache or gathered.

The machine is shared: the 1-minute load average is recorded next to every timing.
Writes benchmarks/results/scale_out.{json,md}.

    nice -n 10 python benchmarks/scale_out.py --weights-dir ../shared/weights \
        [--data ../shared/data/all-taleqani] [--subset 256] [--reps 2] [--synthetic 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "all-taleqani"
CLASS_FOLDERS = ("Benign", "Early", "Pre", "Pro")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synthetic(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """`n` distinct small JPEGs in class folders (kept between runs when complete)."""
    from PIL import Image

    done = root / f".complete-{n}-{size}"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    tints = np.array([[150, 60, 160], [90, 40, 170], [170, 50, 90], [60, 110, 160]])
    for c in CLASS_FOLDERS:
        (root / "Original" / c).mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        k = i % 4
        img = np.full((size, size, 3), 200.0) + rng.normal(0, 12, (size, size, 3))
        cy, cx = rng.uniform(0, size, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size / 4) ** 2] = tints[k]
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            root / "Original" / CLASS_FOLDERS[k] / f"s{i:06d}.jpg", quality=90)
    done.write_text("")
    return root


def subset_of(data: Path, n: int, work: Path) -> Path:
    """Every k-th image of `data` (sorted), `n` in all, copied to a scratch folder in the same
    layout (deleted at the end; never committed)."""
    files = sorted(p for p in (data / "Original").rglob("*") if p.is_file()
                   and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(files) // n)
    root = work / "subset"
    shutil.rmtree(root, ignore_errors=True)
    for p in files[::step][:n]:
        dest = root / p.relative_to(data)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
    return root


class Appends:
    """Timestamps of every cache append (both paths write through CacheWriter.append)."""

    def __init__(self) -> None:
        from featsvm.features import cache

        self.times: list[tuple[float, int]] = []
        self._real = cache.CacheWriter.append

        def append(writer, features, *args, **kwargs):
            out = self._real(writer, features, *args, **kwargs)
            self.times.append((time.perf_counter(), len(features)))
            return out

        cache.CacheWriter.append = append  # type: ignore[method-assign]

    def steady_rate(self) -> float | None:
        """Images per second between the first and the last committed batch."""
        if len(self.times) < 2:
            return None
        rows = sum(n for _, n in self.times[1:])
        return rows / (self.times[-1][0] - self.times[0][0])


def run_pair(root: Path, weights_dir: str | None, work: Path, rep: int, workers: int,
             appends: Appends) -> dict[str, Any]:
    from featsvm.data.dataset import scan
    from featsvm.features.extract import extract
    from featsvm.features.ray_extract import RaySource, extract_ray

    records = scan(root).records
    weights = None if weights_dir else "none"
    out: dict[str, Any] = {}
    for path in ("single", "ray"):
        cache = work / f"cache-{path}-{rep}"
        shutil.rmtree(cache, ignore_errors=True)
        appends.times.clear()
        before = load()
        t = time.perf_counter()
        if path == "single":
            s = extract(root, "alexnet", weights=weights, weights_dir=weights_dir,
                        cache_dir=cache, device="cpu", progress=False, records=records)
            ready = 0.0
        else:
            source = RaySource("alexnet", weights, weights_dir, None, workers=workers)
            s = extract_ray(root, "alexnet", weights=weights, weights_dir=weights_dir,
                            cache_dir=cache, progress=False, records=records, source=source)
            ready = source.ready_seconds
        total = time.perf_counter() - t
        out[path] = {
            "cache": s.cache_path.name, "n_new": s.n_new, "device": s.device,
            "total_seconds": round(total, 3), "compute_seconds": round(s.compute_seconds, 3),
            "workers_ready_seconds": round(ready, 3),
            "steady_images_per_s": round(appends.steady_rate() or float("nan"), 2),
            "load_before": before, "load_after": load(),
        }
        out[path + "_path"] = s.cache_path
        print(f"  rep {rep} {path:6s}: {total:6.1f} s end to end, compute "
              f"{s.compute_seconds:6.1f} s (workers ready after {ready:.1f} s), steady "
              f"{out[path]['steady_images_per_s']:6.1f} img/s; load {before} -> {load()}",
              flush=True)
    return out


def identical(a: Path, b: Path) -> dict[str, Any]:
    from featsvm.features.cache import read_cache

    ca, cb = read_cache(a), read_cache(b)
    return {
        "same_file_name": a.name == b.name,
        "same_fingerprint": ca.attrs["fingerprint"] == cb.attrs["fingerprint"],
        "same_rows_in_order": list(ca.sha256) == list(cb.sha256),
        "rows": len(ca),
        "bit_identical_fp32": bool(ca.features.dtype == cb.features.dtype == np.float32
                                   and np.array_equal(ca.features, cb.features)),
        "max_abs_diff": float(np.abs(ca.features - cb.features).max()) if len(ca) == len(cb)
        else None,
    }


def streaming_child(args: argparse.Namespace) -> int:
    """Part (c) alone in this process: scan + Ray extraction; print one JSON line."""
    from featsvm.data.dataset import scan
    from featsvm.features.ray_extract import RaySource, extract_ray

    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not stop.wait(2.0):
            samples.append((round(time.perf_counter() - t0, 1), round(rss_mb(), 1)))

    threading.Thread(target=sample, daemon=True).start()
    root = Path(args.synthetic_root)
    weights = None if args.weights_dir else "none"
    before = load()
    t = time.perf_counter()
    records = scan(root).records
    scan_s = time.perf_counter() - t
    rss_after_scan = rss_mb()
    source = RaySource("alexnet", weights, args.weights_dir, None, workers=args.workers)
    t = time.perf_counter()
    s = extract_ray(root, "alexnet", weights=weights, weights_dir=args.weights_dir,
                    cache_dir=args.cache, progress=False, records=records, source=source)
    total = time.perf_counter() - t
    stop.set()
    print("RESULT " + json.dumps({
        "images": len(records), "n_new": s.n_new, "n_cached": s.n_cached,
        "skipped": len(s.skipped), "scan_seconds": round(scan_s, 1),
        "extract_seconds": round(total, 1), "workers_ready_seconds": round(source.ready_seconds, 1),
        "images_per_s": round(s.n_new / max(total - source.ready_seconds, 1e-9), 1),
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
        "driver_rss_after_scan_mb": round(rss_after_scan, 1),
        "driver_rss_samples_mb": samples[:: max(1, len(samples) // 40)],
        "load_before": before, "load_after": load(), "cache": str(s.cache_path),
    }), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--weights-dir", default=os.environ.get("FEATSVM_WEIGHTS_DIR"))
    ap.add_argument("--subset", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--synthetic", type=int, default=20000, help="0 = skip part (c)")
    ap.add_argument("--synthetic-size", type=int, default=48, help="pixels per side")
    ap.add_argument("--work", default="/tmp/featsvm-scale-out")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--skip-pairs", action="store_true", help="only part (c)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--synthetic-root", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return streaming_child(args)

    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "ray": __import__("ray").__version__,
                    "uptime": subprocess.run(["uptime"], capture_output=True,
                                             text=True).stdout.strip()},
        "backbone": "alexnet (gap, 256-d), fp32, CPU, default batch (32)",
        "weights": "from --weights-dir" if args.weights_dir else "random (no --weights-dir)",
        "command": "nice -n 10 python benchmarks/scale_out.py " + " ".join(sys.argv[1:]),
    }
    if not args.skip_pairs:
        data = Path(args.data)
        if (data / "Original").is_dir():
            root, kind = subset_of(data, args.subset, work), f"every k-th image of {data.name}"
        else:
            root = synthetic(work / "subset-synthetic", args.subset, 224)
            kind = "synthetic 224 px"
        print(f"(a, b) {args.subset} images ({kind}); single process vs {args.workers} Ray "
              "workers", flush=True)
        appends = Appends()
        pairs = [run_pair(root, args.weights_dir, work, rep, args.workers, appends)
                 for rep in range(args.reps)]
        result["identical"] = {"images": kind, **identical(pairs[0]["single_path"],
                                                           pairs[0]["ray_path"])}
        runs = [{k: v for k, v in p.items() if not k.endswith("_path")} for p in pairs]
        result["overhead"] = {"runs": runs, **summarise(runs, args.workers)}
        if (data / "Original").is_dir():
            shutil.rmtree(root, ignore_errors=True)  # the copy of real images
    if args.synthetic:
        root = synthetic(work / "synthetic", args.synthetic, args.synthetic_size)
        cache = work / "cache-synthetic"
        shutil.rmtree(cache, ignore_errors=True)
        print(f"(c) {args.synthetic} synthetic {args.synthetic_size} px images through "
              f"{args.workers} Ray workers (child process)", flush=True)
        cmd = [sys.executable, __file__, "--child", "--synthetic-root", str(root), "--cache",
               str(cache), "--workers", str(args.workers)]
        if args.weights_dir:
            cmd += ["--weights-dir", args.weights_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        result["streaming"] = json.loads(line[-1][len("RESULT "):])
        st = result["streaming"]
        print(f"  {st['n_new']} images in {st['extract_seconds']} s ({st['images_per_s']} "
              f"img/s after the workers were ready), driver peak RSS "
              f"{st['driver_peak_rss_mb']} MB; load {st['load_before']} -> {st['load_after']}")
        shutil.rmtree(cache, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from featsvm.fileio import write_json_atomic, write_text_atomic

    write_json_atomic(out / "scale_out.json", result)
    write_text_atomic(out / "scale_out.md", markdown(result))
    print(markdown(result))
    return 0


def summarise(runs: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    def mean(path: str, key: str) -> float:
        return float(np.mean([r[path][key] for r in runs]))

    single_total, ray_total = mean("single", "total_seconds"), mean("ray", "total_seconds")
    single_c, ray_c = mean("single", "compute_seconds"), mean("ray", "compute_seconds")
    ray_ready = mean("ray", "workers_ready_seconds")
    single_rate = mean("single", "steady_images_per_s")
    ray_rate = mean("ray", "steady_images_per_s")
    return {
        "workers": workers,
        "end_to_end_overhead": round(ray_total / single_total - 1, 3),
        "compute_overhead": round(ray_c / single_c - 1, 3),
        "compute_after_workers_ready_overhead": round((ray_c - ray_ready) / single_c - 1, 3),
        "steady_rate_overhead": round(single_rate / ray_rate - 1, 3),
        "single_steady_images_per_s": round(single_rate, 1),
        "ray_steady_images_per_s": round(ray_rate, 1),
        "ray_images_per_s_per_worker": round(ray_rate / workers, 1),
        "ray_fixed_cost_seconds": round(ray_total - (ray_c - ray_ready), 1),
        "target": "overhead <= 15 % (steady rate)",
    }


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Scale-out on Ray: `{r['command']}`", "",
             f"Machine: {r['machine']['cpus']} CPUs, {r['machine']['platform']}, torch "
             f"{r['machine']['torch']}, ray {r['machine']['ray']}. At start: "
             f"`{r['machine']['uptime']}`. {r['backbone']}; weights {r['weights']}.", ""]
    if "identical" in r:
        i = r["identical"]
        lines += [f"## (a) Same cache ({i['rows']} images: {i['images']})", "",
                  f"same file name {i['same_file_name']}, same fingerprint "
                  f"{i['same_fingerprint']}, same rows in order {i['same_rows_in_order']}, "
                  f"bit-identical fp32 features **{i['bit_identical_fp32']}** (max |diff| "
                  f"{i['max_abs_diff']}).", ""]
        o = r["overhead"]
        lines += ["## (b) Overhead, single process vs "
                  f"{o['workers']} local Ray workers", "",
                  "| rep | path | end to end s | compute s | workers ready s | steady img/s | "
                  "load before -> after |", "|---|---|---:|---:|---:|---:|---|"]
        for k, run in enumerate(o["runs"]):
            for path in ("single", "ray"):
                x = run[path]
                lines.append(f"| {k} | {path} | {x['total_seconds']} | {x['compute_seconds']} "
                             f"| {x['workers_ready_seconds']} | {x['steady_images_per_s']} | "
                             f"{x['load_before']} -> {x['load_after']} |")
        lines += ["", f"Steady-rate overhead **{100 * o['steady_rate_overhead']:.1f} %** "
                  f"(single {o['single_steady_images_per_s']} img/s, Ray "
                  f"{o['ray_steady_images_per_s']} img/s = {o['ray_images_per_s_per_worker']} "
                  f"per worker); compute phase {100 * o['compute_overhead']:.1f} % "
                  f"({100 * o['compute_after_workers_ready_overhead']:.1f} % after the workers "
                  f"were ready); end to end {100 * o['end_to_end_overhead']:.1f} % (Ray's fixed "
                  f"cost: cluster start + actors loading the model, "
                  f"{o['ray_fixed_cost_seconds']} s). Target: {o['target']}.", ""]
    if "streaming" in r:
        s = r["streaming"]
        lines += [f"## (c) {s['images']} synthetic images streamed through Ray", "",
                  f"{s['n_new']} computed ({s['skipped']} skipped) in {s['extract_seconds']} s "
                  f"({s['images_per_s']} img/s after the workers were ready, "
                  f"{s['workers_ready_seconds']} s to get them ready); scan "
                  f"{s['scan_seconds']} s. Driver peak RSS **{s['driver_peak_rss_mb']} MB** "
                  f"(after the scan {s['driver_rss_after_scan_mb']} MB; target < 2048 MB). "
                  f"Load {s['load_before']} -> {s['load_after']}.", "",
                  "Driver RSS samples (s, MB): " + ", ".join(
                      f"{t}:{m}" for t, m in s["driver_rss_samples_mb"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
