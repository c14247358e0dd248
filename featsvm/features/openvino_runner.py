"""An exported backbone in OpenVINO (CPU plugin).

The inference precision is pinned (``f32`` for fp32, ``bf16`` for bf16): left alone, OpenVINO
picks bf16 by itself on CPUs that have it, which would make "fp32" features differ by machine.
An int8 graph (QDQ, `featsvm.features.quantise`) runs in int8 whatever the hint says.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def compile_model(path: str | os.PathLike[str], precision: str, threads: int | None = None
                  ) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """(batch -> embeddings, what to record) for the ONNX graph at `path`."""
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINTS[precision]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(batch: np.ndarray) -> np.ndarray:
        return np.array(request.infer([batch])[compiled.output(0)])

    return run, {"openvino_version": ov.__version__, "inference_precision": _HINTS[precision]}
