"""Static int8 post-training quantisation of an exported backbone (ONNX Runtime).

Weights are quantised per output channel to int8 (depthwise convolutions such as
EfficientNet's lose too much with one scale per tensor); activations to uint8 with the
MinMax ranges seen on the calibration batches, which must be TRAINING images only (the
caller picks them from the train split; `calibration_rows`). QDQ format, as ONNX Runtime
recommends for CPUs; weights keep their full 8-bit range where the CPU has int8 dot-product
instructions (VNNI), 7-bit (``reduce_range``) where it has not, against overflow.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from featsvm.features.onnx_export import INPUT


class _Row(Protocol):
    sha256: str
    split: str


def calibration_rows(rows: Sequence[_Row], n: int) -> list[_Row]:
    """`n` TRAIN rows of a split manifest, the same ones on every machine (smallest sha256
    first: a fixed, label-blind pick); never a val or test row."""
    train = [r for r in rows if r.split == "train"]
    return sorted(train, key=lambda r: r.sha256)[:n]


def calibration_digest(sha256s: Iterable[str]) -> str:
    """sha256 of the calibration images' content hashes, in order (recorded)."""
    return hashlib.sha256("\n".join(sha256s).encode()).hexdigest()


def quantise_static(fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                    batches: Iterable[np.ndarray]) -> dict[str, Any]:
    """Quantise the graph at `fp32_path` into `out_path` with activation ranges from
    `batches` (float32 [n, 3, H, W]); return what was done (recorded in the cache)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from featsvm.device import probe_cpu

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.seen = 0
            self._it: Iterator[np.ndarray] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            if batch is None:
                return None
            self.seen += len(batch)
            return {INPUT: np.ascontiguousarray(batch, dtype=np.float32)}

    vnni = bool(probe_cpu().int8_flags)
    reader = Reader()
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="featsvm-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        part = out_path.with_name(f".{out_path.name}.tmp")
        quantize_static(str(prepared), str(part), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=not vnni,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        os.replace(part, out_path)
    if reader.seen == 0:
        raise ValueError("int8 calibration saw no image")
    return {"method": "onnxruntime static QDQ, MinMax", "weights": "int8 per channel",
            "activations": "uint8", "reduce_range": not vnni,
            "calibration_images": reader.seen}
