"""The split manifest: one CSV row per image (relpath, sha256, label, group, split[, fold]).

Written by `featsvm split`; read by everything downstream. Its sha256 is recorded in every
run so that a result can always be traced to the exact split it was scored on.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from featsvm.errors import ManifestError, MissingInputError
from featsvm.fileio import sha256_file, write_text_atomic
from featsvm.labels import check_label

SPLITS = ("train", "val", "test")
COLUMNS = ("relpath", "sha256", "label", "group", "split", "fold", "conflict")


@dataclass(frozen=True)
class ManifestRow:
    relpath: str
    sha256: str
    label: str
    group: int
    split: str
    fold: int | None = None  # grouped k-fold index inside train (None outside train / no folds)
    conflict: bool = False  # member of a group whose images carry different labels


@dataclass(frozen=True)
class Manifest:
    path: Path
    sha256: str
    rows: tuple[ManifestRow, ...]

    def subset(self, split: str) -> list[ManifestRow]:
        return [r for r in self.rows if r.split == split]


def write_manifest(path: str | os.PathLike[str], rows: list[ManifestRow]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in sorted(rows, key=lambda r: r.relpath):
        writer.writerow(
            [r.relpath, r.sha256, r.label, r.group, r.split,
             "" if r.fold is None else r.fold, int(r.conflict)]
        )
    write_text_atomic(path, buf.getvalue())


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"split manifest {path} not found; create it with `featsvm split DATA_DIR --out {path}`"
        )
    rows: list[ManifestRow] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"relpath", "sha256", "label", "group", "split"} - set(reader.fieldnames or [])
        if missing:
            raise ManifestError(f"{path}: not a featsvm split manifest (missing {sorted(missing)})")
        for i, rec in enumerate(reader, start=2):
            try:
                split = rec["split"]
                if split not in SPLITS:
                    raise ManifestError(f"split {split!r} is not one of {SPLITS}")
                fold = rec.get("fold") or ""
                rows.append(
                    ManifestRow(
                        relpath=rec["relpath"],
                        sha256=rec["sha256"],
                        label=check_label(rec["label"]),
                        group=int(rec["group"]),
                        split=split,
                        fold=int(fold) if fold != "" else None,
                        conflict=(rec.get("conflict") or "0") in ("1", "true", "True"),
                    )
                )
            except (ValueError, KeyError) as exc:
                raise ManifestError(f"{path}, line {i}: {exc}") from exc
    _check_partitions(path, rows)
    return Manifest(path=path, sha256=sha256_file(path), rows=tuple(rows))


def _check_partitions(path: Path, rows: list[ManifestRow]) -> None:
    """Refuse a manifest (e.g. edited by hand) that puts one image (same sha256) or one
    duplicate group in two partitions: its test scores would be leaked. Names the lines."""
    for what, key in (("image sha256", lambda r: r.sha256), ("duplicate group", lambda r: r.group)):
        where: dict[object, dict[str, list[int]]] = {}
        for line, r in enumerate(rows, start=2):
            where.setdefault(key(r), {}).setdefault(r.split, []).append(line)
        bad = [(k, parts) for k, parts in where.items() if len(parts) > 1]
        if bad:
            def lines(parts: dict[str, list[int]]) -> str:
                return " and ".join(
                    f"line{'s' if len(ls) > 1 else ''} {', '.join(map(str, ls[:5]))}"
                    f"{' ...' if len(ls) > 5 else ''} ({split})" for split, ls in parts.items())

            shown = "; ".join(
                f"{what} {str(k)[:16]} on {lines(parts)}" for k, parts in bad[:3])
            raise ManifestError(
                f"{path}: {len(bad)} {what}(s) in more than one partition (train/val/test), "
                f"which leaks test images into training: {shown}"
                f"{'; ...' if len(bad) > 3 else ''}. Fix the file or re-create it with "
                "`featsvm split`"
            )
