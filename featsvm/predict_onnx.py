"""`featsvm predict --onnx MODEL`: classify images with a model written by `featsvm export`,
with ONNX Runtime, numpy and Pillow only (no torch, no scikit-learn: the optional extra
``featsvm[onnx]`` is all it needs beside the core's numpy / Pillow).

The model's ``featsvm`` metadata holds the preprocessing (`featsvm.features.onnx_input` applies
it), the labels, the run id and its val-chosen abstention threshold; the graph gives the class
probabilities and, when the run had an OOD flag, the flag too: outputs ``ood_score`` and
``ood`` (`featsvm.evaluation.ood_onnx`: the run's `OODFlag` as ONNX nodes on the same
features), which fill the ``ood`` column. A model exported from a run without a flag has
neither output and leaves ``ood`` empty, as `featsvm predict --run` does for that run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featsvm.errors import PredictError
from featsvm.evaluation.ood_onnx import FLAG, SCORE
from featsvm.labels import LABELS
from featsvm.predict import PredictResult, predict_files

META_KEY = "featsvm"  # as featsvm.export writes it
PROBABILITIES = "probabilities"  # the graph's class output (featsvm.export)


@dataclass(frozen=True)
class ExportedRecord:
    """What `predict_files` reads of a run, taken from the model's metadata."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return str(self.config.get("run_id"))


class OnnxPredictor:
    """An exported model: `predict_proba(images)` on PIL RGB images."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise PredictError(f"{path}: no such ONNX file (write one with featsvm export)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise PredictError(f"{path}: not a loadable ONNX model ({exc})") from None
        meta = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if not meta:
            raise PredictError(f"{path}: no featsvm metadata; was it written by featsvm export?")
        self.meta = json.loads(meta)
        if list(self.meta.get("labels") or []) != list(LABELS):
            raise PredictError(f"{path}: labels {self.meta.get('labels')} are not {LABELS}")
        self.record = ExportedRecord(self.path, self.meta)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return dict(self.meta["preprocessing"])

    @property
    def has_ood(self) -> bool:
        """Does the graph compute the run's OOD flag (outputs ``ood_score`` and ``ood``)?"""
        return {SCORE, FLAG} <= {o.name for o in self.session.get_outputs()}

    def _run(self, images: list[Any], outputs: list[str]) -> list[np.ndarray]:
        from featsvm.features.onnx_input import prepare_batch

        x = prepare_batch(images, self.preprocessing)
        return list(self.session.run(outputs, {"image": x}))

    def predict_proba(self, images: list[Any]) -> np.ndarray:
        if not images:
            return np.zeros((0, len(LABELS)))
        return np.asarray(self._run(images, [PROBABILITIES])[0], dtype=np.float64)

    def predict_with_ood(self, images: list[Any]) -> tuple[np.ndarray, list[bool | None]]:
        """Class probabilities and the graph's OOD flag of each image (None without one)."""
        if not images:
            return np.zeros((0, len(LABELS))), []
        if not self.has_ood:
            return self.predict_proba(images), [None] * len(images)
        proba, flags = self._run(images, [PROBABILITIES, FLAG])
        return np.asarray(proba, dtype=np.float64), [bool(v) for v in flags]


def predict_onnx(model: str | os.PathLike[str], inputs: Any, batch_size: int = 16,
                 data_root: str | os.PathLike[str] | None = None, progress: bool = True
                 ) -> PredictResult:
    """Predict every image in `inputs` (files and folders) with the exported `model`."""
    return predict_files(OnnxPredictor(model), inputs, batch_size, data_root, progress)
