"""Batched inference of one backbone over an image folder into the HDF5 embedding cache.

Only images whose sha256 is not yet in the cache are computed (identical files once), so a
re-run after new images, a crash or a SIGKILL does just the remaining work. Images are decoded
and transformed in DataLoader workers; the forward pass runs under ``torch.inference_mode``
with channels_last tensors and autocast for bf16/fp16. A file that cannot be read or decoded
is reported by name, skipped, and listed in the summary; the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featsvm import __version__
from featsvm.data.dataset import decode_rgb, read_image_bytes, scan
from featsvm.device import autocast_context, check_precision, precision_record, resolve_device
from featsvm.errors import UsageError
from featsvm.features import engines
from featsvm.features.backbones import BackboneSpec, describe, load_backbone
from featsvm.features.cache import CacheWriter, extract_command
from featsvm.features.key import FeatureKey, WeightsId
from featsvm.features.preprocess import ImageOptions, pool
from featsvm.features.preprocessing import Preprocessing
from featsvm.fileio import sha256_bytes
from featsvm.runs import now_iso, versions

logger = logging.getLogger(__name__)

# Test hook: seconds to sleep after each committed batch (lets a test SIGKILL a real run
# between batches). Never set it in normal use.
SLEEP_ENV = "FEATSVM_TEST_SLEEP_AFTER_BATCH"
NON_FINITE = ("non-finite embedding (NaN or inf): not stored; check the weights and the "
              "precision (fp16 can overflow), then re-run extract")


class ImageRef(Protocol):
    relpath: str
    sha256: str
    label: str


# What a batch source yields: (indices into the records to compute, their embeddings [n, D]
# float32 or None, [(index, reason)] of the records that could not be read).
Batch = tuple[list[int], np.ndarray | None, list[tuple[int, str]]]


class BatchSource(Protocol):
    """Computes embeddings somewhere else than this process (featsvm.features.ray_extract):
    `extract` partitions, writes and summarises; the source yields the batches of `todo` in
    its order. `device` names where the forward passes run (for the summary)."""

    device: str

    def __call__(self, root: Path, todo: Sequence[ImageRef],
                 preprocessing: Preprocessing) -> Iterator[Batch]: ...


@dataclass
class ExtractSummary:
    cache_path: Path
    backbone: str
    layer: str
    dim: int
    weights_label: str
    weights_sha256: str | None
    precision: str  # the compute tag: fp32 / bf16 (torch) or <engine>-<precision>
    device: str
    n_total: int  # image records considered
    n_new: int  # embeddings computed and written in this run
    n_cached: int  # records whose embedding was already in the cache
    n_duplicates: int  # records sharing content with an earlier record (computed once)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    seconds: float = 0.0  # whole call, scan included
    compute_seconds: float = 0.0  # decode + forward + write of the new images
    images_per_s: float = 0.0  # n_new / compute_seconds
    precision_choice: dict[str, Any] = field(default_factory=dict)  # requested / resolved
    engine: str = engines.TORCH

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cache_path"] = str(self.cache_path)
        d["skipped"] = [list(s) for s in self.skipped]
        return d


class _ImageFiles(Dataset):
    """(index, tensor [k,3,H,W] | None, error | None) per image (k = 1 for the field view,
    its cells for the cell view); errors never raise in the worker."""

    def __init__(self, root: Path, items: Sequence[ImageRef], preprocessing: Preprocessing):
        self.root = root
        self.items = list(items)
        self.transform = preprocessing.image_transform()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.items[i]
        path = self.root / item.relpath
        try:
            data = read_image_bytes(path)
            if sha256_bytes(data) != item.sha256:
                return i, None, "file content changed since it was scanned (sha256 differs)"
            return i, self.transform(decode_rgb(data, str(path))), None
        except Exception as exc:  # noqa: BLE001 - any bad file is reported, never fatal
            return i, None, f"{type(exc).__name__}: {exc}"


def _collate(batch: list[tuple[int, torch.Tensor | None, str | None]]):
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, err) for i, x, err in batch if x is None]
    xs = torch.cat([x for _, x in good]) if good else None
    return [i for i, _ in good], xs, bad, [len(x) for _, x in good]


def default_batch_size(device: torch.device, spec: BackboneSpec) -> int:
    """Images per forward pass: on the CPU the backbone's measured fastest batch (e.g. 4 for
    VGG16: 6.6 img/s vs 4.6 at 32 on the 2-core machine, benchmarks/batch_size.py); on an
    accelerator 64."""
    return spec.cpu_batch_size if device.type == "cpu" else 64


def default_workers(device: torch.device) -> int:
    cpus = os.cpu_count() or 1
    if device.type == "cpu":  # the forward pass needs the cores; decoding is cheap
        return 1 if cpus <= 4 else min(4, cpus // 4)
    return min(8, cpus)


def extract(
    data_dir: str | os.PathLike[str],
    backbone: str,
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] = "cache",
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int | None = None,
    workers: int | None = None,
    layer: str | None = None,
    progress: bool = True,
    records: Sequence[ImageRef] | None = None,
    channels_last: bool = True,
    options: ImageOptions | None = None,
    source: BatchSource | None = None,
    engine: str = engines.TORCH,
    split_rows: Sequence[Any] | None = None,
    calibration_images: int = engines.DEFAULT_CALIBRATION_IMAGES,
) -> ExtractSummary:
    """Embed every image of `data_dir` (or the given `records`, relative to it) with
    `backbone` into its cache file; return what was done. See the module doc. `options`:
    view / stain / colour (`featsvm.features.preprocess`), part of the fingerprint.
    `source`: compute the embeddings there instead of in this process (same cache file,
    same rows in the same order); `device`, `batch_size` and `workers` are then its own.
    `precision` auto: see `featsvm.device`; `engine`, and int8 calibrated on
    `calibration_images` TRAIN rows of `split_rows`: see `featsvm.features.engines`."""
    t0 = time.perf_counter()
    root = Path(data_dir)
    dev, choice, tag = _compute(device if source is None else "cpu", precision, engine,
                                bool(split_rows), batch_size, check=source is None,
                                bf16_ok=engines.auto_bf16(backbone))
    precision = choice["resolved"]
    skipped: list[tuple[str, str]] = []
    if records is None:
        found = scan(root)
        records = found.records
        skipped.extend(found.skipped)

    spec, info, pre = describe(backbone, weights, weights_dir, layer, options)
    engines.check_network(spec, engine)
    batch_size = default_batch_size(dev, spec) if batch_size is None else batch_size
    key = FeatureKey(backbone, WeightsId.from_info(info), tag, pre)
    path = Path(cache_dir) / key.file_name
    attrs = {  # besides key.cache_attrs(), which CacheWriter stores
        "weights_source": info.source,
        "precision_choice": choice,
        "featsvm_version": __version__,
        "torch_version": torch.__version__,
        "versions": json.dumps(versions(), sort_keys=True),
        "created": now_iso(),
        "extract_command": extract_command(
            root, backbone, weights, weights_dir, cache_dir, tag, layer, options
        ),
    }
    with CacheWriter(path, key, attrs) as writer:
        todo, n_cached, n_dup = _partition(records, writer)
        t1 = time.perf_counter()
        n_new = 0
        if todo and source is not None:
            n_new = commit(writer, todo, source(root, todo, pre), skipped, progress, backbone)
        elif todo:
            calib = _calibration(root, precision, split_rows, calibration_images, pre, writer)
            n_new = _run(writer, root, todo, backbone, weights, weights_dir, layer, dev,
                         precision, batch_size, workers, progress, channels_last, skipped, pre,
                         engine, calib)
        compute = time.perf_counter() - t1
        device_name = str(dev) if source is None else source.device
        if n_new and compute > 0:  # the report's "extraction images/s" column reads this
            writer.note("images_per_s", n_new / compute)
            writer.note("images_per_s_device", device_name)
    return ExtractSummary(
        cache_path=path, backbone=backbone, layer=key.layer, dim=key.dim,
        weights_label=info.label, weights_sha256=info.sha256, precision=tag,
        device=device_name, n_total=len(records), n_new=n_new, n_cached=n_cached,
        n_duplicates=n_dup, skipped=sorted(skipped), seconds=time.perf_counter() - t0,
        compute_seconds=compute if todo else 0.0,
        images_per_s=n_new / compute if n_new and compute > 0 else 0.0,
        precision_choice=choice, engine=engine,
    )


def _calibration(root: Path, precision: str, split_rows: Sequence[Any] | None, n: int,
                 pre: Preprocessing, writer: CacheWriter) -> list[np.ndarray] | None:
    """int8: batches of `n` TRAIN images of the split (int8 calibration), refusing a cache
    whose quantised graph was calibrated on other images; other precisions: None."""
    from featsvm.features.quantise import calibration_digest, calibration_rows

    if precision != engines.QUANTISED:
        return None
    rows = calibration_rows(split_rows or (), n)
    if not rows:
        raise UsageError("the split manifest has no train rows to calibrate int8 on")
    digest = calibration_digest(r.sha256 for r in rows)
    before = writer.attr("int8_calibration_sha256")
    if before and before != digest:
        raise UsageError(
            f"{writer.path} was computed with an int8 graph calibrated on other train images "
            f"(calibration sha256 {before[:12]}…, now {digest[:12]}…); use another --cache")
    writer.note("int8_calibration_sha256", digest)
    files = _ImageFiles(root, rows, pre)
    stacks = [x for _i, x, err in (files[i] for i in range(len(files))) if err is None]
    if not stacks:
        raise UsageError("no calibration image could be read")
    batch = torch.cat(stacks).numpy()
    return [batch[i:i + 8] for i in range(0, len(batch), 8)]


def _compute(device: str, precision: str, engine: str, has_split: bool,
             batch_size: int | None, check: bool = True, bf16_ok: bool = True
             ) -> tuple[torch.device, dict[str, Any], str]:
    """(device, precision record, compute tag) for an extract call; refuses what cannot run
    (`check` False: a batch source checks its own device and precision; `bf16_ok`: the
    backbone's `auto_bf16`)."""
    if batch_size is not None and batch_size < 1:
        raise UsageError("batch_size must be at least 1")
    dev = resolve_device(device)
    if engine != engines.TORCH and dev.type != "cpu":
        if device != "auto":
            raise UsageError(f"--engine {engine} runs on the CPU here; use --device cpu")
        dev = resolve_device("cpu")
    choice = precision_record(dev, engines.engine_precision(engine, precision), bf16_ok)
    if engine == engines.TORCH and check:
        check_precision(dev, choice["resolved"])
    tag = engines.compute_tag(engine, choice["resolved"])
    if choice["resolved"] == engines.QUANTISED and not has_split:
        raise UsageError("int8 is calibrated on training images: give the split manifest "
                         "(--split) whose TRAIN rows to calibrate on")
    return dev, choice, tag


def _embedder(backbone: str, weights: str | os.PathLike[str] | None,
              weights_dir: str | os.PathLike[str] | None, layer: str | None, engine: str,
              dev: torch.device, precision: str, channels_last: bool,
              preprocessing: Preprocessing, writer: CacheWriter,
              calibration: list[np.ndarray] | None) -> Any:
    """(images, cells per image) -> one float32 row per image, computed by `engine`: torch
    (`Embedder`), or the exported graph in onnxruntime / openvino (engine details noted in the
    cache)."""
    if engine == engines.TORCH:
        return Embedder(backbone, weights, weights_dir, layer, dev, precision, channels_last)
    loaded = load_backbone(backbone, weights, weights_dir, layer)
    runner = engines.build_runner(
        engine, precision, loaded.embedder, engines.input_size(preprocessing), calibration,
        engines.quantised_model_path(writer.path) if calibration is not None else None)
    writer.note("engine", runner.info)
    return lambda xs, counts: pool(runner(xs.numpy()), counts)


def _partition(records: Sequence[ImageRef], writer: CacheWriter
               ) -> tuple[list[ImageRef], int, int]:
    """(records to compute, number already cached, number of duplicate files); refuses at
    once (CacheFullError) when the disk cannot hold the rows to compute."""
    seen: set[str] = set()
    todo: list[ImageRef] = []
    n_cached = n_dup = 0
    for rec in records:
        if rec.sha256 in seen:
            n_dup += 1
            continue
        seen.add(rec.sha256)
        if writer.has(rec.sha256):
            n_cached += 1
        else:
            todo.append(rec)
    for _sha, rel, why in writer.dropped:  # bad rows of an older version: recomputed
        logger.warning("dropped the cached row of %s: %s; recomputing it", rel, why)
    writer.expect_rows(len(todo))
    if todo:
        writer.check_room_for_rows(len(todo))
    return todo, n_cached, n_dup


class Embedder:
    """Backbone `backbone` on `dev`, loaded once: (images [n, 3, H, W], cells per image) ->
    one float32 row per image. The single forward-pass code of every extraction path."""

    def __init__(self, backbone: str, weights: str | os.PathLike[str] | None,
                 weights_dir: str | os.PathLike[str] | None, layer: str | None,
                 dev: torch.device, precision: str, channels_last: bool = True) -> None:
        loaded = load_backbone(backbone, weights, weights_dir, layer)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = loaded.embedder.to(dev, memory_format=self.memory_format).eval()
        self.dev = dev
        self.precision = precision
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def __call__(self, xs: torch.Tensor, counts: list[int]) -> np.ndarray:
        with torch.inference_mode():
            xs = xs.to(self.dev, non_blocking=True, memory_format=self.memory_format)
            with autocast_context(self.dev, self.precision):
                emb = self.model(xs)
            return pool(emb.float().cpu().numpy(), counts)  # cells -> one row


def commit(writer: CacheWriter, todo: Sequence[ImageRef], batches: Iterable[Batch],
           skipped: list[tuple[str, str]], progress: bool, backbone: str) -> int:
    """Write `batches` (in the order given) into `writer`: unreadable files and non-finite
    rows go to `skipped`, the rest are appended (flushed, checked). Returns the rows
    written."""
    from tqdm import tqdm

    sleep_after = float(os.environ.get(SLEEP_ENV, "0") or 0)
    n_new = 0
    bar = tqdm(total=len(todo), unit="img", desc=f"extract {backbone}", disable=not progress,
               dynamic_ncols=True)
    try:
        for idx, feats, bad in batches:
            for i, reason in bad:
                skipped.append((todo[i].relpath, reason))
                bar.write(f"skipped {todo[i].relpath}: {reason}")
            if feats is not None:
                finite = np.isfinite(feats).all(axis=1)
                for j in np.flatnonzero(~finite):
                    rel = todo[idx[j]].relpath
                    skipped.append((rel, NON_FINITE))
                    bar.write(f"skipped {rel}: {NON_FINITE}")
                items = [todo[i] for i, ok in zip(idx, finite, strict=True) if ok]
                writer.append(feats[finite], items)
                n_new += len(items)
            bar.update(len(idx) + len(bad))
            if sleep_after:
                # test hook (SLEEP_ENV): at WARNING so it reaches stderr unconfigured
                logger.warning("featsvm-test: committed %d rows", writer.n_rows)
                time.sleep(sleep_after)
    finally:
        bar.close()
    return n_new


def _run(
    writer: CacheWriter,
    root: Path,
    todo: list[ImageRef],
    backbone: str,
    weights: str | os.PathLike[str] | None,
    weights_dir: str | os.PathLike[str] | None,
    layer: str | None,
    dev: torch.device,
    precision: str,
    batch_size: int,
    workers: int | None,
    progress: bool,
    channels_last: bool,
    skipped: list[tuple[str, str]],
    preprocessing: Preprocessing,
    engine: str = engines.TORCH,
    calibration: list[np.ndarray] | None = None,
) -> int:
    embed = _embedder(backbone, weights, weights_dir, layer, engine, dev, precision,
                      channels_last, preprocessing, writer, calibration)
    n_workers = default_workers(dev) if workers is None else workers
    loader = DataLoader(
        _ImageFiles(root, todo, preprocessing),
        batch_size=batch_size,
        shuffle=False,
        num_workers=n_workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if n_workers > 0 else None,
    )

    def batches() -> Iterator[Batch]:
        for idx, xs, bad, counts in loader:
            yield idx, None if xs is None else embed(xs, counts), bad

    return commit(writer, todo, batches(), skipped, progress, backbone)
