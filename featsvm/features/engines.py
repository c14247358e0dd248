"""What computes a backbone's embeddings: torch itself, or its exported ONNX graph in ONNX
Runtime or OpenVINO, at fp32, bf16 or statically quantised int8.

The choice changes the numbers, so it is part of the cache fingerprint through the cache's
*compute tag* (`compute_tag`): plain ``fp32`` / ``bf16`` / ``fp16`` for torch (the names caches
always had), ``<engine>-<precision>`` otherwise (``onnxruntime-int8``, ``openvino-fp32``); the
tag takes the place of the precision in the fingerprint and the file name.

* ``onnxruntime``: fp32, or int8 by static post-training quantisation (QDQ format, per-channel
  int8 weights, uint8 activations with MinMax ranges) calibrated on TRAINING images only
  (`featsvm.features.quantise`).
* ``openvino``: fp32 (inference precision pinned to f32; OpenVINO would otherwise pick bf16 on
  CPUs that have it), bf16, or int8 by running the same quantised QDQ graph.
* ``torch``: what `featsvm.features.extract` always did (autocast for bf16).

Nothing here imports onnxruntime or openvino unless that engine is asked for; they come with
the optional extra ``featsvm[onnx]``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featsvm.errors import DeviceError, UsageError
from featsvm.names import ENGINES, PRECISIONS

TORCH = "torch"
# engines that run the torch module itself (same numbers, same caches as torch): their compute
# tag is the plain precision. An engine that only distributes torch work adds its name here.
TORCH_NUMERICS = {TORCH, "ray"}  # ray: featsvm.features.ray_extract
ENGINE_PRECISIONS = {  # what each non-torch engine computes in
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
}
QUANTISED = "int8"
DEFAULT_CALIBRATION_IMAGES = 64  # train images whose activations set the int8 ranges


def compute_tag(engine: str, precision: str) -> str:
    """The cache's name for how its embeddings were computed (see the module doc)."""
    check_engine(engine, precision)
    return precision if engine in TORCH_NUMERICS else f"{engine}-{precision}"


def parse_tag(tag: str) -> tuple[str, str]:
    """(engine, precision) of a compute tag (a plain precision means torch)."""
    engine, sep, precision = tag.rpartition("-")
    if not sep:
        return TORCH, tag
    return engine, precision


def check_engine(engine: str, precision: str) -> None:
    """Refuse an unknown engine or a precision the engine cannot run (``auto`` must be resolved
    before: it means bf16 or fp32 of torch)."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine in TORCH_NUMERICS:
        if precision == QUANTISED:
            raise DeviceError("int8 needs --engine onnxruntime or --engine openvino (torch "
                              "runs fp32 or bf16)")
        if precision not in PRECISIONS:
            raise DeviceError(f"unknown precision {precision!r} for torch; use one of "
                              f"{', '.join(PRECISIONS)}")
        return
    allowed = ENGINE_PRECISIONS.get(engine)
    if allowed is None:  # an engine another module registers (e.g. a distributed torch run)
        return
    if precision not in allowed:
        raise DeviceError(f"--engine {engine} runs {' or '.join(allowed)}, not {precision}")


def check_network(spec: Any, engine: str) -> None:
    """Refuse a non-torch engine for a hand-crafted baseline (a `BackboneSpec` without a
    network)."""
    if engine != TORCH and spec.image_features is not None:
        raise UsageError(f"{spec.name} is a hand-crafted baseline (no network): it has no "
                         f"--engine {engine}")


def input_size(pre: Any) -> int:
    """Side of the square input an exported graph takes for a `Preprocessing`: the crop, or
    the cell size in the cell view."""
    return int(pre.options.cell_size if pre.options.view == "cells" else pre.crop)


def engine_precision(engine: str, precision: str) -> str:
    """What ``auto`` means for a non-torch engine: fp32 (int8 is asked for explicitly;
    OpenVINO bf16 too)."""
    return "fp32" if engine != TORCH and precision == "auto" else precision


def cache_tag(engine: str, precision: str, device: str = "cpu", backbone: str | None = None
              ) -> str:
    """The compute tag of the cache that `featsvm extract --backbone B --engine E
    --precision P` writes on `device` (``auto`` resolved as extract resolves it, for the
    backbone's `auto_bf16`); what fit and cv look for."""
    if engine == TORCH:
        from featsvm.device import resolve_device, resolve_precision

        precision = resolve_precision(resolve_device(device), precision, auto_bf16(backbone))
    return compute_tag(engine, engine_precision(engine, precision))


def auto_bf16(backbone: str | None) -> bool:
    """May ``auto`` pick bf16 for `backbone` (its spec's `auto_bf16`; True when unnamed)?"""
    from featsvm.features.backbones import get_spec

    return backbone is None or get_spec(backbone).auto_bf16


@dataclass
class Runner:
    """A loaded backbone in a non-torch engine: `__call__` maps a float32 batch
    [N, 3, H, W] (normalised as the backbone's transform makes it) to embeddings [N, dim]."""

    engine: str
    precision: str
    run: Callable[[np.ndarray], np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)  # recorded in the cache attributes

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.run(np.ascontiguousarray(batch, dtype=np.float32)),
                          dtype=np.float32)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def quantised_model_path(cache_file: str | os.PathLike[str]) -> Path:
    """Where the int8 graph an int8 cache was computed with is kept (next to the cache), so
    that `featsvm predict` runs exactly that graph."""
    p = Path(cache_file)
    return p.with_name(p.stem + ".int8.onnx")


def build_runner(
    engine: str,
    precision: str,
    embedder: Any,
    input_size: int,
    calibration: Iterable[np.ndarray] | None = None,
    quantised_path: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> Runner:
    """Export `embedder` (a torch module) to ONNX and load it in `engine` at `precision`.

    int8: an existing graph at `quantised_path` is used as it is (after its sha256 is
    recorded); otherwise the graph is quantised with `calibration` (batches of TRAIN images)
    and saved there."""
    check_engine(engine, precision)
    if engine == TORCH:
        raise UsageError("build_runner is for exported engines; torch runs the module itself")
    from featsvm.features.onnx_export import export_embedder

    with tempfile.TemporaryDirectory(prefix="featsvm-onnx-") as tmp:
        info: dict[str, Any] = {"engine": engine, "precision": precision}
        if precision == QUANTISED:
            qpath = Path(quantised_path) if quantised_path else Path(tmp) / "model.int8.onnx"
            if not qpath.is_file():
                if calibration is None:
                    raise UsageError(f"int8 needs calibration images (train split) or an "
                                     f"existing quantised graph at {qpath}")
                from featsvm.features.quantise import quantise_static

                fp32 = export_embedder(embedder, input_size, Path(tmp) / "model.onnx")
                info["quantisation"] = quantise_static(fp32, qpath, calibration)
            model_path = qpath
            info["model_sha256"] = file_sha256(qpath)
        else:
            model_path = export_embedder(embedder, input_size, Path(tmp) / "model.onnx")
        if engine == "onnxruntime":
            from featsvm.features.ort_runner import load_session

            run, extra = load_session(model_path, threads)
        elif engine == "openvino":
            from featsvm.features.openvino_runner import compile_model

            run, extra = compile_model(model_path, precision, threads)
        else:
            raise UsageError(f"engine {engine!r} has no exported-graph runner here")
        info.update(extra)
    return Runner(engine, precision, run, info)
