"""How many native pixels a Taleqani white cell's crop window spans (TRAIN fields only).

Chooses `featsvm.features.cells.NATIVE_CELL_PX`, the resolution that the cell view's
resolution normalisation (``cells+lowres``, ``--cell-resolution N``) resamples every crop
window to before the final resize: the median over the crops of a seeded sample of TRAIN
fields of a split manifest. For every sampled field the detector (`featsvm.features.cells.
detect`, version ``--detector``) finds the white cells; the crops the cell view makes are
those of the largest `MAX_CELLS`, and each crop window spans ``max(bbox height, bbox width) /
fill`` native pixels (`featsvm.features.cells.crop_cell`, fill 0.8). Never run it on another
lab's images: the point is the detail a typical *training* cell carries.

    nice -n 10 python benchmarks/cell_resolution.py --split /work/split.csv \
        --data /work/shared/data/all-taleqani --n 300

Prints the distribution and writes benchmarks/results/cell_resolution.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUANTILES = (5, 10, 25, 50, 75, 90, 95)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", required=True, help="split manifest (its TRAIN rows only)")
    ap.add_argument("--data", required=True, help="folder of the manifest's images")
    ap.add_argument("--n", type=int, default=300, help="train fields sampled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--detector", type=int, default=None, help="default: the current version")
    ap.add_argument("--fill", type=float, default=0.8, help="crop_cell's fill")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" /
                                         "cell_resolution.json"))
    args = ap.parse_args()

    from featsvm.data.dataset import load_rgb
    from featsvm.data.manifest import read_manifest
    from featsvm.features.cells import (
        DETECTOR_VERSION,
        MAX_CELLS,
        NATIVE_CELL_PX,
        detect,
        detector_params,
    )

    version = DETECTOR_VERSION if args.detector is None else args.detector
    params = detector_params(version)
    manifest = read_manifest(args.split)
    train = manifest.subset("train")
    rows = sorted(random.Random(args.seed).sample(train, min(args.n, len(train))),
                  key=lambda r: r.relpath)
    t0 = time.time()
    windows: list[float] = []
    by_label: dict[str, list[float]] = defaultdict(list)
    field_sizes: set[tuple[int, int]] = set()
    n_single = n_empty = 0
    for r in rows:
        img = load_rgb(Path(args.data) / r.relpath)
        field_sizes.add(img.size)
        det = detect(img, params)
        n_single += det.single
        n_empty += not det.cells
        for c in det.cells[:MAX_CELLS]:
            r0, c0, r1, c1 = c.bbox
            side = max(r1 - r0, c1 - c0) / args.fill
            windows.append(side)
            by_label[r.label].append(side)
    w = np.array(windows)
    q = {str(p): round(float(v), 1) for p, v in zip(QUANTILES, np.percentile(w, QUANTILES),
                                                     strict=True)}
    median = float(np.median(w))
    print(f"{len(rows)} train fields of {args.split} (seed {args.seed}), detector v{version}: "
          f"{len(w)} crops (<= {MAX_CELLS} per field), {n_empty} field(s) without a cell, "
          f"{n_single} segmented single-cell image(s); field sizes {sorted(field_sizes)}")
    print("crop window side (native px, bbox max side / fill): "
          + ", ".join(f"p{p} {v}" for p, v in q.items())
          + f"; mean {w.mean():.1f}; median rounded {round(median)} "
            f"(featsvm.features.cells.NATIVE_CELL_PX = {NATIVE_CELL_PX})")
    for label, vals in sorted(by_label.items()):
        print(f"  {label}: {len(vals)} crops, median {np.median(vals):.1f}, "
              f"p10-p90 {np.percentile(vals, 10):.1f}-{np.percentile(vals, 90):.1f}")
    hist, edges = np.histogram(w, bins=[0, 16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 1e9])
    out = {
        "what": "crop window side in native pixels (bbox max side / fill) of the cells the "
                "cell view crops, on a seeded sample of TRAIN fields; chooses "
                "featsvm.features.cells.NATIVE_CELL_PX (its median, rounded)",
        "split": str(args.split), "split_sha256": manifest.sha256, "seed": args.seed,
        "n_fields": len(rows), "n_crops": int(len(w)), "detector": version, "fill": args.fill,
        "max_cells": MAX_CELLS, "fields_without_cell": n_empty, "single_cell_images": n_single,
        "field_sizes": sorted(field_sizes), "median": round(median, 2),
        "median_rounded": round(median), "mean": round(float(w.mean()), 2), "quantiles": q,
        "by_label": {k: {"n": len(v), "median": round(float(np.median(v)), 2)}
                     for k, v in sorted(by_label.items())},
        "histogram": {f"{edges[i]:g}-{edges[i + 1]:g}": int(h) for i, h in enumerate(hist)},
        "seconds": round(time.time() - t0, 1), "load_average": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
