"""Feature-extraction benchmark on this machine (a script, not a test).

For each backbone, over N real images from ../shared/data (skips cleanly when absent):

* end-to-end images/s: `featsvm.features.extract.extract` from JPEG decode to committed HDF5 rows
  (model build included), fp32, into a temporary cache;
* cached re-run: the same call again (nothing to compute) and its speed-up;
* forward-only images/s on pre-decoded tensors (channels_last, inference_mode), fp32 and bf16,
  and the effective GFLOP/s (FLOPs counted with torch's FlopCounterMode on the embedder)
  against a large-GEMM peak measured in the same run for each precision;
* the naive loop most notebooks use: PIL load, transform, ``model(x[None])`` one image at a
  time, fp32, NCHW, full model;
* bf16-vs-fp32 embedding cosine on the forward-only sample.

Forward-only, naive and bf16 figures use a sample of the N images (``--sample``) to keep the
run short on a small CPU; the JSON records every count. Results go to
benchmarks/results/extract.json and a Markdown table is printed.

Usage: flock /tmp/featsvm-heavy.lock .venv/bin/python benchmarks/extract.py [--n-images 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _best_seconds(fn: Any, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_peak(precision: str, n: int = 1024, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of a large GEMM in `precision`, two ways: ``torch.matmul`` (n x n x n, MKL for
    fp32) and the same-size GEMM as a 1x1 convolution (oneDNN, the library the CNN convs
    use). Their maximum is the peak the backbones are compared with."""
    from featsvm.device import autocast_context

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    mm = 2 * n**3 / _best_seconds(lambda: a @ b, repeats) / 1e9
    side = int(n**0.5)
    conv = torch.nn.Conv2d(n, n, 1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(1, n, side, side).contiguous(memory_format=torch.channels_last)

    def run_conv() -> None:
        with torch.inference_mode(), autocast_context(torch.device("cpu"), precision):
            conv(x)

    cv = 2 * n * n * side * side / _best_seconds(run_conv, repeats) / 1e9
    return {"matmul": mm, "conv1x1": cv, "peak": max(mm, cv)}


def count_flops(module: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() / x.shape[0]


def forward_only(embedder: torch.nn.Module, xs: torch.Tensor, precision: str,
                 batch_size: int) -> tuple[float, np.ndarray]:
    from featsvm.device import autocast_context

    dev = torch.device("cpu")
    xs = xs.contiguous(memory_format=torch.channels_last)
    outs = []
    with torch.inference_mode():
        with autocast_context(dev, precision):
            embedder(xs[:2])  # warm-up (oneDNN primitive creation)
        t = time.perf_counter()
        for i in range(0, len(xs), batch_size):
            with autocast_context(dev, precision):
                outs.append(embedder(xs[i:i + batch_size]).float())
        dt = time.perf_counter() - t
    return len(xs) / dt, torch.cat(outs).numpy()


def naive_loop(model: torch.nn.Module, transform: Any, paths: list[Path]) -> float:
    from PIL import Image

    model = model.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        model(transform(Image.open(paths[0]).convert("RGB"))[None])  # warm-up
        t = time.perf_counter()
        for p in paths:
            x = transform(Image.open(p).convert("RGB"))
            model(x[None])
        dt = time.perf_counter() - t
    return len(paths) / dt


def bench_backbone(name: str, records: list, data: Path, weights_dir: Path | None, sample: int,
                   batch_size: int | None, workdir: Path) -> dict[str, Any]:
    from featsvm.data.dataset import load_rgb
    from featsvm.features.backbones import get_spec, load_backbone
    from featsvm.features.extract import extract

    batch_size = batch_size or get_spec(name).cpu_batch_size
    has_file = weights_dir is not None and name in _index(weights_dir)
    kw = {"weights_dir": weights_dir} if has_file else {"weights": "none"}
    out: dict[str, Any] = {"backbone": name, "n_images": len(records), "batch_size": batch_size,
                           "weights": "weights.toml" if has_file else "random (no local file)"}
    print(f"[{name}] end-to-end over {len(records)} images ...", flush=True)
    cache = workdir / name
    first = extract(data, name, cache_dir=cache, batch_size=batch_size, progress=False,
                    records=records, **kw)
    second = extract(data, name, cache_dir=cache, batch_size=batch_size, progress=False,
                     records=records, **kw)
    out.update(layer=first.layer, dim=first.dim, weights_label=first.weights_label,
               e2e_images_per_s=first.n_new / first.seconds, e2e_seconds=first.seconds,
               cached_rerun_seconds=second.seconds,
               cached_speedup=first.seconds / second.seconds, rerun_new=second.n_new)

    lb = load_backbone(name, **kw)
    tf = lb.transform
    sub = records[:sample]
    paths = [data / r.relpath for r in sub]
    xs = torch.stack([tf(load_rgb(p)) for p in paths])
    emb = lb.embedder.to(memory_format=torch.channels_last)
    flops = count_flops(emb, xs[:1].contiguous(memory_format=torch.channels_last))
    out["gflop_per_image"] = flops / 1e9
    print(f"[{name}] forward-only fp32/bf16 and naive loop over {len(sub)} images ...", flush=True)
    out["sample"] = len(sub)
    ips32, f32 = forward_only(emb, xs, "fp32", batch_size)
    ips16, f16 = forward_only(emb, xs, "bf16", batch_size)
    cos = (f32 * f16).sum(1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(f16, axis=1))
    out.update(fwd_fp32_images_per_s=ips32, fwd_bf16_images_per_s=ips16,
               gflops_fp32=ips32 * flops / 1e9, gflops_bf16=ips16 * flops / 1e9,
               bf16_speedup=ips16 / ips32, bf16_cosine_mean=float(cos.mean()),
               bf16_cosine_min=float(cos.min()))
    out["naive_images_per_s"] = naive_loop(lb.model, tf, paths)
    out["e2e_vs_forward"] = out["e2e_images_per_s"] / ips32
    out["e2e_vs_naive"] = out["e2e_images_per_s"] / out["naive_images_per_s"]
    return out


def _index(weights_dir: Path) -> dict:
    from featsvm.features.weights import read_index

    return read_index(weights_dir)


def table(res: dict[str, Any]) -> str:
    p32, p16 = res["gemm_peak_gflops"]["fp32"], res["gemm_peak_gflops"]["bf16"]
    lines = [
        f"Large-GEMM peak (same run, best of matmul and 1x1-conv GEMM, start/end): fp32 "
        f"{p32:.1f} GFLOP/s, bf16 {p16:.1f} GFLOP/s; "
        f"{res['machine']['threads']} threads, load average {res['machine']['load_start']:.2f} "
        f"at start, {res['machine']['load_end']:.2f} at end; AVX-512 BF16: "
        f"{'yes' if res['machine'].get('avx512_bf16') else 'no'}.",
        "",
        "| backbone | layer | weights | batch | GFLOP/img | end-to-end img/s | "
        "forward fp32 img/s | "
        "forward bf16 img/s | bf16/fp32 | fp32 GFLOP/s (% peak) | bf16 GFLOP/s (% peak) | "
        "naive img/s | e2e / fwd | e2e / naive | bf16 cos mean (min) | cached re-run s "
        "(speed-up) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["backbones"]:
        lines.append(
            f"| {r['backbone']} | {r['layer']} ({r['dim']}) | {r['weights']} | "
            f"{r.get('batch_size', res['batch_size'])} | {r['gflop_per_image']:.2f} | "
            f"{r['e2e_images_per_s']:.2f} | "
            f"{r['fwd_fp32_images_per_s']:.2f} | {r['fwd_bf16_images_per_s']:.2f} | "
            f"{r['bf16_speedup']:.2f}x | "
            f"{r['gflops_fp32']:.1f} ({100 * r['gflops_fp32'] / p32:.0f} %) | "
            f"{r['gflops_bf16']:.1f} ({100 * r['gflops_bf16'] / p16:.0f} %) | "
            f"{r['naive_images_per_s']:.2f} | {100 * r['e2e_vs_forward']:.0f} % | "
            f"{r['e2e_vs_naive']:.2f}x | "
            f"{r['bf16_cosine_mean']:.5f} ({r['bf16_cosine_min']:.5f}) | "
            f"{r['cached_rerun_seconds']:.3f} ({r['cached_speedup']:.0f}x) |"
        )
    lines.append("")
    lines.append(f"End-to-end and cached re-run over {res['n_images']} images; forward-only, "
                 f"bf16 and naive over the first {res['sample']} of them.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "all-taleqani")
    ap.add_argument("--weights-dir", type=Path, default=SHARED / "weights")
    ap.add_argument("--backbones", nargs="+",
                    default=["efficientnet_lite0", "alexnet", "inception_v3", "vgg16"])
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--sample", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="default: each backbone's CPU batch (BackboneSpec.cpu_batch_size)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "extract.json")
    args = ap.parse_args(argv)
    if not (args.data / "Original").is_dir():
        print(f"SKIP: real dataset not found at {args.data}")
        return 0
    weights_dir = args.weights_dir if (args.weights_dir / "weights.toml").is_file() else None

    from featsvm.data.dataset import scan
    from featsvm.fileio import write_json_atomic
    from featsvm.runs import now_iso, versions

    records = scan(args.data).records
    step = max(1, len(records) // args.n_images)
    chosen = records[::step][: args.n_images]  # spread over the four classes
    flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0] \
        if Path("/proc/cpuinfo").exists() else ""
    res: dict[str, Any] = {
        "created": now_iso(), "versions": versions(), "n_images": len(chosen),
        "sample": min(args.sample, len(chosen)), "batch_size": args.batch_size or "per backbone",
        "machine": {
            "platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "amx": "amx" in flags, "load_start": os.getloadavg()[0],
        },
        "backbones": [],
    }
    print("GEMM peak ...", flush=True)
    peaks = {p: gemm_peak(p) for p in ("fp32", "bf16")}
    with tempfile.TemporaryDirectory(prefix="featsvm-bench-") as tmp:
        for name in args.backbones:
            res["backbones"].append(bench_backbone(name, chosen, args.data, weights_dir,
                                                   args.sample, args.batch_size, Path(tmp)))
    # second GEMM measurement: the machine is shared, take the better of the two
    end = {p: gemm_peak(p) for p in ("fp32", "bf16")}
    res["gemm_start"], res["gemm_end"] = peaks, end
    res["gemm_peak_gflops"] = {k: max(peaks[k]["peak"], end[k]["peak"]) for k in peaks}
    res["machine"]["load_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, res)
    md = table(res)
    args.out.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
