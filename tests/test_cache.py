"""HDF5 cache: round trip, lookup, uncommitted rows, lock, stale-file refusal, naming."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pytest

from featsvm.features.backbones import get_spec, preprocessing_for
from featsvm.features.cache import (
    CacheLockedError,
    CacheMissingError,
    CacheWriter,
    StaleCacheError,
    cache_path,
    locate_cache,
    read_cache,
)
from featsvm.features.key import FeatureKey, WeightsId
from featsvm.features.weights import WeightsInfo

RANDOM = WeightsInfo("random", None, "random init")


EXTRA = {"extract_command": "featsvm extract DATA --backbone alexnet --weights none"}


def _key(info: WeightsInfo = RANDOM, precision: str = "fp32", layer: str | None = None
         ) -> FeatureKey:
    pre = preprocessing_for(get_spec("alexnet"), info, layer)
    return FeatureKey("alexnet", WeightsId.from_info(info), precision, pre)


def _writer(path: Path, key: FeatureKey) -> CacheWriter:
    return CacheWriter(path, key, EXTRA)


class Row(NamedTuple):
    relpath: str
    sha256: str
    label: str


def _rows(n: int, dim: int, start: int = 0):
    feats = np.arange(start * dim, (start + n) * dim, dtype=np.float32).reshape(n, dim)
    return feats, [Row(f"Original/Benign/{i}.jpg", f"{i:064x}", "benign")
                   for i in range(start, start + n)]


def test_round_trip_and_lookup(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "alexnet", RANDOM, "fp32", layer="gap")
    assert path.name.startswith("alexnet-gap-random-fp32-")
    with _writer(path, _key(layer="gap")) as w:
        w.append(*_rows(3, 256))
        w.append(*_rows(2, 256, start=3))
        assert w.has(f"{4:064x}") and w.n_rows == 5
    c = read_cache(path)
    assert c.features.shape == (5, 256) and c.features.dtype == np.float32
    assert c.attrs["preprocessing"]["layer"] == "gap" and c.attrs["n_rows"] == 5
    want = [f"{4:064x}", f"{0:064x}"]
    assert np.array_equal(c.lookup(want), c.features[[4, 0]])
    with pytest.raises(CacheMissingError, match=r"1 of 2 images .* featsvm extract"):
        c.lookup([f"{1:064x}", "f" * 64])
    # re-opening resumes: rows stay, new rows append
    with _writer(path, _key(layer="gap")) as w:
        assert w.n_rows == 5
        w.append(*_rows(1, 256, start=5))
    assert len(read_cache(path)) == 6


def test_uncommitted_rows_are_ignored_and_truncated(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "alexnet", RANDOM, "fp32", layer="gap")
    with _writer(path, _key(layer="gap")) as w:
        w.append(*_rows(2, 256))
    with h5py.File(path, "r+") as f:  # a batch written but killed before its commit
        for name in ("features", "sha256", "relpath", "label"):
            f[name].resize(4, axis=0)
    assert len(read_cache(path)) == 2
    with _writer(path, _key(layer="gap")) as w:
        assert w.n_rows == 2
    with h5py.File(path, "r") as f:
        assert f["features"].shape[0] == 2


def test_second_writer_is_refused(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "alexnet", RANDOM, "fp32")
    first = _writer(path, _key())
    try:
        with pytest.raises(CacheLockedError, match="another featsvm extract"):
            _writer(path, _key())
        with pytest.raises(CacheLockedError):
            read_cache(path)
    finally:
        first.close()
    _writer(path, _key()).close()  # released


def test_stale_and_renamed_files_are_refused(tmp_path: Path) -> None:
    a = WeightsInfo("file a", "a" * 64, "a.pth")
    b = WeightsInfo("file b", "b" * 64, "b.pth")
    pa, pb = cache_path(tmp_path, "alexnet", a), cache_path(tmp_path, "alexnet", b)
    assert pa != pb  # changed weights -> another file
    assert pa != cache_path(tmp_path, "alexnet", a, layer="gap")  # changed preprocessing
    assert pa != cache_path(tmp_path, "alexnet", a, precision="bf16")
    with _writer(pa, _key(a)) as w:
        w.append(*_rows(1, 4096))
    with pytest.raises(StaleCacheError, match="refusing to mix"):
        _writer(pa, _key(b))  # a writer with other weights on this file
    shutil.copy(pa, pb)  # a file whose contents do not match its name
    with pytest.raises(StaleCacheError, match="renamed or edited"):
        read_cache(pb)
    with pytest.raises(StaleCacheError):
        _writer(pb, _key(b))


def test_locate_cache_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(CacheMissingError) as err:
        locate_cache(tmp_path / "cache", "alexnet", weights="none", layer="gap")
    msg = str(err.value)
    assert "featsvm extract DATA_DIR --backbone alexnet --weights none" in msg
    assert "--layer gap" in msg
    path = cache_path(tmp_path / "cache", "alexnet", RANDOM, layer="gap")
    _writer(path, _key(layer="gap")).close()
    assert locate_cache(tmp_path / "cache", "alexnet", weights="none", layer="gap") == path
