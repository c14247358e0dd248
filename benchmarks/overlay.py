"""Does a model read the burnt-in scale annotation instead of the cells? (corner-overlay check)

Every image of the ALL releases carries a scale annotation burnt into one corner by the
microscope software, and its look is not independent of the class (it changed between
acquisition sessions). A classifier could score well by reading it. This benchmark embeds
every image of the split manifest in four versions:

* ``full``: the image as is;
* ``corners_masked``: the four corner boxes (the same boxes `featsvm.data.duplicates` ignores,
  25 % of the width x 20 % of the height each) filled with the image's median colour;
* ``edges_masked``: an occlusion control: four boxes of the same size at the middle of each
  edge filled the same way (as much image hidden, but no annotation);
* ``corners_only``: everything *except* the four corner boxes filled;
* ``br_corner_only`` / ``tl_corner_only``: only the bottom-right box (where the annotation sits
  in every image we looked at) or only the top-left box (same area, no annotation) kept.

and fits the same head (grid search by grouped CV on train only, as `featsvm fit`) on the
duplicate-aware split, then scores the test split:

* train ``full`` -> test ``corners_masked`` vs ``edges_masked``: a model that leans on the
  annotation loses more when the corners are hidden than when as much of the edges is;
* train and test ``corners_masked``: what is reachable when the annotation never is seen;
* train and test ``corners_only``: how much the corners alone (annotation plus background,
  stain and cell fragments) tell about the class;
* train and test ``br_corner_only`` vs ``tl_corner_only``: the annotation's own share of that
  (same area of the frame, with and without the annotation).

Prints a table and writes benchmarks/results/overlay.{json,md}.

    python benchmarks/overlay.py --data ../shared/data/all-taleqani --split split.csv \
        --weights-dir ../shared/weights [--backbone efficientnet_lite0] [--head logreg]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from featsvm.data.dataset import load_rgb
from featsvm.data.duplicates import DuplicateConfig
from featsvm.data.manifest import read_manifest
from featsvm.evaluation.metrics import score_block
from featsvm.features.backbones import load_backbone
from featsvm.fileio import write_json_atomic, write_text_atomic
from featsvm.models.heads import calibrate, fit_head, load_head_config, needs_calibration

RESULTS = Path(__file__).resolve().parent / "results"
Box = tuple[int, int, int, int]


def corner_boxes(w: int, h: int, frac: tuple[float, float]) -> list[Box]:
    bw, bh = round(frac[0] * w), round(frac[1] * h)
    return [(0, 0, bw, bh), (w - bw, 0, w, bh), (0, h - bh, bw, h), (w - bw, h - bh, w, h)]


def edge_boxes(w: int, h: int, frac: tuple[float, float]) -> list[Box]:
    bw, bh = round(frac[0] * w), round(frac[1] * h)
    x0, y0 = (w - bw) // 2, (h - bh) // 2
    return [(x0, 0, x0 + bw, bh), (x0, h - bh, x0 + bw, h), (0, y0, bw, y0 + bh),
            (w - bw, y0, w, y0 + bh)]


def median_colour(img: Image.Image) -> tuple[int, int, int]:
    med = np.median(np.asarray(img).reshape(-1, 3), axis=0)
    return tuple(int(v) for v in med)  # type: ignore[return-value]


def fill(img: Image.Image, boxes: list[Box], keep_inside: bool = False) -> Image.Image:
    """`img` with `boxes` filled by its median colour (or everything but them)."""
    colour = median_colour(img)
    if keep_inside:
        out = Image.new("RGB", img.size, colour)
        for b in boxes:
            out.paste(img.crop(b), b[:2])
        return out
    out = img.copy()
    draw = ImageDraw.Draw(out)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    return out


def variants(frac: tuple[float, float]) -> dict[str, Callable[[Image.Image], Image.Image]]:
    return {
        "full": lambda im: im,
        "corners_masked": lambda im: fill(im, corner_boxes(*im.size, frac)),
        "edges_masked": lambda im: fill(im, edge_boxes(*im.size, frac)),
        "corners_only": lambda im: fill(im, corner_boxes(*im.size, frac), keep_inside=True),
        "br_corner_only": lambda im: fill(im, corner_boxes(*im.size, frac)[3:], keep_inside=True),
        "tl_corner_only": lambda im: fill(im, corner_boxes(*im.size, frac)[:1], keep_inside=True),
    }


def embed_all(paths: list[Path], backbone: str, weights_dir: str | None, layer: str | None,
              frac: tuple[float, float], batch_size: int = 4) -> dict[str, np.ndarray]:
    """Embeddings [N, D] of every path in every variant (decoded once per image)."""
    loaded = load_backbone(backbone, weights_dir=weights_dir, layer=layer)
    transform, embedder = loaded.transform, loaded.embedder.eval()
    embedder = embedder.to(memory_format=torch.channels_last)
    vs = variants(frac)
    out: dict[str, list[np.ndarray]] = {k: [] for k in vs}
    with torch.inference_mode():
        for i in tqdm(range(0, len(paths), batch_size), desc="embed", unit="batch",
                      mininterval=5.0):
            imgs = [load_rgb(p) for p in paths[i:i + batch_size]]
            for name, f in vs.items():
                x = torch.stack([transform(f(im)) for im in imgs])
                x = x.contiguous(memory_format=torch.channels_last)
                out[name].append(embedder(x).float().numpy())
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def evaluate(train_X: np.ndarray, test_X: np.ndarray, y: np.ndarray, groups: np.ndarray,
             split: np.ndarray, head: str, cfg_path: str | None) -> dict:
    """Fit on train and calibrate on val of `train_X` (the training variant); score test of
    `test_X`."""
    cfg = load_head_config(cfg_path)
    tr, va, te = (split == s for s in ("train", "val", "test"))
    fitted = fit_head(train_X[tr], y[tr], groups[tr], head, cfg)
    if needs_calibration(fitted):
        fitted = calibrate(fitted, train_X[va], y[va])
    block = score_block(list(y[te]), fitted.predict_proba(test_X[te]), list(groups[te]),
                        n_boot=1000)
    return {
        "accuracy": block["accuracy"], "binary": block["binary"],
        "macro_f1": block["macro_f1"], "ci95": block["ci95"],
        "best_params": fitted.best_params, "cv_best_score": fitted.cv_best_score,
    }


EXPERIMENTS = (  # (name, train variant, test variant)
    ("full -> full", "full", "full"),
    ("full -> corners_masked", "full", "corners_masked"),
    ("full -> edges_masked (control)", "full", "edges_masked"),
    ("corners_masked -> corners_masked", "corners_masked", "corners_masked"),
    ("corners_only -> corners_only", "corners_only", "corners_only"),
    ("br_corner_only -> br_corner_only", "br_corner_only", "br_corner_only"),
    ("tl_corner_only -> tl_corner_only (control)", "tl_corner_only", "tl_corner_only"),
)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ci(r: dict, key: str) -> str:
    ci = r["ci95"].get(key)
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else ""


def markdown(out: dict) -> str:
    lines = [
        f"# Corner-overlay check: {out['backbone']} ({out['layer']}) + {out['head']}",
        "",
        f"Split sha256 {out['split_sha256'][:12]}…, test n = {out['n_test']}; boxes "
        f"{out['box_fraction'][0]:.0%} x {out['box_fraction'][1]:.0%} of width x height; "
        f"embedding {out['embed_seconds']:.0f} s, fits {out['fit_seconds']:.0f} s.",
        "",
        "| train -> test | accuracy % [95 % CI] | sensitivity % | specificity % | macro-F1 % |",
        "|---|---|---|---|---|",
    ]
    for name, r in out["experiments"].items():
        lines.append(
            f"| {name} | {_pct(r['accuracy'])} {_ci(r, 'accuracy')} "
            f"| {_pct(r['binary']['sensitivity'])} | {_pct(r['binary']['specificity'])} "
            f"| {_pct(r['macro_f1'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/all-taleqani")
    ap.add_argument("--split", default="split.csv")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--layer", default=None)
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--head", default="logreg", choices=["logreg", "svm"])
    ap.add_argument("--config", default=None, help="TOML with a [fit] section")
    ap.add_argument("--out", default=str(RESULTS), help="folder for overlay.{json,md}")
    args = ap.parse_args(argv)
    if not Path(args.split).is_file() or not Path(args.data).is_dir():
        print(f"skipped: need the data ({args.data}) and a split manifest ({args.split}); "
              "run featsvm split first")
        return 0
    manifest = read_manifest(args.split)
    rows = manifest.rows
    frac = DuplicateConfig().corner_mask
    t0 = time.perf_counter()
    X = embed_all([Path(args.data) / r.relpath for r in rows], args.backbone,
                  args.weights_dir, args.layer, frac)
    embed_seconds = time.perf_counter() - t0
    y = np.array([r.label for r in rows])
    groups = np.array([r.group for r in rows])
    split = np.array([r.split for r in rows])
    t1 = time.perf_counter()
    experiments = {
        name: evaluate(X[a], X[b], y, groups, split, args.head, args.config)
        for name, a, b in EXPERIMENTS
    }
    out = {
        "backbone": args.backbone, "layer": args.layer or "default", "head": args.head,
        "split_sha256": manifest.sha256, "n_test": int((split == "test").sum()),
        "box_fraction": list(frac), "embed_seconds": embed_seconds,
        "fit_seconds": time.perf_counter() - t1, "experiments": experiments,
    }
    md = markdown(out)
    print(md)
    dest = Path(args.out)
    write_json_atomic(dest / "overlay.json", out)
    write_text_atomic(dest / "overlay.md", md)
    print(f"wrote {dest / 'overlay.json'} and {dest / 'overlay.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
