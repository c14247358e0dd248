"""How many detected white cells to pool per field (in-lab only; never on another lab's images).

For every k-th train+val image of a split manifest: detect the white cells
(`featsvm.features.cells`, detector version ``--detector``), crop up to 12 (largest first,
112 px, background black), embed each crop with a frozen backbone, and for each pool size
(top-1, 2, 3, 5, 8, 12 by area) score the mean-pooled embedding by 5-fold grouped CV
(groups = the manifest's duplicate / re-capture groups) with an untuned
StandardScaler + LogisticRegression(C=1): 4-class accuracy. Chooses
`featsvm.features.preprocess.DEFAULT_MAX_CELLS`.

    nice -n 15 python benchmarks/cell_pooling.py --split split.csv \
        --data ../shared/data/all-taleqani --weights-dir ../shared/weights --every 8

Writes benchmarks/results/cell_pooling.json (and prints a line per pool size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POOLS = (1, 2, 3, 5, 8, 12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights-dir", default=os.environ.get("FEATSVM_WEIGHTS_DIR"))
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--detector", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cell_pooling.json"))
    args = ap.parse_args()

    import torch
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from torchvision import transforms as T

    from featsvm.data.manifest import read_manifest
    from featsvm.features.backbones import load_backbone
    from featsvm.features.cells import crop_cell, detect, detector_params

    torch.set_num_threads(1)
    rows = [r for r in read_manifest(args.split).rows if r.split in ("train", "val")]
    rows = rows[::args.every]
    loaded = load_backbone(args.backbone, weights_dir=args.weights_dir)
    embedder = loaded.embedder.eval()
    pre = loaded.preprocessing
    tf = T.Compose([T.ToTensor(), T.Normalize(list(pre.mean or ()), list(pre.std or ()))])
    params = detector_params(args.detector)
    feats, n_cells = [], []
    t0 = time.time()
    for r in rows:
        img = Image.open(Path(args.data) / r.relpath).convert("RGB")
        cells = detect(img, params).cells[:max(POOLS)]
        crops = [crop_cell(img, c, 112) for c in cells] or [img.resize((112, 112))]
        with torch.inference_mode():
            feats.append(embedder(torch.stack([tf(c) for c in crops])).numpy())
        n_cells.append(len(cells))
    y = np.array([r.label for r in rows])
    groups = np.array([r.group for r in rows])
    acc = {}
    for k in POOLS:
        x = np.stack([f[:k].mean(axis=0) for f in feats])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        pred = cross_val_predict(clf, x, y, groups=groups,
                                 cv=StratifiedGroupKFold(5, shuffle=True, random_state=0))
        acc[k] = float((pred == y).mean())
        print(f"detector v{args.detector} top-{k}: CV accuracy {acc[k]:.3f} (n={len(y)})")
    out = {
        "what": "in-lab 5-fold grouped CV accuracy of the mean of the top-k cells' embeddings",
        "backbone": args.backbone, "detector": args.detector, "every": args.every,
        "n_images": len(rows), "median_cells_per_field": float(np.median(n_cells)),
        "fields_without_cell": int(sum(c == 0 for c in n_cells)),
        "accuracy_by_pool_size": {str(k): v for k, v in acc.items()},
        "seconds": round(time.time() - t0, 1), "load_average": os.getloadavg(),
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
