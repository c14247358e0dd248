"""Which batch size (and precision) is fastest for CPU feature extraction? (forward only)

For each backbone (with its real weights from --weights-dir, or random weights when absent:
speed does not depend on the values) this times the embedder's forward pass, channels_last,
under inference_mode (bf16 through CPU autocast, as `extract --precision bf16` runs it), at
several batch sizes on random input of the backbone's input size, and reports images per
second. Each `BackboneSpec.cpu_batch_size` (the CPU default) is chosen from these figures.
Prints a table and writes benchmarks/results/batch_size.{json,md}.

    python benchmarks/batch_size.py [--weights-dir ../shared/weights] [--images 96] \
        [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from featsvm.device import autocast_context
from featsvm.features.backbones import load_backbone
from featsvm.fileio import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONES = (("vgg16", None), ("inception_v3", "mixed_6c"), ("inception_v3", None),
             ("efficientnet_lite0", None), ("alexnet", None))


def images_per_second(embedder: torch.nn.Module, size: int, batch: int, images: int,
                      precision: str) -> float:
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    reps = max(2, images // batch)
    with torch.inference_mode(), autocast_context(torch.device("cpu"), precision):
        embedder(x)  # warm-up (oneDNN primitive creation)
        t = time.perf_counter()
        for _ in range(reps):
            embedder(x)
        return batch * reps / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights-dir", default=os.environ.get("FEATSVM_WEIGHTS_DIR"))
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    ap.add_argument("--images", type=int, default=96, help="images timed per batch size")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    precisions = args.precisions.split(",")
    rows = []
    for name, layer in BACKBONES:
        try:
            loaded = load_backbone(name, weights_dir=args.weights_dir, layer=layer)
        except Exception:  # noqa: BLE001 - no local file: speed is the same with random weights
            loaded = load_backbone(name, weights="none", layer=layer)
        emb = loaded.embedder.eval().to(memory_format=torch.channels_last)
        size = int(loaded.preprocessing.input_size)
        for precision in precisions:
            rates = {b: images_per_second(emb, size, b, args.images, precision) for b in sizes}
            best = max(rates, key=rates.__getitem__)
            rows.append({"backbone": name, "layer": loaded.layer, "input": size,
                         "precision": precision, "img_per_s": rates, "best_batch": best})
            print(f"{name}[{loaded.layer}] {precision}: "
                  + "  ".join(f"{b}:{r:.1f}" for b, r in rates.items()) + f"  best {best}",
                  flush=True)
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(),
           "cpu_flags": sorted({f for f in flags if f.startswith(("avx512_bf16", "amx", "avx2"))}),
           "load_average": os.getloadavg(), "images_per_batch_size": args.images, "rows": rows}
    head = ("| backbone | layer | precision | " + " | ".join(f"batch {b}" for b in sizes)
            + " | fastest |")
    lines = [f"Forward-only img/s, {out['threads']} threads, torch {out['torch']}, CPU flags "
             f"{' '.join(out['cpu_flags']) or '-'}, load average {out['load_average'][0]:.2f}.",
             "", head, "|---|---|---|" + "---:|" * (len(sizes) + 1)]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['layer']} | {r['precision']} | "
                     + " | ".join(f"{r['img_per_s'][b]:.1f}" for b in sizes)
                     + f" | {r['best_batch']} |")
    dest = Path(args.out)
    write_json_atomic(dest / "batch_size.json", out)
    write_text_atomic(dest / "batch_size.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
