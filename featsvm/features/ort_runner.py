"""An exported backbone in ONNX Runtime (CPU execution provider)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from featsvm.features.onnx_export import INPUT


def load_session(path: str | os.PathLike[str], threads: int | None = None
                 ) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """(batch -> embeddings, what to record) for the ONNX graph at `path`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {INPUT: batch})[0]

    return run, {"onnxruntime_version": ort.__version__,
                 "provider": session.get_providers()[0]}
