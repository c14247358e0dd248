"""`featsvm extract --engine ray`: the forward passes on a pool of Ray actors, the cache written
here, by `featsvm.features.extract` itself.

The driver (this process) scans or takes the records, opens the cache file (same name,
fingerprint and format as a single-process run), leaves out what is cached, and hands the rest
to `RaySource`: batches of `batch_size` records (the same batches the single-process
DataLoader makes), each sent to the least busy of N actors. Every actor loads the backbone
once (`extract.Embedder`, the single-process forward pass) and reads and decodes its images
itself (`extract._ImageFiles`, with the same sha256 check), so workers need the image folder
and the weights at the same paths as the driver; only embeddings travel back. Results come
back in submission order and are committed batch by batch (`extract.commit`), so the file
holds the same rows in the same order as a single-process run, the driver holds at most
``2 x N`` batches of embeddings, and a killed driver loses at most those: the next run
computes only what is missing.

A lost worker (its process killed, its node gone) is restarted by Ray (``max_restarts``) and
its queued and running batches are sent again (``max_task_retries``); the embedding of a
batch does not depend on which actor computes it. Past the retries the run stops with a
ClusterError and the committed rows stay.

Why Ray core and not Ray Data: the input is a list of paths, the output one HDF5 file that
one process writes; an actor pool with an ordered window is all the streaming needed, and it
keeps the single-process code for decoding, the forward pass and the writer. Ray Data would
add pyarrow/pandas to the install and an extra copy of every batch through Arrow blocks.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featsvm import __version__
from featsvm.cluster import require_ray, session
from featsvm.device import check_precision, resolve_device
from featsvm.errors import ClusterError, UsageError
from featsvm.features.backbones import get_spec
from featsvm.features.extract import (
    Batch,
    Embedder,
    ExtractSummary,
    ImageRef,
    _collate,
    _ImageFiles,
    default_batch_size,
    extract,
)
from featsvm.features.preprocess import ImageOptions
from featsvm.features.preprocessing import Preprocessing

logger = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2  # one batch computing, one queued: no actor waits for the driver
DEFAULT_RETRIES = 3  # actor restarts, and re-sends of one batch


@dataclass(frozen=True)
class _Ref:
    """What a worker needs of a record (picklable, small)."""

    relpath: str
    sha256: str
    label: str


class _Worker:
    """One Ray actor: the backbone loaded once, then batches of records -> embeddings."""

    def __init__(self, root: str, preprocessing: Preprocessing, backbone: str,
                 weights: str | None, weights_dir: str | None, layer: str | None, device: str,
                 precision: str, channels_last: bool, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.dev = resolve_device(device)
        check_precision(self.dev, precision)
        self.embed = Embedder(backbone, weights, weights_dir, layer, self.dev, precision,
                              channels_last)
        self.files = _ImageFiles(Path(root), [], preprocessing)

    def info(self) -> dict[str, Any]:
        import torchvision

        return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(self.dev),
                "featsvm": __version__, "torch": torch.__version__,
                "torchvision": torchvision.__version__}

    def embed_batch(self, indices: list[int], refs: list[_Ref]) -> Batch:
        self.files.items = refs
        loaded = []
        for k, i in enumerate(indices):
            _, x, err = self.files[k]
            loaded.append((i, x, err))
        idx, xs, bad, counts = _collate(loaded)
        return idx, None if xs is None else self.embed(xs, counts), bad


class RaySource:
    """`extract.BatchSource` on a Ray cluster (see the module doc). `workers`: actors
    (default: the cluster's CPUs / `cpus_per_worker`, or its GPUs / `gpus_per_worker`);
    `device` is resolved on each worker ("auto" = its GPU when it was given one)."""

    def __init__(self, backbone: str, weights: str | os.PathLike[str] | None,
                 weights_dir: str | os.PathLike[str] | None, layer: str | None,
                 device: str = "auto", precision: str = "fp32", batch_size: int | None = None,
                 workers: int | None = None, gpus_per_worker: float = 0.0,
                 cpus_per_worker: float = 1.0, channels_last: bool = True,
                 retries: int = DEFAULT_RETRIES) -> None:
        if gpus_per_worker < 0 or cpus_per_worker <= 0:
            raise UsageError("--gpus-per-worker must be >= 0 and CPUs per worker > 0")
        if workers is not None and workers < 1:
            raise UsageError("--workers must be at least 1 with --engine ray")
        if gpus_per_worker == 0 and device.startswith(("cuda", "mps")):
            raise UsageError(f"--device {device} with --engine ray needs --gpus-per-worker > 0")
        if gpus_per_worker == 0:
            check_precision(torch.device("cpu"), precision)  # fp16 is refused on a CPU
        self.backbone = backbone
        self.weights = None if weights is None else os.fspath(weights)
        self.weights_dir = None if weights_dir is None else os.fspath(weights_dir)
        self.layer = layer
        self.requested_device = device if gpus_per_worker > 0 else "cpu"
        self.precision = precision
        on_gpu = torch.device("cuda" if gpus_per_worker > 0 else "cpu")
        self.batch_size = batch_size or default_batch_size(on_gpu, get_spec(backbone))
        self.workers = workers
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.channels_last = channels_last
        self.retries = retries
        self.device = f"ray ({'gpu' if gpus_per_worker > 0 else 'cpu'})"
        self.worker_info: list[dict[str, Any]] = []  # after start: pid, host, device, versions
        self.batches_done = 0
        self.ready_seconds = 0.0  # from the call until every actor had loaded the model

    def _n_workers(self, ray: Any) -> int:
        """The number of actors: --workers, else what the cluster holds; refuses more than
        it holds (the extra actors would wait for resources forever)."""
        res = ray.cluster_resources()
        kind, per = ("GPU", self.gpus_per_worker) if self.gpus_per_worker > 0 else \
            ("CPU", self.cpus_per_worker)
        fits = int(res.get(kind, 0) // per)
        if self.workers is None:
            if fits < 1:
                raise UsageError(f"the Ray cluster has {res.get(kind, 0):g} {kind}s, fewer than "
                                 f"one worker needs ({per:g})")
            return fits
        if self.workers > fits:
            raise UsageError(
                f"--workers {self.workers} need {self.workers * per:g} {kind}s but the Ray "
                f"cluster has {res.get(kind, 0):g}: use --workers {max(fits, 1)} or fewer (or "
                "start more nodes first)")
        return self.workers

    def _start(self, ray: Any, root: Path, preprocessing: Preprocessing,
               actors: list[Any]) -> None:
        """Start the actors (appended to `actors`, so that the caller can stop them whatever
        happens) and wait until each has loaded the model."""
        actor = ray.remote(_Worker).options(
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
            max_restarts=self.retries, max_task_retries=self.retries)
        threads = max(1, int(self.cpus_per_worker))
        for _ in range(self._n_workers(ray)):
            actors.append(actor.remote(str(root.resolve()), preprocessing, self.backbone,
                                       self.weights, self.weights_dir, self.layer,
                                       self.requested_device, self.precision,
                                       self.channels_last, threads))
        try:
            self.worker_info = ray.get([a.info.remote() for a in actors])
        except ray.exceptions.RayError as exc:
            raise ClusterError(f"a Ray worker could not start: {_cause(exc)}") from exc
        import torchvision

        here = {"featsvm": __version__, "torch": torch.__version__,
                "torchvision": torchvision.__version__}
        for info in self.worker_info:
            diff = {k: (v, info[k]) for k, v in here.items() if info[k] != v}
            if diff:
                raise ClusterError(
                    f"Ray worker on {info['host']} runs other versions than this driver "
                    f"({', '.join(f'{k} {a} here, {b} there' for k, (a, b) in diff.items())}); "
                    "its embeddings would not match the cache's record")
        logger.info("ray: %d workers (%s)", len(actors),
                    ", ".join(f"{i['host']}:{i['pid']} {i['device']}" for i in self.worker_info))

    def __call__(self, root: Path, todo: Sequence[ImageRef],
                 preprocessing: Preprocessing) -> Iterator[Batch]:
        ray = require_ray()
        actors: list[Any] = []
        busy: list[int] = []
        window: deque[tuple[int, Any]] = deque()  # (actor, result ref), submission order
        starts = iter(range(0, len(todo), self.batch_size))

        def submit() -> bool:
            start = next(starts, None)
            if start is None:
                return False
            a = min(range(len(actors)), key=busy.__getitem__)
            indices = list(range(start, min(start + self.batch_size, len(todo))))
            refs = [_Ref(todo[i].relpath, todo[i].sha256, todo[i].label) for i in indices]
            window.append((a, actors[a].embed_batch.remote(indices, refs)))
            busy[a] += 1
            return True

        try:
            t0 = time.perf_counter()
            self._start(ray, root, preprocessing, actors)
            self.ready_seconds = time.perf_counter() - t0
            busy.extend([0] * len(actors))
            while len(window) < IN_FLIGHT_PER_WORKER * len(actors) and submit():
                pass
            while window:
                a, ref = window.popleft()
                try:
                    idx, feats, bad = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise ClusterError(
                        f"a Ray worker failed past {self.retries} retries: {_cause(exc)}; the "
                        "rows committed so far are in the cache, run the same command again "
                        "to compute the rest") from exc
                busy[a] -= 1
                submit()
                self.batches_done += 1
                yield idx, None if feats is None else np.asarray(feats), bad
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def extract_ray(
    data_dir: str | os.PathLike[str],
    backbone: str,
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] = "cache",
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int | None = None,
    layer: str | None = None,
    progress: bool = True,
    records: Sequence[ImageRef] | None = None,
    options: ImageOptions | None = None,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    channels_last: bool = True,
    retries: int = DEFAULT_RETRIES,
    source: RaySource | None = None,
) -> ExtractSummary:
    """`featsvm.features.extract.extract` with the forward passes on Ray (module doc).
    `address`: ``auto`` / ``HOST:PORT`` / None (RAY_ADDRESS, else a local cluster); inside
    an initialised Ray that one is used. `source`: a prepared RaySource (tests read its
    worker_info)."""
    source = source or RaySource(backbone, weights, weights_dir, layer, device, precision,
                                 batch_size, workers, gpus_per_worker, cpus_per_worker,
                                 channels_last, retries)
    with session(address):
        return extract(data_dir, backbone, weights=weights, weights_dir=weights_dir,
                       cache_dir=cache_dir, precision=precision, layer=layer,
                       progress=progress, records=records, options=options, source=source)
