"""How much does a naive image-level split inflate scores? (grouped vs random split)

Same cached embeddings, same head, same grid, same test-set size: once with featsvm's
duplicate-aware split manifest, once with a plain stratified random split of images (the
protocol most published work on this dataset uses, and CV groups = single images). Prints a
table and writes benchmarks/results/leakage.json.

    python benchmarks/leakage.py --split split.csv --cache cache --backbone efficientnet_lite0 \
        --weights-dir ../shared/weights [--head logreg]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from featsvm.data.manifest import read_manifest
from featsvm.evaluation.metrics import score_block
from featsvm.features.cache import locate_cache, read_cache
from featsvm.fileio import write_json_atomic
from featsvm.models.heads import calibrate, fit_head, load_head_config, needs_calibration

RESULTS = Path(__file__).resolve().parent / "results" / "leakage.json"


def evaluate(X: np.ndarray, y: np.ndarray, groups: np.ndarray, cv_groups: np.ndarray,
             split: np.ndarray, head: str, cfg_path: str | None) -> dict:
    cfg = load_head_config(cfg_path)
    tr, va, te = (split == s for s in ("train", "val", "test"))
    fitted = fit_head(X[tr], y[tr], cv_groups[tr], head, cfg)
    if needs_calibration(fitted):
        fitted = calibrate(fitted, X[va], y[va])
    block = score_block(list(y[te]), fitted.predict_proba(X[te]), list(groups[te]), n_boot=1000)
    train_groups = set(groups[tr].tolist())
    leaked = int(sum(g in train_groups for g in groups[te]))
    return {
        "n_test": int(te.sum()),
        "test_images_with_a_copy_or_recapture_in_train": leaked,
        "accuracy": block["accuracy"],
        "binary": block["binary"],
        "macro_f1": block["macro_f1"],
        "ci95_accuracy": block["ci95"].get("accuracy"),
        "best_params": fitted.best_params,
        "cv_best_score": fitted.cv_best_score,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="split.csv")
    ap.add_argument("--cache", default="cache")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--head", default="logreg", choices=["logreg", "svm"])
    ap.add_argument("--config", default=None, help="TOML with a [fit] section")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not Path(args.split).is_file():
        print(f"skipped: no split manifest at {args.split} (run featsvm split first)")
        return 0
    manifest = read_manifest(args.split)
    try:
        cached = read_cache(locate_cache(args.cache, args.backbone, weights_dir=args.weights_dir))
    except Exception as exc:  # noqa: BLE001 - a benchmark skips cleanly without its inputs
        print(f"skipped: {exc}")
        return 0
    rows = manifest.rows
    X = cached.lookup([r.sha256 for r in rows]).astype(np.float64)
    y = np.array([r.label for r in rows])
    groups = np.array([r.group for r in rows])
    grouped = np.array([r.split for r in rows])
    # naive protocol: stratified random split of images with the same split sizes
    idx = np.arange(len(rows))
    n_test, n_val = int((grouped == "test").sum()), int((grouped == "val").sum())
    rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=args.seed)
    train, val = train_test_split(rest, test_size=n_val, stratify=y[rest],
                                  random_state=args.seed)
    naive = np.empty(len(rows), dtype=object)
    naive[train], naive[val], naive[test] = "train", "val", "test"
    t0 = time.perf_counter()
    out = {
        "backbone": args.backbone,
        "head": args.head,
        "cache": str(cached.path),
        "split_sha256": manifest.sha256,
        "duplicate_aware": evaluate(X, y, groups, groups, grouped, args.head, args.config),
        "naive_random": evaluate(X, y, groups, idx, naive.astype(str), args.head, args.config),
    }
    out["seconds"] = time.perf_counter() - t0
    print(f"{args.backbone} + {args.head}: test metrics, duplicate-aware vs naive random split")
    print(f"{'split':<16}{'n':>5}{'leaked':>8}{'accuracy':>10}{'sens':>8}{'spec':>8}"
          f"{'macroF1':>9}")
    for name in ("duplicate_aware", "naive_random"):
        r = out[name]
        print(f"{name:<16}{r['n_test']:>5}{r['test_images_with_a_copy_or_recapture_in_train']:>8}"
              f"{r['accuracy']:>10.4f}{r['binary']['sensitivity']:>8.4f}"
              f"{r['binary']['specificity']:>8.4f}{r['macro_f1']:>9.4f}")
    write_json_atomic(RESULTS, out)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
