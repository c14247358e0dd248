"""Re-capture recall: do more candidate pairs / more keypoints find more re-captured fields,
without merging different fields? (featsvm.data.duplicates settings)

For every setting it runs the same pipeline as `featsvm split` (SIFT outside the four corner
boxes, so the annotation corner is masked; bag-of-words shortlist of `candidates` neighbours
per image; ratio test + RANSAC similarity with inlier-count, scale and spread checks;
union-find) on one data folder and prints:

* verified pairs, number of groups, the largest group, images in multi-image groups;
* label-conflict groups (members with different labels). A re-capture shows one field of one
  slide, so it carries one label: a conflict is the visible trace of a false merge (a false
  merge of two fields of the same class is invisible, so this is a lower bound);
* for every setting after the first: the pairs it adds, how many of those join two images of
  different labels, and how many group links of the first setting it adds.

Features are computed once per keypoint budget. Writes benchmarks/results/recapture.{json,md}.

    nice -n 10 python benchmarks/recapture.py --data ../shared/data/all-taleqani
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
from threadpoolctl import threadpool_limits

from featsvm.data.dataset import scan
from featsvm.data.duplicates import (
    DuplicateConfig,
    Features,
    _UnionFind,
    candidate_pairs,
    compute_features,
    grey_array,
    verify_pair,
)
from featsvm.fileio import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"

SETTINGS: dict[str, dict] = {
    "default": {},
    "candidates_100": {"candidates": 100},
    "keypoints_1000_candidates_100": {"max_keypoints": 1000, "candidates": 100},
}


def features_for(paths: list[str], cfg: DuplicateConfig) -> list[Features]:
    cv2.setNumThreads(1)

    def one(p: str) -> Features:
        return compute_features(grey_array(p, cfg.work_size), cfg)

    with threadpool_limits(1), ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(one, paths))


def verify_all(features: list[Features], cfg: DuplicateConfig) -> tuple[set[tuple[int, int]], int]:
    pairs = candidate_pairs(features, cfg)

    def check(p: tuple[int, int]) -> bool:
        return verify_pair(features[p[0]], features[p[1]], cfg) is not None

    with threadpool_limits(1), ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        ok = list(pool.map(check, pairs))
    return {p for p, good in zip(pairs, ok, strict=True) if good}, len(pairs)


def groups_of(n: int, pairs: set[tuple[int, int]]) -> list[int]:
    uf = _UnionFind(n)
    for a, b in sorted(pairs):
        uf.union(a, b)
    return [uf.find(i) for i in range(n)]


def stats(labels: list[str], weights: list[int], pairs: set[tuple[int, int]]) -> dict:
    """Counts over distinct files (`weights`: how many files share each distinct content)."""
    g = groups_of(len(labels), pairs)
    members: dict[int, list[int]] = {}
    for i, root in enumerate(g):
        members.setdefault(root, []).append(i)
    sizes = sorted((sum(weights[i] for i in m) for m in members.values()), reverse=True)
    conflicts = [m for m in members.values() if len({labels[i] for i in m}) > 1]
    return {
        "verified_pairs": len(pairs),
        "groups": len(members),
        "largest_group": sizes[0] if sizes else 0,
        "top_group_sizes": sizes[:5],
        "images_in_multi_image_groups": sum(s for s in sizes if s > 1),
        "conflict_groups": len(conflicts),
        "images_in_conflict_groups": sum(sum(weights[i] for i in m) for m in conflicts),
        "cross_label_pairs": sum(labels[a] != labels[b] for a, b in pairs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args()
    t0 = time.perf_counter()
    records = sorted(scan(args.data).records, key=lambda r: r.relpath)
    first: dict[str, int] = {}
    reps, weights = [], []
    for r in records:
        if r.sha256 in first:
            weights[first[r.sha256]] += 1
            continue
        first[r.sha256] = len(reps)
        reps.append(r)
        weights.append(1)
    paths = [str(args.data / r.relpath) for r in reps]
    labels = [r.label for r in reps]
    print(f"{len(records)} files, {len(reps)} distinct", flush=True)
    feats: dict[int, list[Features]] = {}
    out: dict[str, dict] = {}
    base_pairs: set[tuple[int, int]] | None = None
    base_groups: list[int] | None = None
    for name in args.settings:
        cfg = dataclasses.replace(DuplicateConfig(), **SETTINGS[name])
        t1 = time.perf_counter()
        if cfg.max_keypoints not in feats:
            feats[cfg.max_keypoints] = features_for(paths, cfg)
        t2 = time.perf_counter()
        pairs, n_candidates = verify_all(feats[cfg.max_keypoints], cfg)
        t3 = time.perf_counter()
        row = {"settings": SETTINGS[name], "candidate_pairs": n_candidates,
               **stats(labels, weights, pairs),
               "seconds": {"keypoints": t2 - t1, "verify": t3 - t2}}
        if base_pairs is None:
            base_pairs, base_groups = pairs, groups_of(len(reps), pairs)
        else:
            added = pairs - base_pairs
            row["pairs_added"] = len(added)
            row["pairs_lost"] = len(base_pairs - pairs)
            row["added_cross_label_pairs"] = sum(labels[a] != labels[b] for a, b in added)
            row["added_links_between_default_groups"] = sum(
                base_groups[a] != base_groups[b] for a, b in added)  # type: ignore[index]
        out[name] = row
        print(name, {k: v for k, v in row.items() if k != "settings"}, flush=True)
    result = {"benchmark": "recapture", "data": str(args.data), "files": len(records),
              "distinct": len(reps), "settings": out, "seconds": time.perf_counter() - t0,
              "loadavg": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / "recapture.json", result)
    cols = ("candidate_pairs", "verified_pairs", "groups", "largest_group",
            "images_in_multi_image_groups", "conflict_groups", "cross_label_pairs",
            "pairs_added", "added_cross_label_pairs", "added_links_between_default_groups")
    md = ["# Re-capture recall (featsvm.data.duplicates settings)", "",
          f"{len(records)} files ({len(reps)} distinct) of {args.data.name}.", "",
          "| setting | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in out.items():
        md.append(f"| {name} | " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    write_text_atomic(RESULTS / "recapture.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
