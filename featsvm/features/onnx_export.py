"""A backbone's embedder as an ONNX graph: one input ``image`` [N, 3, H, W] (normalised as the
backbone's transform makes it), one output ``features`` [N, dim], the batch size free.

Uses torch's TorchScript-based exporter (``dynamo=False``): it needs no extra package
(the torch.export-based default needs onnxscript) and traces every featsvm embedder,
forward hooks included (the Keras average-pool hook of the shared InceptionV3 file).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

OPSET = 17
INPUT = "image"
OUTPUT = "features"


def export_embedder(embedder: Any, input_size: int, path: str | os.PathLike[str]) -> Path:
    """Write `embedder` (fp32, eval mode, on the CPU) as ONNX to `path`; return the path."""
    import torch

    path = Path(path)
    module = embedder.to("cpu", dtype=torch.float32).eval()
    dummy = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(module, (dummy,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "n"}, OUTPUT: {0: "n"}})
    return path
