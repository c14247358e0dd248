"""`featsvm export`: a head run as ONE ONNX graph, image in, class probabilities out.

The backbone is the run's own (weights found as `featsvm predict` finds them, sha256-checked),
exported at fp32 (`featsvm.features.onnx_export`); the head, with its scaler, PCA and
probability map, is `featsvm.models.onnx_head`. The two graphs are joined by
``onnx.compose.merge_models``: input ``image`` [N, 3, H, W] (float32, the backbone's transform
applied: `featsvm.features.onnx_input`), output ``probabilities`` [N, 4] in LABELS order.
The model's metadata (``featsvm`` key, JSON) carries what `featsvm predict --onnx` needs and
nothing else: run id, model name, labels, the preprocessing dict, the abstention threshold,
the sha256 of the backbone weights and of the head file, and the parity check.

Parity check (printed, stored in the metadata and in ``<out>.parity.json``): with the data
folder, the exported graph scores the run's TEST images and is compared with the run's own
``predictions.csv`` (its probabilities came from cached features): agreement of the predicted
class, largest probability difference. Without data, a few seeded synthetic images are scored
by the graph and by the run's torch predictor.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featsvm import __version__
from featsvm.errors import PredictError
from featsvm.fileio import atomic_path, write_json_atomic
from featsvm.labels import LABELS
from featsvm.runs import recorded_sha256

META_KEY = "featsvm"
SYNTHETIC_IMAGES = 8


@dataclass
class ExportResult:
    path: Path
    parity: dict[str, Any]
    seconds: float


def export_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str],
               weights: str | os.PathLike[str] | None = None,
               weights_dir: str | os.PathLike[str] | None = None,
               data_dir: str | os.PathLike[str] | None = None,
               trust_pickle: bool = False) -> ExportResult:
    """Write the run's backbone + head as one ONNX file at `out`; check it (module doc)."""
    import onnx

    from featsvm.features.onnx_input import check_exportable
    from featsvm.predict import Predictor

    t0 = time.perf_counter()
    predictor = Predictor.from_run(run_dir, weights, weights_dir, "cpu", trust_pickle,
                                   engine="torch")
    record = predictor.record
    if predictor.kind != "head":
        raise PredictError(f"{run_dir}: export handles head runs (backbone + SVM / logistic "
                           f"head); this is a {predictor.kind} run")
    pre = predictor.preprocessing.to_json()  # the JSON form: what predict --onnx reads
    check_exportable(pre)
    model = _joined(predictor.parts["embedder"], predictor.parts["head"], pre)
    meta = {
        "run_id": record.run_id, "model": record.config.get("model"), "labels": list(LABELS),
        "preprocessing": pre, "abstention": record.config.get("abstention") or {},
        "weights": record.config.get("weights"),
        "head_sha256": recorded_sha256(record.config, str(record.config.get("model_file"))),
        "featsvm_version": __version__, "input": "image", "output": "probabilities",
    }
    parity = _parity(model.SerializeToString(), predictor, data_dir)
    meta["parity"] = parity
    _set_meta(model, meta)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        onnx.save_model(model, str(tmp))
    write_json_atomic(parity_path(out), parity)
    return ExportResult(out, parity, time.perf_counter() - t0)


def parity_path(out: str | os.PathLike[str]) -> Path:
    p = Path(out)
    return p.with_name(p.name + ".parity.json")


def _set_meta(model: Any, meta: dict[str, Any]) -> None:
    for prop in list(model.metadata_props):
        if prop.key == META_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta, sort_keys=True)


def _joined(embedder: Any, head: Any, pre: dict[str, Any]) -> Any:
    """backbone graph (image -> features) + head graph (features -> probabilities)."""
    import onnx
    from onnx import compose

    from featsvm.features.onnx_export import OUTPUT, export_embedder
    from featsvm.models.onnx_head import INPUT, head_to_onnx

    with tempfile.TemporaryDirectory(prefix="featsvm-export-") as tmp:
        backbone = onnx.load(str(export_embedder(embedder, int(pre["crop"]),
                                                 Path(tmp) / "backbone.onnx")))
    head_model = compose.add_prefix(head_to_onnx(head, int(pre["dim"])), "head/",
                                    rename_outputs=False)
    version = max(backbone.ir_version, head_model.ir_version)
    backbone.ir_version = head_model.ir_version = version
    merged = compose.merge_models(backbone, head_model, io_map=[(OUTPUT, f"head/{INPUT}")],
                                  producer_name="featsvm", producer_version=__version__)
    onnx.checker.check_model(merged)
    return merged


def _parity(model_bytes: bytes, predictor: Any, data_dir: str | os.PathLike[str] | None
            ) -> dict[str, Any]:
    import onnxruntime as ort

    from featsvm.features.onnx_input import prepare_batch

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    pre = predictor.preprocessing.to_json()

    def onnx_proba(images: list[Any]) -> np.ndarray:
        out = [session.run(None, {"image": prepare_batch(images[i:i + 16], pre)})[0]
               for i in range(0, len(images), 16)]
        return np.concatenate(out) if out else np.zeros((0, len(LABELS)))

    if data_dir is not None:
        from featsvm.data.dataset import decode_rgb, read_image_bytes

        test = predictor.record.predictions().select("test")
        root = Path(data_dir)
        images = [decode_rgb(read_image_bytes(root / rel), rel) for rel in test.relpath]
        ref, against, where = test.proba, "the run's predictions.csv", "test split"
    else:
        rng = np.random.default_rng(0)
        from PIL import Image

        images = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
                  for _ in range(SYNTHETIC_IMAGES)]
        ref, against, where = (predictor.predict_proba(images), "the run's torch predictor",
                               "seeded synthetic images")
    got = onnx_proba(images)
    agree = got.argmax(axis=1) == ref.argmax(axis=1)
    return {"images": len(images), "on": where, "against": against,
            "agreement": float(agree.mean()) if len(agree) else None,
            "n_disagree": int((~agree).sum()),
            "max_abs_prob_diff": float(np.abs(got - ref).max()) if len(ref) else None}
