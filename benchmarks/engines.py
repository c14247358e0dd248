"""Engines benchmark on this machine (a script, not a test): what bf16, ONNX Runtime, OpenVINO
and static int8 buy on the CPU, and what they cost in accuracy.

For each backbone (the study's layers: VGG16 gap, InceptionV3 mixed_6c, AlexNet gap,
EfficientNet-Lite0 pre_logits; weights from --weights-dir), in one run:

* **images/s end to end** (JPEG decode + transform + forward over the parity images, file
  bytes pre-read into memory; the naive loop over the first --n-speed of them) for: the naive
  loop (one image at a time, fp32, NCHW, ``no_grad``),
  torch fp32 and torch bf16 (batched, channels_last, ``inference_mode``: what extract does),
  ONNX Runtime fp32 and int8, OpenVINO fp32, bf16 and int8. Each is timed once after a
  warm-up batch; ratios to the naive loop come from the same run.
* **feature cosine** of every config against the fp32 torch features in the shared cache
  (--cache, rows matched by sha256), on the TEST split (all of it, or --parity-images).
* **head parity**: a logistic and an SVM head fitted on the cache's fp32 TRAIN features (the
  study's [cv] grid, grouped CV on train) and temperature-calibrated on val, then applied to
  each config's TEST features: agreement of the predicted class with the fp32 features'
  predictions, and accuracy / balanced accuracy / macro-F1 with 95 % group-bootstrap CIs.
* int8 graphs are calibrated on --calibration TRAIN images (`featsvm.features.quantise`).

The CPU's flags (lscpu), the bf16 probe, library versions and the load average before and
after go into benchmarks/results/engines.json and .md. The machine may be shared: the load
is recorded, and ratios measured under load are noisier than on an idle machine.

Usage: nice -n 10 .venv/bin/python benchmarks/engines.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYERS = {"vgg16": "gap", "inception_v3": "mixed_6c", "alexnet": "gap",
          "efficientnet_lite0": "pre_logits"}
CONFIGS = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"),
           ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "bf16"),
           ("openvino", "int8")]


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Flags", "L2 cache", "L3 cache")
    rows = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in rows if k.strip() in keep}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


class Backbone:
    """One backbone's images, reference features and ways to embed them."""

    def __init__(self, name: str, args: argparse.Namespace, manifest: Any) -> None:
        from featsvm.features.backbones import load_backbone
        from featsvm.features.cache import locate_cache, read_cache

        self.name = name
        self.loaded = load_backbone(name, weights_dir=args.weights_dir, layer=LAYERS[name])
        self.pre = self.loaded.preprocessing
        self.transform = self.pre.image_transform()
        self.cache = read_cache(locate_cache(args.cache, name, weights_dir=args.weights_dir,
                                             layer=LAYERS[name]))
        self.batch = self.loaded.spec.cpu_batch_size
        self.size = int(self.pre.crop)

    def tensors(self, blobs: list[bytes]) -> torch.Tensor:
        from featsvm.data.dataset import decode_rgb

        return torch.cat([self.transform(decode_rgb(b, "image")) for b in blobs])

    def embed_torch(self, blobs: list[bytes], precision: str) -> np.ndarray:
        from featsvm.device import autocast_context

        emb = self.loaded.embedder.to(memory_format=torch.channels_last).eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(blobs), self.batch):
                x = self.tensors(blobs[i:i + self.batch]).contiguous(
                    memory_format=torch.channels_last)
                with autocast_context("cpu", precision):
                    out.append(emb(x).float().numpy())
        return np.concatenate(out)

    def naive(self, blobs: list[bytes]) -> np.ndarray:
        emb = self.loaded.embedder.to(memory_format=torch.contiguous_format).eval()
        out = []
        with torch.no_grad():
            for b in blobs:
                out.append(emb(self.tensors([b])).numpy())
        return np.concatenate(out)

    def runner(self, engine: str, precision: str, calib: list[np.ndarray], tmp: Path) -> Any:
        from featsvm.features.engines import build_runner

        qpath = tmp / f"{self.name}.int8.onnx"
        return build_runner(engine, precision, self.loaded.embedder, self.size,
                            calibration=calib if precision == "int8" else None,
                            quantised_path=qpath if precision == "int8" else None)

    def embed_runner(self, run: Any, blobs: list[bytes]) -> np.ndarray:
        return np.concatenate([run(self.tensors(blobs[i:i + self.batch]).numpy())
                               for i in range(0, len(blobs), self.batch)])


def _timed(fn: Any, blobs: list[bytes], warm: list[bytes]) -> tuple[float, np.ndarray]:
    fn(warm)
    t = time.perf_counter()
    feats = fn(blobs)
    return len(blobs) / (time.perf_counter() - t), feats


def _heads(bb: Backbone, manifest: Any, args: argparse.Namespace) -> dict[str, Any]:
    from featsvm.config import load_toml, section
    from featsvm.models.heads import HeadConfig, calibrate, fit_head

    cfg = section(HeadConfig, {"fit": load_toml(REPO / "configs/cpu.toml").get("cv", {})},
                  "fit", "configs/cpu.toml [cv]")
    train, val = manifest.subset("train"), manifest.subset("val")
    X = bb.cache.lookup([r.sha256 for r in train])
    Xv = bb.cache.lookup([r.sha256 for r in val])
    heads = {}
    for head in args.heads:
        f = fit_head(X, [r.label for r in train], [r.group for r in train], head, cfg)
        heads[head] = calibrate(f, Xv, [r.label for r in val])
    return heads


def _score(head: Any, feats: np.ndarray, rows: list[Any], ref_pred: np.ndarray,
           manifest: Any, n_boot: int) -> dict[str, Any]:
    from featsvm.evaluation.metrics import score_predictions

    proba = head.predict_proba(feats)
    block = score_predictions(manifest, [r.relpath for r in rows], proba, n_boot=n_boot)["test"]
    ci = block.get("ci95", {})
    return {"agreement": float((proba.argmax(1) == ref_pred).mean()),
            "n_disagree": int((proba.argmax(1) != ref_pred).sum()),
            **{k: {"value": block[k], "ci95": ci.get(k)}
               for k in ("accuracy", "balanced_accuracy", "macro_f1")}}


def bench_backbone(name: str, args: argparse.Namespace, manifest: Any, data: Path,
                   tmp: Path) -> dict[str, Any]:
    from featsvm.features.quantise import calibration_rows

    bb = Backbone(name, args, manifest)
    test = sorted(manifest.subset("test"), key=lambda r: r.relpath)
    parity_rows = test[: args.parity_images] if args.parity_images else test
    speed_rows = test[: args.n_speed]
    blobs = {r.sha256: (data / r.relpath).read_bytes() for r in {*parity_rows, *speed_rows}}
    speed = [blobs[r.sha256] for r in speed_rows]
    parity = [blobs[r.sha256] for r in parity_rows]
    warm = speed[: bb.batch]
    calib_rows = calibration_rows(manifest.rows, args.calibration)
    calib_x = bb.tensors([(data / r.relpath).read_bytes() for r in calib_rows]).numpy()
    calib = [calib_x[i:i + 8] for i in range(0, len(calib_x), 8)]
    ref = bb.cache.lookup([r.sha256 for r in parity_rows])
    heads = _heads(bb, manifest, args)
    ref_pred = {h: m.predict_proba(ref).argmax(1) for h, m in heads.items()}
    out: dict[str, Any] = {"layer": LAYERS[name], "dim": int(bb.pre.dim),
                           "batch_size": bb.batch, "n_speed": len(speed),
                           "n_parity": len(parity), "calibration_images": len(calib_rows),
                           "load_before": _load(), "configs": {}}
    ips, _ = _timed(bb.naive, speed, warm[:1])
    out["configs"]["naive fp32 loop"] = {"images_per_s": ips}
    print(f"{name}: naive {ips:.2f} img/s", flush=True)
    for engine, precision in CONFIGS:
        key = f"{engine} {precision}"
        try:
            if engine == "torch":
                def fn(b: list[bytes], p: str = precision) -> np.ndarray:
                    return bb.embed_torch(b, p)
                build_s = 0.0
            else:
                t = time.perf_counter()
                run = bb.runner(engine, precision, calib, tmp)
                build_s = time.perf_counter() - t

                def fn(b: list[bytes], r: Any = run) -> np.ndarray:
                    return bb.embed_runner(r, b)
            ips, feats = _timed(fn, parity, warm)  # the parity pass is the timed pass
        except Exception as exc:  # noqa: BLE001 - one failing engine must not end the run
            out["configs"][key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"{name}: {key} failed: {exc}", flush=True)
            continue
        cos = _cos(feats, ref)
        entry = {"images_per_s": ips, "vs_naive": ips / out["configs"]["naive fp32 loop"][
            "images_per_s"], "build_seconds": round(build_s, 1),
            "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "heads": {h: _score(m, feats, parity_rows, ref_pred[h], manifest, args.n_boot)
                      for h, m in heads.items()}}
        out["configs"][key] = entry
        print(f"{name}: {key} {ips:.2f} img/s ({entry['vs_naive']:.2f}x naive), cosine min "
              f"{cos.min():.5f}, agreement " + ", ".join(
                  f"{h} {100 * v['agreement']:.1f} %" for h, v in entry["heads"].items()),
              flush=True)
    out["reference_heads"] = {h: _score(m, ref, parity_rows, ref_pred[h], manifest,
                                        args.n_boot) for h, m in heads.items()}
    out["load_after"] = _load()
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# Engines benchmark ({res['when']})", "",
             f"CPU: {res['cpu'].get('Model name')}, {res['cpu'].get('CPU(s)')} CPUs; "
             f"bf16 probe: {res['probe']}; torch threads {res['torch_threads']}.",
             f"Load average (1, 5, 15 min) before: {res['load_before']}, after: "
             f"{res['load_after']} (the machine is shared: speeds under load are noisy).",
             f"Command: `{res['command']}`", ""]
    for name, b in res["backbones"].items():
        lines += [f"## {name} ({b['layer']}, {b['dim']}-d; speed and parity on {b['n_parity']} "
                  f"test images, the naive loop on {b['n_speed']}; int8 calibrated on "
                  f"{b['calibration_images']} train images; load {b['load_before']} -> "
                  f"{b['load_after']})", "",
                  "| config | images/s | vs naive | cosine min / mean | "
                  + " | ".join(f"{h} agreement | {h} bal. acc. [95 % CI]" for h in res["heads"])
                  + " |", "|---" * (4 + 2 * len(res["heads"])) + "|"]
        for key, c in b["configs"].items():
            if "error" in c:
                why = " ".join(c["error"].split())  # one table row, whatever the message
                lines.append(f"| {key} | failed: {why[:160]} |")
                continue
            cells = [f"{c['images_per_s']:.2f}", f"{c.get('vs_naive', 1.0):.2f}x",
                     f"{c['cosine_min']:.5f} / {c['cosine_mean']:.5f}" if "cosine_min" in c
                     else "-"]
            for h in res["heads"]:
                hv = c.get("heads", {}).get(h)
                if hv is None:
                    cells += ["-", "-"]
                    continue
                ba = hv["balanced_accuracy"]
                ci = ba["ci95"] or [float("nan")] * 2
                cells += [f"{100 * hv['agreement']:.1f} %",
                          f"{100 * ba['value']:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        ref = b["reference_heads"]
        lines += ["", "fp32 cache features (the reference): " + "; ".join(
            f"{h} balanced accuracy {100 * v['balanced_accuracy']['value']:.1f} % "
            f"{[round(100 * x, 1) for x in (v['balanced_accuracy']['ci95'] or [])]}"
            for h, v in ref.items()), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/all-taleqani")
    ap.add_argument("--split", type=Path, default=Path("/work/split.csv"))
    ap.add_argument("--cache", default="/work/cache")
    ap.add_argument("--weights-dir", default=str(REPO.parent / "shared/weights"))
    ap.add_argument("--backbones", nargs="+", default=list(LAYERS))
    ap.add_argument("--heads", nargs="+", default=["logreg", "svm"])
    ap.add_argument("--n-speed", type=int, default=16,
                    help="test images the (slow) naive loop is timed on")
    ap.add_argument("--parity-images", type=int, default=0, help="0 = the whole test split")
    ap.add_argument("--calibration", type=int, default=64, help="train images for int8")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--quick", action="store_true",
                    help="AlexNet and EfficientNet-Lite0, 8 speed / 32 parity images, 16 "
                    "calibration images, 100 bootstrap resamples")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/engines")
    args = ap.parse_args()
    if args.quick:
        args.backbones = [b for b in args.backbones if b in ("alexnet", "efficientnet_lite0")]
        args.n_speed, args.parity_images, args.calibration, args.n_boot = 8, 32, 16, 100
        args.out = args.out.with_name(args.out.name + "-quick")
    if not (args.data / "Original").is_dir() or not args.split.is_file():
        print(f"skipped: no data at {args.data} or no split at {args.split}")
        return
    from featsvm.data.manifest import read_manifest
    from featsvm.device import probe_cpu
    from featsvm.runs import now_iso, versions

    manifest = read_manifest(args.split)
    res: dict[str, Any] = {
        "when": now_iso(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": _lscpu(), "probe": probe_cpu().describe(), "probe_detail": probe_cpu().to_json(),
        "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
        "versions": versions(), "heads": args.heads, "load_before": _load(), "backbones": {},
    }
    for mod in ("onnxruntime", "openvino", "onnx", "skl2onnx"):
        try:
            res["versions"][mod] = __import__(mod).__version__
        except ImportError:
            res["versions"][mod] = None
    with tempfile.TemporaryDirectory(prefix="featsvm-engines-") as tmp:
        for name in args.backbones:
            res["backbones"][name] = bench_backbone(name, args, manifest, args.data, Path(tmp))
            res["load_after"] = _load()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
            args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
