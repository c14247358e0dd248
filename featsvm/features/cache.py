"""The HDF5 embedding cache: one file per fingerprint, append-only, resumable, locked.

A fingerprint covers everything that changes an embedding: backbone, weights sha256 (or
``random``), the `Preprocessing` (resize, crop, mean/std, embedding layer, model hooks) and
the precision (`features.key.FeatureKey`). It is part of the file name, so changed weights or
preprocessing always give another file; a file whose attributes disagree with its name is
refused.

Layout (``<cache>/<backbone>-<layer>-<weights8>-<precision>-<fingerprint12>.h5``)::

    features  [N, D] float32   chunked, resizable
    sha256    [N]    S64       content hash of the image file (the lookup key)
    relpath   [N]    S1024     UTF-8 path of the first file seen with that content (information
                               only; a longer path is cut at a character boundary)
    label     [N]    S32       label of that file (information only; use the split manifest)
    rowcrc    [N]    uint32    CRC-32 of the row's float32 features and sha256 (layout 2)
    attrs: backbone, layer, dim, weights_label, weights_sha256, weights_source, preprocessing
           (JSON), precision, fingerprint, n_rows, layout, featsvm_version, torch_version,
           created, extract_command

Crash safety: every batch is appended, flushed, read back and compared, then ``n_rows`` is
updated, the file flushed and fsynced, so a SIGKILL loses at most the batch in flight; readers
and the next writer trust only ``n_rows`` rows. Only fixed-size types are stored (layout 2):
files of layout 1 kept ``relpath`` and ``label`` as variable-length strings in an HDF5 heap
that a kill inside a flush could corrupt ("bad heap index"); a writer rewrites such a file
into layout 2 once, under its lock (same name, fingerprint and rows). The writer opens the
file without HDF5's chunk cache, so a full disk fails the write that hit it (CacheFullError,
naming the space needed) instead of a later flush silently leaving zeros; the read-back
check refuses to commit any row that differs from what was computed. Non-finite embeddings
are never stored; a writer drops such rows left by older versions, and the next extract
recomputes them. Each row carries a CRC-32 of its features and sha256: a reader leaves out
rows whose bytes changed on disk (they count as not cached, with a warning) and a writer drops
them, so the next extract recomputes them instead of anything training on flipped bits.
One writer per file: an exclusive ``flock`` on ``<file>.lock`` (released by the kernel when
the process dies, so a killed run never leaves a stale lock).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np

from featsvm.errors import (
    CacheError,
    CacheFullError,
    CacheLockedError,
    CacheMissingError,
    PreprocessingError,
    StaleCacheError,
)
from featsvm.features.key import CACHE_FORMAT_VERSION, FeatureKey, WeightsId
from featsvm.features.preprocess import ImageOptions
from featsvm.features.preprocessing import Preprocessing
from featsvm.features.weights import WeightsInfo
from featsvm.fileio import FileLock, fsync_path, is_no_space

logger = logging.getLogger(__name__)

FORMAT_VERSION = CACHE_FORMAT_VERSION  # part of the fingerprint: never change it for a
# storage-only change
LAYOUT = 2  # storage layout (see the module doc); layout-1 files are rewritten by a writer


class ImageRow(Protocol):
    """What the cache stores per image (a `data.manifest.ManifestRow` or a scanned record)."""

    relpath: str
    sha256: str
    label: str


CHUNK_ROWS = 64
RELPATH_BYTES = 1024
LABEL_BYTES = 32
_DATASETS = ("features", "sha256", "relpath", "label", "rowcrc")


# ------------------------------------------------------------------------------ naming


def weights_key(weights_sha256: str | None) -> str:
    return WeightsId("", weights_sha256).cache_key


def fingerprint(
    backbone: str, weights_sha256: str | None, preprocessing: Preprocessing, precision: str
) -> str:
    """`FeatureKey.fingerprint` of these parts (kept for callers that hold no key)."""
    return FeatureKey(backbone, WeightsId("", weights_sha256), precision,
                      preprocessing).fingerprint


def file_name(
    backbone: str, weights_sha256: str | None, preprocessing: Preprocessing, precision: str
) -> str:
    """`FeatureKey.file_name` of these parts."""
    return FeatureKey(backbone, WeightsId("", weights_sha256), precision, preprocessing).file_name


def cache_path(
    cache_dir: str | os.PathLike[str],
    backbone: str,
    weights_info: WeightsInfo,
    precision: str = "fp32",
    layer: str | None = None,
    options: ImageOptions | None = None,
) -> Path:
    """Path of the cache file for this backbone/weights/precision/layer (may not exist)."""
    from featsvm.features.backbones import get_spec, preprocessing_for

    pre = preprocessing_for(get_spec(backbone), weights_info, layer, options)
    return Path(cache_dir) / FeatureKey(backbone, WeightsId.from_info(weights_info), precision,
                                        pre).file_name


def extract_command(
    data_dir: str | os.PathLike[str] | None,
    backbone: str,
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] = "cache",
    precision: str = "fp32",
    layer: str | None = None,
    options: ImageOptions | None = None,
) -> str:
    """The `featsvm extract ...` command line that (re)builds a cache."""
    parts = ["featsvm", "extract", os.fspath(data_dir) if data_dir else "DATA_DIR",
             "--backbone", backbone]
    if weights is not None:
        parts += ["--weights", os.fspath(weights)]
    if weights_dir is not None:
        parts += ["--weights-dir", os.fspath(weights_dir)]
    parts += ["--cache", os.fspath(cache_dir)]
    if precision != "fp32":  # a compute tag: fp32 / bf16, or <engine>-<precision>
        from featsvm.features.engines import parse_tag

        engine, precision = parse_tag(precision)
        parts += ["--precision", precision] if precision != "fp32" else []
        parts += ["--engine", engine] if engine != "torch" else []
    if layer is not None:
        parts += ["--layer", layer]
    opts = options.to_dict() if options is not None else {}
    for key in ("view", "stain", "colour"):
        if key in opts:
            parts += [f"--{key}", str(opts[key])]
    if "stain" in opts or precision == "int8":  # int8: calibrated on the split's train rows
        parts += ["--split", "SPLIT_CSV"]
    if opts.get("mask_annotation"):
        parts += ["--mask-annotation"]
    return shlex.join(parts)


def locate_cache(
    cache_dir: str | os.PathLike[str],
    backbone: str,
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    precision: str = "fp32",
    layer: str | None = None,
    options: ImageOptions | None = None,
) -> Path:
    """Find the existing cache file for these options (weights resolved as `extract` does).

    Raises CacheMissingError naming the exact `featsvm extract` command when it is absent."""
    from featsvm.features.backbones import feature_key

    key = feature_key(backbone, weights, weights_dir, layer, precision, options)
    path = Path(cache_dir) / key.file_name
    if not path.is_file():
        cmd = extract_command(None, backbone, weights, weights_dir, cache_dir, precision, layer,
                              options)
        raise CacheMissingError(
            f"no feature cache for {key.describe()} in {cache_dir}: expected {path.name}. "
            f"Build it with: {cmd}"
        )
    return path


# ------------------------------------------------------------------------------ locking


def _busy(lock_path: Path, exclusive: bool) -> CacheLockedError:
    what = "write" if exclusive else "read"
    return CacheLockedError(
        f"cannot {what} {lock_path.with_suffix('')}: another featsvm extract process is "
        f"writing it (lock held on {lock_path}). Wait for it to finish; a killed process "
        "releases the lock automatically."
    )


def _cache_lock(path: Path, exclusive: bool) -> FileLock:
    """flock on ``<cache file>.lock``: exclusive for writers, shared for readers."""
    return FileLock(path.with_name(path.name + ".lock"), exclusive, _busy)


# ------------------------------------------------------------------------------ attrs checks


def _decode(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _attrs(f: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    if isinstance(out.get("preprocessing"), str):
        out["preprocessing"] = json.loads(out["preprocessing"])
    return out


def check_consistent(path: Path, attrs: dict[str, Any]) -> FeatureKey:
    """Refuse a file whose attributes do not reproduce the fingerprint in its name; return
    the `FeatureKey` they describe."""
    try:
        key = FeatureKey.from_cache_attrs(attrs)
    except (KeyError, TypeError, PreprocessingError) as exc:
        raise StaleCacheError(
            f"{path} lacks or has a bad cache attribute ({exc}); it is not a featsvm cache or "
            "is damaged: delete it and re-run featsvm extract"
        ) from None
    if key.file_name != path.name:
        raise StaleCacheError(
            f"{path}: its attributes (backbone {key.backbone}, weights "
            f"{key.weights.cache_key[:12]}, precision {key.precision}, layer {key.layer}) "
            f"belong to {key.file_name}, not to this file name: it was renamed or edited. "
            "Refusing a possibly stale cache: delete it and re-run featsvm extract"
        )
    return key


def _attr_value(value: Any) -> Any:
    """HDF5-storable attribute: dicts as JSON, None as "", strings as UTF-8 str."""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if value is None:
        return ""
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        return value
    return str(value)


def _open(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise CacheError(
            f"cannot open feature cache {path} ({exc}); if it is damaged, delete it and re-run "
            "featsvm extract (only the missing images are recomputed into a new file)"
        ) from exc


# ------------------------------------------------------------------------------ writer


def _fixed(values: Sequence[str], width: int) -> np.ndarray:
    """UTF-8 bytes of each string in a fixed-width array, cut at a character boundary."""
    out = []
    for v in values:
        b = v.encode("utf-8")
        if len(b) > width:
            b = b[:width].decode("utf-8", "ignore").encode("utf-8")
        out.append(b)
    return np.array(out, dtype=f"S{width}")


def row_crc(features: np.ndarray, sha256: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's little-endian float32 features followed by its sha256 bytes."""
    feats = np.ascontiguousarray(features, dtype="<f4")
    return np.array([zlib.crc32(bytes(sha256[i]), zlib.crc32(feats[i].tobytes()))
                     for i in range(len(feats))], dtype=np.uint32)


def _damaged_rows(f: h5py.File, n: int) -> np.ndarray:
    """Indices of committed rows whose features or sha256 no longer match their CRC, or whose
    features are not finite (older versions stored NaN/inf)."""
    bad: list[np.ndarray] = []
    has_crc = "rowcrc" in f
    for i in range(0, n, 4096):
        j = min(n, i + 4096)
        block = f["features"][i:j]
        wrong = ~np.isfinite(block).all(axis=1)
        if has_crc:
            wrong |= row_crc(block, f["sha256"][i:j]) != f["rowcrc"][i:j]
        bad.append(i + np.flatnonzero(wrong))
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.1f} MB"


def _create(path: Path, attrs: dict[str, Any], dim: int) -> h5py.File:
    """A new, empty layout-2 file at `path` (overwritten if it exists)."""
    f = h5py.File(path, "w")
    f.create_dataset("features", (0, dim), np.float32, maxshape=(None, dim),
                     chunks=(CHUNK_ROWS, dim))
    f.create_dataset("sha256", (0,), "S64", maxshape=(None,), chunks=(CHUNK_ROWS * 16,))
    f.create_dataset("relpath", (0,), f"S{RELPATH_BYTES}", maxshape=(None,),
                     chunks=(CHUNK_ROWS,))
    f.create_dataset("label", (0,), f"S{LABEL_BYTES}", maxshape=(None,),
                     chunks=(CHUNK_ROWS * 16,))
    f.create_dataset("rowcrc", (0,), np.uint32, maxshape=(None,), chunks=(CHUNK_ROWS * 16,))
    for key, value in attrs.items():
        f.attrs[key] = _attr_value(value)
    f.attrs["n_rows"] = 0
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["layout"] = LAYOUT
    return f


class CacheWriter:
    """Append embeddings to one cache file, holding its exclusive lock until `close()`.

    `dropped` lists the (sha256, relpath, reason) of committed rows that opening the file
    removed (non-finite embeddings written by older versions); they count as not cached.
    """

    def __init__(self, path: str | os.PathLike[str], key: FeatureKey,
                 attrs: dict[str, Any] | None = None) -> None:
        """`key` says what the file holds (its name must be ``key.file_name``); `attrs` are
        informational attributes stored with it (weights source, versions, command...)."""
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped: list[tuple[str, str, str]] = []
        self._rows_to_go = 0
        self._failed: str | None = None
        self._lock = _cache_lock(self.path, exclusive=True)
        self._lock.acquire()
        try:
            self._file = self._open_or_create({**(attrs or {}), **key.cache_attrs()})
            self.n_rows = int(self._file.attrs["n_rows"])
            self._sha = set(_decode(self._file["sha256"][: self.n_rows]))
        except BaseException:
            self.close()
            raise
        self._row_bytes = (int(self._file["features"].shape[1]) * 4 + 64 + RELPATH_BYTES
                           + LABEL_BYTES + 4)

    def _open_writable(self) -> h5py.File:
        try:
            # no chunk cache: every write reaches the file at once, so a full disk fails
            # the write that hit it (with HDF5's cache a later flush could lose rows silently)
            return h5py.File(self.path, "r+", rdcc_nbytes=0)
        except OSError as exc:
            raise CacheError(
                f"cannot open feature cache {self.path} for writing ({exc}); if it is damaged, "
                "delete it and re-run featsvm extract"
            ) from exc

    def _open_or_create(self, attrs: dict[str, Any]) -> h5py.File:
        dim = self.key.dim
        if self.path.exists():
            f = self._open_writable()
            try:
                existing = check_consistent(self.path, _attrs(f))
                if existing != self.key:
                    raise StaleCacheError(
                        f"{self.path} holds {existing.describe()} embeddings (fingerprint "
                        f"{existing.fingerprint[:12]}), not the {self.key.describe()} ones of "
                        f"this run ({self.key.fingerprint[:12]}); refusing to mix embeddings"
                    )
                n = int(f.attrs["n_rows"])
                bad = _damaged_rows(f, n)
                if bad.size or int(f.attrs.get("layout", 1)) != LAYOUT:
                    f.close()
                    self._rewrite(n, bad)
                    f = self._open_writable()
                    n = int(f.attrs["n_rows"])
                for name in _DATASETS:
                    if f[name].shape[0] != n:  # rows of a batch killed before its commit
                        f[name].resize(n, axis=0)
                f.attrs["extract_command"] = attrs.get("extract_command", "")
                f.flush()
            except CacheError:
                with contextlib.suppress(Exception):
                    f.close()
                raise
            except (OSError, RuntimeError, KeyError, ValueError) as exc:
                with contextlib.suppress(Exception):
                    f.close()
                if is_no_space(exc):
                    raise self._full(1 << 20, None, "update") from None
                raise CacheError(
                    f"cannot use feature cache {self.path} ({str(exc).splitlines()[0][:200]}); "
                    "it is damaged: delete it and re-run featsvm extract"
                ) from None
            except BaseException:
                with contextlib.suppress(Exception):
                    f.close()
                raise
            return f
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._check_room(tmp.parent, 1 << 20, "create")
        _create(tmp, attrs, dim).close()
        fsync_path(tmp)
        os.replace(tmp, self.path)  # the file appears complete (empty) or not at all
        fsync_path(self.path.parent)
        return self._open_writable()

    def _rewrite(self, n: int, drop: np.ndarray) -> None:
        """Copy the n committed rows minus `drop` into a layout-2 file, then replace."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with h5py.File(self.path, "r") as old:
            keep = np.setdiff1d(np.arange(n), drop)
            sha, rel = _decode(old["sha256"][:n]), _decode(old["relpath"][:n])
            lab = _decode(old["label"][:n])
            feats_of = old["features"]
            self.dropped = [
                (sha[i], rel[i], "non-finite embedding (NaN or inf)"
                 if not np.isfinite(feats_of[i]).all() else "row changed on disk (CRC mismatch)")
                for i in drop]
            dim = int(old["features"].shape[1])
            self._check_room(tmp.parent, len(keep) * (dim * 4 + 64 + RELPATH_BYTES
                                                      + LABEL_BYTES) + (1 << 20), "rewrite")
            attrs = {k: v for k, v in old.attrs.items()
                     if k not in ("n_rows", "layout", "format_version")}
            with _create(tmp, {}, dim) as new:
                for k, v in attrs.items():
                    new.attrs[k] = v
                m = len(keep)
                for name in _DATASETS:
                    new[name].resize(m, axis=0)
                for i in range(0, m, 4096):
                    idx = keep[i : i + 4096]
                    new["features"][i : i + len(idx)] = old["features"][idx[0] : idx[-1] + 1][
                        idx - idx[0]]
                new["sha256"][:m] = np.array([sha[i].encode() for i in keep], dtype="S64")
                new["relpath"][:m] = _fixed([rel[i] for i in keep], RELPATH_BYTES)
                new["label"][:m] = _fixed([lab[i] for i in keep], LABEL_BYTES)
                for i in range(0, m, 4096):
                    new["rowcrc"][i : i + 4096] = row_crc(new["features"][i : i + 4096],
                                                          new["sha256"][i : i + 4096])
                new.attrs["n_rows"] = m
        fsync_path(tmp)
        os.replace(tmp, self.path)
        fsync_path(self.path.parent)

    def _check_room(self, folder: Path, needed: int, what: str) -> None:
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise self._full(needed, free, what)

    def _full(self, needed: int, free: int | None, what: str) -> CacheFullError:
        if free is None:
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(self.path.parent).free
        return CacheFullError(
            f"disk full: cannot {what} the feature cache {self.path}: free at least "
            f"{_mb(needed)} on {self.path.parent} (now {_mb(free or 0)} free) and re-run the "
            f"same command; the {getattr(self, 'n_rows', 0)} rows committed so far are kept"
        )

    def expect_rows(self, n: int) -> None:
        """Tell the writer how many rows this run still means to append (for the space check
        and the "free at least ..." figure of a full-disk error)."""
        self._rows_to_go = int(n)

    def check_room_for_rows(self, n: int) -> None:
        """Refuse at once (CacheFullError) when the disk cannot hold `n` more rows."""
        self._check_room(self.path.parent, (n + 2 * CHUNK_ROWS) * self._row_bytes, "extend")

    def has(self, sha256: str) -> bool:
        return sha256 in self._sha

    @property
    def cached_sha256(self) -> set[str]:
        return set(self._sha)

    def append(self, features: np.ndarray, rows: Sequence[ImageRow]) -> None:
        """Append one embedding per row (its sha256, relpath and label are stored with it) and
        commit them (read back, ``n_rows``, flush, fsync): durable once this returns. Raises
        CacheFullError (disk full) or CacheError; then nothing of this batch is committed and
        the writer refuses further appends."""
        features = np.asarray(features, dtype=np.float32)
        k = len(rows)
        if features.shape[0] != k:
            raise ValueError(f"append: {features.shape[0]} embeddings for {k} rows")
        sha256 = [r.sha256 for r in rows]
        relpath = [r.relpath for r in rows]
        label = [r.label for r in rows]
        if k == 0:
            return
        bad = [relpath[i] for i in np.flatnonzero(~np.isfinite(features).all(axis=1))]
        if bad:
            raise CacheError(
                f"refusing to store non-finite embeddings (NaN or inf) of {len(bad)} image(s) "
                f"in {self.path}: {', '.join(map(repr, bad[:5]))}"
            )
        if self._failed:
            raise CacheError(f"{self.path}: an earlier write failed ({self._failed}); re-run")
        needed = (max(self._rows_to_go, k) + 2 * CHUNK_ROWS) * self._row_bytes
        free = shutil.disk_usage(self.path.parent).free
        if free < k * self._row_bytes + 4 * CHUNK_ROWS * self._row_bytes:
            self._failed = "disk full"
            raise self._full(needed, free, "append to")
        n0, n1 = self.n_rows, self.n_rows + k
        sha_b = np.array([s.encode() for s in sha256], dtype="S64")
        rel_b, lab_b = _fixed(relpath, RELPATH_BYTES), _fixed(label, LABEL_BYTES)
        crc = row_crc(features, sha_b)
        f = self._file
        try:
            for name in _DATASETS:
                f[name].resize(n1, axis=0)
            f["features"][n0:n1] = features
            f["sha256"][n0:n1] = sha_b
            f["relpath"][n0:n1] = rel_b
            f["label"][n0:n1] = lab_b
            f["rowcrc"][n0:n1] = crc
            f.flush()  # data first, then the commit marker
            if not (np.array_equal(f["features"][n0:n1], features)
                    and np.array_equal(f["sha256"][n0:n1], sha_b)
                    and np.array_equal(f["relpath"][n0:n1], rel_b)
                    and np.array_equal(f["rowcrc"][n0:n1], crc)):
                raise CacheError(
                    f"{self.path}: rows {n0}-{n1 - 1} read back differently from what was "
                    "written (a failing disk or file system?); nothing of this batch was "
                    "committed"
                )
            f.attrs["n_rows"] = n1
            f.flush()
            os.fsync(f.id.get_vfd_handle())
        except CacheError as exc:
            self._failed = str(exc)
            raise
        except (OSError, RuntimeError) as exc:
            self._failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if is_no_space(exc):
                raise self._full(needed, None, "append to") from None
            raise CacheError(
                f"writing the feature cache {self.path} failed ({self._failed}); rows up to "
                f"{n0} stay committed; re-run the same command"
            ) from None
        self.n_rows = n1
        self._sha.update(sha256)
        self._rows_to_go = max(0, self._rows_to_go - k)

    def attr(self, key: str) -> Any:
        """An attribute of the file (None when absent)."""
        value = self._file.attrs.get(key)
        return value.decode() if isinstance(value, bytes) else value

    def note(self, key: str, value: Any) -> None:
        """Record an informational attribute (e.g. the extraction speed) and flush it."""
        try:
            self._file.attrs[key] = _attr_value(value)
            self._file.flush()
        except (OSError, RuntimeError) as exc:
            raise CacheError(f"cannot write attribute {key} to {self.path}: {exc}") from None

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None  # type: ignore[assignment]
        self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ reader


@dataclass
class CachedFeatures:
    path: Path
    features: np.ndarray  # float32 [N, D]
    sha256: list[str]
    relpath: list[str]
    label: list[str]
    attrs: dict[str, Any]

    @property
    def key(self) -> FeatureKey:
        """What these embeddings are (backbone, weights, precision, preprocessing)."""
        return FeatureKey.from_cache_attrs(self.attrs)

    def __len__(self) -> int:
        return len(self.sha256)

    def weights_record(self) -> dict[str, Any]:
        """The weights the cache was made with, as run records name them (`WeightsId` and
        where the file came from)."""
        return {**self.key.weights.to_json(), "source": self.attrs.get("weights_source")}

    def record(self) -> dict[str, Any]:
        """How a run record names the cache it was trained on (config.json's ``cache``)."""
        return {
            "path": str(self.path),
            "fingerprint": self.attrs.get("fingerprint"),
            "layer": self.attrs.get("layer"),
            "dim": int(self.features.shape[1]),
            "precision": self.attrs.get("precision"),
            "n_rows": len(self),
            "created": self.attrs.get("created"),
            "extract_command": self.attrs.get("extract_command"),
            # how the precision was chosen (auto: the CPU probe) and the engine's details
            **{key: json.loads(self.attrs[key]) for key in ("precision_choice", "engine")
               if isinstance(self.attrs.get(key), str) and self.attrs[key].startswith("{")},
        }

    @property
    def index(self) -> dict[str, int]:
        idx = getattr(self, "_index", None)
        if idx is None:
            idx = {s: i for i, s in enumerate(self.sha256)}
            self._index = idx
        return idx

    def lookup(self, sha256: Sequence[str]) -> np.ndarray:
        """Feature rows for `sha256`, in that order; error if any image is not cached."""
        idx = self.index
        missing = [s for s in sha256 if s not in idx]
        if missing:
            cmd = self.attrs.get("extract_command") or "featsvm extract DATA_DIR ..."
            raise CacheMissingError(
                f"{len(missing)} of {len(sha256)} images are not in the feature cache "
                f"{self.path} (first missing sha256: {missing[0][:16]}…). Extract them with: "
                f"{cmd}"
            )
        return self.features[np.fromiter((idx[s] for s in sha256), dtype=np.int64,
                                         count=len(sha256))]


def read_cache(path: str | os.PathLike[str]) -> CachedFeatures:
    """Read a whole cache file (committed rows only), refusing inconsistent files."""
    path = Path(path)
    if not path.is_file():
        raise CacheMissingError(
            f"feature cache {path} does not exist; build it with featsvm extract"
        )
    lock = _cache_lock(path, exclusive=False)
    lock.acquire()
    try:
        with _open(path, "r") as f:
            attrs = _attrs(f)
            check_consistent(path, attrs)
            n = int(attrs.get("n_rows", 0))
            features = np.asarray(f["features"][:n], dtype=np.float32)
            sha_b = f["sha256"][:n]
            sha = _decode(sha_b)
            rel = _decode(f["relpath"][:n])
            lab = _decode(f["label"][:n])
            crc = f["rowcrc"][:n] if "rowcrc" in f else None
    except CacheError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise CacheError(
            f"cannot read feature cache {path} ({str(exc).splitlines()[0][:200]}); it is "
            "damaged: delete it and re-run featsvm extract"
        ) from None
    finally:
        lock.release()
    if crc is not None:
        bad = np.flatnonzero(row_crc(features, sha_b) != crc)
        if bad.size:  # flipped bits on disk: these rows count as not cached
            logger.warning("%s: %d row(s) changed on disk since they were written (CRC "
                           "mismatch) are left out; featsvm extract recomputes them", path,
                           bad.size)
            keep = np.setdiff1d(np.arange(n), bad)
            features = features[keep]
            sha, rel, lab = ([v[i] for i in keep] for v in (sha, rel, lab))
            attrs["damaged_rows"] = int(bad.size)
    return CachedFeatures(path, features, sha, rel, lab, attrs)
