"""The HDF5 embedding cache: one file per fingerprint, append-only, resumable, locked.

A fingerprint covers everything that changes an embedding: backbone, weights sha256 (or
``random``), the preprocessing dict (resize, crop, mean/std, embedding layer, model hooks) and
the precision. It is part of the file name, so changed weights or preprocessing always give
another file; a file whose attributes disagree with its name is refused.

Layout (``<cache>/<backbone>-<layer>-<weights8>-<precision>-<fingerprint12>.h5``)::

    features  [N, D] float32   chunked, resizable
    sha256    [N]    S64       content hash of the image file (the lookup key)
    relpath   [N]    str       path of the first file seen with that content
    label     [N]    str       label of that file (information only; use the split manifest)
    attrs: backbone, layer, dim, weights_label, weights_sha256, weights_source, preprocessing
           (JSON), precision, fingerprint, n_rows, featsvm_version, torch_version, created,
           extract_command

Crash safety: every batch is appended, then ``n_rows`` is updated and the file flushed, so a
SIGKILL loses at most the batch in flight; readers and the next writer trust only ``n_rows``
rows. One writer per file: an exclusive ``flock`` on ``<file>.lock`` (released by the kernel
when the process dies, so a killed run never leaves a stale lock).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featsvm.errors import CacheError, CacheLockedError, CacheMissingError, StaleCacheError
from featsvm.features.weights import RANDOM_LABEL, RANDOM_SEED, WeightsInfo
from featsvm.fileio import FileLock

FORMAT_VERSION = 1
CHUNK_ROWS = 64


# ------------------------------------------------------------------------------ naming


def weights_key(weights_sha256: str | None) -> str:
    return weights_sha256 or f"{RANDOM_LABEL}-seed{RANDOM_SEED}"


def fingerprint(
    backbone: str, weights_sha256: str | None, preprocessing: dict[str, Any], precision: str
) -> str:
    payload = {
        "format": FORMAT_VERSION,
        "backbone": backbone,
        "weights": weights_key(weights_sha256),
        "preprocessing": preprocessing,
        "precision": precision,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def file_name(
    backbone: str, weights_sha256: str | None, preprocessing: dict[str, Any], precision: str
) -> str:
    fp = fingerprint(backbone, weights_sha256, preprocessing, precision)
    if weights_sha256:
        wtag = weights_sha256[:8]
    else:  # hand-crafted features (features.handcrafted) have no weights at all
        wtag = "none" if "features" in preprocessing else RANDOM_LABEL
    return f"{backbone}-{preprocessing['layer']}-{wtag}-{precision}-{fp[:12]}.h5"


def cache_path(
    cache_dir: str | os.PathLike[str],
    backbone: str,
    weights_info: WeightsInfo,
    precision: str = "fp32",
    layer: str | None = None,
    options: dict[str, Any] | None = None,
) -> Path:
    """Path of the cache file for this backbone/weights/precision/layer (may not exist)."""
    from featsvm.features.backbones import get_spec, preprocessing_for

    pre = preprocessing_for(get_spec(backbone), weights_info, layer, options)
    return Path(cache_dir) / file_name(backbone, weights_info.sha256, pre, precision)


def extract_command(
    data_dir: str | os.PathLike[str] | None,
    backbone: str,
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] = "cache",
    precision: str = "fp32",
    layer: str | None = None,
    options: dict[str, Any] | None = None,
) -> str:
    """The `featsvm extract ...` command line that (re)builds a cache."""
    parts = ["featsvm", "extract", os.fspath(data_dir) if data_dir else "DATA_DIR",
             "--backbone", backbone]
    if weights is not None:
        parts += ["--weights", os.fspath(weights)]
    if weights_dir is not None:
        parts += ["--weights-dir", os.fspath(weights_dir)]
    parts += ["--cache", os.fspath(cache_dir)]
    if precision != "fp32":
        parts += ["--precision", precision]
    if layer is not None:
        parts += ["--layer", layer]
    opts = options or {}
    for key in ("view", "stain", "colour"):
        if key in opts:
            parts += [f"--{key}", str(opts[key])]
    if "stain" in opts:
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
    options: dict[str, Any] | None = None,
) -> Path:
    """Find the existing cache file for these options (weights resolved as `extract` does).

    Raises CacheMissingError naming the exact `featsvm extract` command when it is absent."""
    from featsvm.features.backbones import describe

    _spec, info, pre = describe(backbone, weights, weights_dir, layer, options)
    path = Path(cache_dir) / file_name(backbone, info.sha256, pre, precision)
    if not path.is_file():
        cmd = extract_command(None, backbone, weights, weights_dir, cache_dir, precision, layer,
                              options)
        raise CacheMissingError(
            f"no feature cache for {backbone} ({info.label}, layer {pre['layer']}, {precision}) "
            f"in {cache_dir}: expected {path.name}. Build it with: {cmd}"
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


def check_consistent(path: Path, attrs: dict[str, Any]) -> None:
    """Refuse a file whose attributes do not reproduce the fingerprint in its name."""
    try:
        expected = file_name(
            attrs["backbone"], attrs.get("weights_sha256") or None, attrs["preprocessing"],
            attrs["precision"],
        )
    except (KeyError, TypeError) as exc:
        raise StaleCacheError(
            f"{path} lacks cache attribute {exc}; it is not a featsvm cache or is damaged: "
            "delete it and re-run featsvm extract"
        ) from None
    if expected != path.name:
        raise StaleCacheError(
            f"{path}: its attributes (backbone {attrs['backbone']}, weights "
            f"{(attrs.get('weights_sha256') or RANDOM_LABEL)[:12]}, precision "
            f"{attrs['precision']}, layer {attrs['preprocessing'].get('layer')}) belong to "
            f"{expected}, not to this file name: it was renamed or edited. Refusing a possibly "
            "stale cache: delete it and re-run featsvm extract"
        )


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


class CacheWriter:
    """Append embeddings to one cache file, holding its exclusive lock until `close()`."""

    def __init__(self, path: str | os.PathLike[str], attrs: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _cache_lock(self.path, exclusive=True)
        self._lock.acquire()
        try:
            self._file = self._open_or_create(attrs)
        except BaseException:
            self._lock.release()
            raise
        self.n_rows = int(self._file.attrs["n_rows"])
        self._sha = set(_decode(self._file["sha256"][: self.n_rows]))

    def _open_or_create(self, attrs: dict[str, Any]) -> h5py.File:
        dim = int(attrs["preprocessing"]["dim"])
        if self.path.exists():
            f = _open(self.path, "r+")
            try:
                existing = _attrs(f)
                check_consistent(self.path, existing)
                for key in ("backbone", "weights_sha256", "precision", "preprocessing"):
                    if existing.get(key) != attrs.get(key):
                        raise StaleCacheError(
                            f"{self.path}: {key} is {existing.get(key)!r} in the file but "
                            f"{attrs.get(key)!r} for this run; refusing to mix embeddings"
                        )
                n = int(f.attrs["n_rows"])
                for name in ("features", "sha256", "relpath", "label"):
                    if f[name].shape[0] != n:  # rows of a batch killed before its commit
                        f[name].resize(n, axis=0)
                f.attrs["extract_command"] = attrs.get("extract_command", "")
                f.flush()
            except BaseException:
                f.close()
                raise
            return f
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        f = h5py.File(tmp, "w")
        str_dt = h5py.string_dtype("utf-8")
        f.create_dataset("features", (0, dim), np.float32, maxshape=(None, dim),
                         chunks=(CHUNK_ROWS, dim))
        f.create_dataset("sha256", (0,), "S64", maxshape=(None,), chunks=(1024,))
        f.create_dataset("relpath", (0,), str_dt, maxshape=(None,), chunks=(1024,))
        f.create_dataset("label", (0,), str_dt, maxshape=(None,), chunks=(1024,))
        for key, value in attrs.items():
            f.attrs[key] = _attr_value(value)
        f.attrs["n_rows"] = 0
        f.attrs["format_version"] = FORMAT_VERSION
        f.close()
        os.replace(tmp, self.path)  # the file appears complete (empty) or not at all
        return _open(self.path, "r+")

    def has(self, sha256: str) -> bool:
        return sha256 in self._sha

    @property
    def cached_sha256(self) -> set[str]:
        return set(self._sha)

    def append(
        self,
        features: np.ndarray,
        sha256: Sequence[str],
        relpath: Sequence[str],
        label: Sequence[str],
    ) -> None:
        """Append rows and commit them (``n_rows`` + flush): durable once this returns."""
        features = np.asarray(features, dtype=np.float32)
        k = len(sha256)
        if features.shape[0] != k or len(relpath) != k or len(label) != k:
            raise ValueError("append: features, sha256, relpath and label lengths differ")
        if k == 0:
            return
        n0, n1 = self.n_rows, self.n_rows + k
        f = self._file
        for name in ("features", "sha256", "relpath", "label"):
            f[name].resize(n1, axis=0)
        f["features"][n0:n1] = features
        f["sha256"][n0:n1] = np.array([s.encode() for s in sha256], dtype="S64")
        f["relpath"][n0:n1] = list(relpath)
        f["label"][n0:n1] = list(label)
        f.flush()  # data first, then the commit marker
        f.attrs["n_rows"] = n1
        f.flush()
        self.n_rows = n1
        self._sha.update(sha256)

    def note(self, key: str, value: Any) -> None:
        """Record an informational attribute (e.g. the extraction speed) and flush it."""
        self._file.attrs[key] = _attr_value(value)
        self._file.flush()

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

    def __len__(self) -> int:
        return len(self.sha256)

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
            sha = _decode(f["sha256"][:n])
            rel = _decode(f["relpath"][:n])
            lab = _decode(f["label"][:n])
    finally:
        lock.release()
    return CachedFeatures(path, features, sha, rel, lab, attrs)
