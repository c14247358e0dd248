"""Duplicate-aware, label-stratified train/val/test split (and grouped k-fold inside train).

Groups come from `featsvm.data.duplicates` (exact copies + re-captures of one field). The split
assigns whole groups, so no group ever straddles two splits, while keeping every split's class
proportions close to the whole's. A group whose members carry different labels is a label
conflict: it is reported and never placed in the test split.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featsvm.data.dataset import ImageRecord, ScanResult, scan
from featsvm.data.duplicates import DuplicateConfig, Grouping, group_images
from featsvm.data.manifest import SPLITS, ManifestRow, write_manifest
from featsvm.errors import MissingInputError, UsageError
from featsvm.fileio import write_text_atomic
from featsvm.labels import LABELS

# 0.8 / 0.1 / 0.1 reproduces the reference study's 2592 / 322 / 328 on its 3,242-image release.
DEFAULT_RATIOS = (0.8, 0.1, 0.1)


@dataclass
class SplitResult:
    rows: list[ManifestRow]
    scan: ScanResult
    grouping: Grouping
    conflicts: list[list[str]] = field(default_factory=list)  # relpaths of each conflict group
    seconds: float = 0.0

    def counts(self) -> dict[str, dict[str, int]]:
        out = {s: dict.fromkeys(LABELS, 0) for s in SPLITS}
        for r in self.rows:
            out[r.split][r.label] += 1
        return out

    def group_sizes(self) -> Counter[int]:
        return Counter(Counter(r.group for r in self.rows).values())


def parse_ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--ratios expects three numbers like 0.8,0.1,0.1, got {text!r}") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or not np.isclose(sum(parts), 1.0):
        raise UsageError(f"--ratios needs three non-negative numbers summing to 1, got {text!r}")
    return parts  # type: ignore[return-value]


def assign_groups(
    labels: Sequence[str],
    groups: Sequence[int],
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    seed: int = 0,
) -> tuple[list[str], set[int]]:
    """Split name per image, assigning whole groups; also the ids of label-conflict groups.

    Greedy and deterministic: groups are visited in a seeded random order, largest first, and
    each goes to the split whose share of that group's (majority) label lies furthest below its
    target. Conflict groups may go to train or val only.
    """
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    group_ids = sorted(members)
    rng = np.random.default_rng(seed)
    order = [group_ids[i] for i in rng.permutation(len(group_ids))]
    order.sort(key=lambda g: -len(members[g]))  # stable: ties keep the seeded order

    totals = Counter(labels)
    targets = {
        s: {lab: ratios[k] * totals[lab] for lab in totals} for k, s in enumerate(SPLITS)
    }
    current = {s: Counter() for s in SPLITS}
    conflicts: set[int] = set()
    split_of_group: dict[int, str] = {}
    for g in order:
        labs = Counter(labels[i] for i in members[g])
        if len(labs) > 1:
            conflicts.add(g)
        major = sorted(labs.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        allowed = [s for k, s in enumerate(SPLITS) if ratios[k] > 0]
        if g in conflicts:
            allowed = [s for s in allowed if s != "test"] or ["train"]
        size = len(members[g])
        # deficit after placing: how far below target the split still is (larger = needier)
        best = max(
            allowed,
            key=lambda s: (targets[s][major] - current[s][major] - size / 2) / max(
                targets[s][major], 1e-9
            ),
        )
        split_of_group[g] = best
        current[best].update(labels[i] for i in members[g])
    return [split_of_group[g] for g in groups], conflicts


def assign_folds(
    labels: Sequence[str], groups: Sequence[int], splits: Sequence[str], folds: int, seed: int
) -> list[int | None]:
    """Grouped, stratified k-fold index for train images (None elsewhere)."""
    from sklearn.model_selection import StratifiedGroupKFold

    train = [i for i, s in enumerate(splits) if s == "train"]
    n_groups = len({groups[i] for i in train})
    if folds < 2 or folds > n_groups:
        raise UsageError(f"--folds must be between 2 and the number of train groups ({n_groups})")
    out: list[int | None] = [None] * len(labels)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    y = [labels[i] for i in train]
    g = [groups[i] for i in train]
    for k, (_, test_idx) in enumerate(cv.split(np.zeros(len(train)), y, g)):
        for j in test_idx:
            out[train[j]] = k
    return out


def make_split(
    data_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    seed: int = 0,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    folds: int | None = None,
    subset: str | None = None,
    class_map: dict[str, str] | None = None,
    duplicate_config: DuplicateConfig | None = None,
    progress: bool = False,
) -> SplitResult:
    """Scan `data_dir`, group duplicates and re-captures, split, and write the manifest."""
    t0 = time.perf_counter()
    found = scan(data_dir, subset=subset, class_map=class_map, progress=progress)
    if not found.records:
        raise MissingInputError(f"no readable labelled images under {data_dir}")
    records: list[ImageRecord] = found.records
    root = Path(data_dir)
    grouping = group_images(
        [os.fspath(root / r.relpath) for r in records],
        [r.sha256 for r in records],
        duplicate_config,
        progress=progress,
    )
    labels = [r.label for r in records]
    splits, conflict_groups = assign_groups(labels, grouping.group_of, ratios, seed)
    fold_of = (
        assign_folds(labels, grouping.group_of, splits, folds, seed)
        if folds
        else [None] * len(records)
    )
    rows = [
        ManifestRow(r.relpath, r.sha256, r.label, g, s, f, g in conflict_groups)
        for r, g, s, f in zip(records, grouping.group_of, splits, fold_of, strict=True)
    ]
    conflicts = [
        sorted(r.relpath for r in rows if r.group == g) for g in sorted(conflict_groups)
    ]
    if out is not None:
        write_manifest(out, rows)
        write_pairs(pairs_path(out), grouping, root)
    return SplitResult(rows, found, grouping, conflicts, time.perf_counter() - t0)


def pairs_path(manifest_path: str | os.PathLike[str]) -> Path:
    """Where the verified re-capture pairs are written beside a manifest (for auditing)."""
    p = Path(manifest_path)
    return p.with_name(p.stem + ".pairs.csv")


def write_pairs(path: Path, grouping: Grouping, root: Path) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["relpath_a", "relpath_b", "inliers", "scale", "dx", "dy"])
    for a, b, ev in sorted(grouping.pairs, key=lambda p: (p[0], p[1])):
        w.writerow([Path(a).relative_to(root).as_posix(), Path(b).relative_to(root).as_posix(),
                    ev.inliers, f"{ev.scale:.3f}", f"{ev.dx:.1f}", f"{ev.dy:.1f}"])
    write_text_atomic(path, buf.getvalue())


def summary_lines(result: SplitResult, max_groups: int = 20) -> list[str]:
    """Human-readable summary: classes, duplicates, groups, conflicts, per-split counts."""
    lines: list[str] = []
    counts = result.scan.counts()
    lines.append(
        f"images: {len(result.rows)} ({result.scan.layout} layout) — "
        + ", ".join(f"{lab} {counts[lab]}" for lab in LABELS)
    )
    if result.scan.skipped:
        lines.append(f"skipped {len(result.scan.skipped)} unreadable file(s):")
        lines += [f"  {rel}: {why}" for rel, why in result.scan.skipped]
    if result.scan.ignored_folders:
        lines.append("ignored folders (no known class): " + ", ".join(result.scan.ignored_folders))
    lines.append(f"exact-duplicate files (same sha256 as an earlier file): "
                 f"{result.grouping.exact_duplicate_files}")
    lines.append(f"verified re-capture pairs: {len(result.grouping.pairs)}")
    sizes = result.group_sizes()
    multi = {k: v for k, v in sizes.items() if k > 1}
    lines.append(
        f"groups: {sum(sizes.values())}; with more than one member: {sum(multi.values())} "
        f"holding {sum(k * v for k, v in multi.items())} images; size distribution "
        + ", ".join(f"{k}:{v}" for k, v in sorted(multi.items()))
    )
    by_group: dict[int, list[str]] = {}
    for r in result.rows:
        by_group.setdefault(r.group, []).append(r.relpath)
    big = sorted((g for g in by_group if len(by_group[g]) > 1), key=lambda g: -len(by_group[g]))
    for g in big[:max_groups]:
        lines.append(f"  group {g} ({len(by_group[g])}): " + ", ".join(by_group[g]))
    if len(big) > max_groups:
        lines.append(f"  ... {len(big) - max_groups} more multi-member groups (see the manifest)")
    lines.append(f"label conflicts (kept out of test): {len(result.conflicts)}")
    lines += ["  " + ", ".join(c) for c in result.conflicts]
    if result.grouping.unreadable:
        lines.append("files that could not be read for grouping (kept as singletons):")
        lines += [f"  {p}: {why}" for p, why in result.grouping.unreadable]
    table = result.counts()
    lines.append("split      " + " ".join(f"{lab:>12}" for lab in LABELS) + "        total")
    n = len(result.rows)
    for s in SPLITS:
        tot = sum(table[s].values())
        lines.append(
            f"{s:<10} "
            + " ".join(f"{table[s][lab]:>12}" for lab in LABELS)
            + f" {tot:>8} ({100 * tot / n:.1f}%)"
        )
    lines.append(f"time: {result.seconds:.1f} s")
    return lines
