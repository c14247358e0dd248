"""`featsvm export`: a head run as ONE ONNX graph, image in, class probabilities (and the run's
OOD flag) out.

The backbone is the run's own: for a run fitted on int8 features (``--engine onnxruntime |
openvino --precision int8`` at extract time) the very quantised QDQ graph its cache was
computed with (kept next to the cache, `featsvm.features.engines.quantised_model_path`,
sha256-checked against the run's record; a missing graph is a `PredictError` naming its
path); for every other run the network (weights found as `featsvm predict` finds them,
sha256-checked) exported at fp32 (`featsvm.features.onnx_export`) — a bf16 run exports fp32
too, ONNX Runtime's CPU provider having no bf16 convolutions. The head, with its scaler, PCA
and probability map, is `featsvm.models.onnx_head`. The two graphs are joined by
``onnx.compose.merge_models``: input ``image`` [N, 3, H, W] (float32, the backbone's
transform applied: `featsvm.features.onnx_input`), output ``probabilities`` [N, 4] in LABELS
order. A run with an OOD flag (``ood.skops``) also gets ``ood_score`` [N] float and ``ood``
[N] bool, computed from the same ``features`` tensor the head reads
(`featsvm.evaluation.ood_onnx`); a run without one gets neither.

The model's metadata (``featsvm`` key, JSON) carries what `featsvm predict --onnx` needs and
what the graph is: run id, model name, labels, the preprocessing dict, the abstention
threshold, the sha256 of the backbone weights, of the head file and of the int8 graph (None
at fp32), ``backbone_precision`` (what the graph runs: int8 or fp32), ``run_precision`` and
``run_engine`` (what made the run's features), ``ood`` (None, or the flag's threshold and
output names), and the parity check.

Parity check (printed, stored in the metadata and in ``<out>.parity.json``, with
``backbone_precision`` / ``run_precision``): with the data folder, the exported graph scores
the run's TEST images and is compared with the run's own ``predictions.csv`` (its
probabilities came from cached features): agreement of the predicted class, largest
probability difference. Without data, a few seeded synthetic images are scored by the graph
and by the run's own predictor (the engine and precision that made its cache). With an OOD
flag, the graph's flags and scores are compared with the run's own predictor on the same
images (`Predictor.predict_with_ood`, `OODFlag.score` of its embeddings): ``ood_agreement``,
``max_abs_ood_score_diff``, ``max_rel_ood_score_diff``.
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
BATCH = 16  # images per graph / predictor call in the parity check


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
    """Write the run's backbone + head (+ OOD flag) as one ONNX file at `out`; check it
    (module doc)."""
    import onnx

    from featsvm.features.onnx_input import check_exportable
    from featsvm.predict import EmbeddingMemo, Predictor
    from featsvm.runs import read_run

    t0 = time.perf_counter()
    record = read_run(run_dir)
    kind = record.config.get("kind")
    if kind != "head":
        raise PredictError(f"{run_dir}: export handles head runs (backbone + SVM / logistic "
                           f"head); this is a {kind} run")
    source = backbone_source(record)
    # the run's own predictor (the engine and precision that made its cache): the reference
    # of the parity check; the memo lets the OOD check reuse its embeddings
    predictor = Predictor.from_run(run_dir, weights, weights_dir, "cpu", trust_pickle,
                                   memo=EmbeddingMemo())
    pre = predictor.preprocessing.to_json()  # the JSON form: what predict --onnx reads
    check_exportable(pre)
    flag = predictor.parts.get("ood_flag")
    model = _joined(_backbone_graph(predictor.parts["embedder"], source, int(pre["crop"])),
                    predictor.parts["head"], flag, pre)
    precisions = {"backbone_precision": source.backbone_precision,
                  "run_precision": source.run_precision, "run_engine": source.run_engine}
    meta = {
        "run_id": record.run_id, "model": record.config.get("model"), "labels": list(LABELS),
        "preprocessing": pre, "abstention": record.config.get("abstention") or {},
        "weights": record.config.get("weights"),
        "head_sha256": recorded_sha256(record.config, str(record.config.get("model_file"))),
        "featsvm_version": __version__, "input": "image", "output": "probabilities",
        **precisions, "backbone_graph_sha256": source.sha256,
        "ood": _ood_meta(record.config.get("ood"), flag),
    }
    parity = {**precisions, **_parity(model.SerializeToString(), predictor, data_dir)}
    meta["parity"] = parity
    _set_meta(model, meta)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        onnx.save_model(model, str(tmp))
    write_json_atomic(parity_path(out), parity)
    return ExportResult(out, parity, time.perf_counter() - t0)


@dataclass(frozen=True)
class BackboneSource:
    """What the exported backbone is: the run's own int8 graph, or its fp32 network."""

    run_engine: str  # what made the run's features (its cache's compute tag)
    run_precision: str
    backbone_precision: str  # what the exported graph runs: int8 or fp32
    graph: Path | None = None  # the int8 graph (QDQ ONNX) the run's cache was made with
    sha256: str | None = None  # of that graph


def backbone_source(record: Any) -> BackboneSource:
    """The backbone an export of `record` (a head run) must contain: for an int8 run the very
    quantised graph its cache was computed with (kept next to the cache; sha256-checked
    against the run's record when it holds one); fp32 for every other run (ONNX Runtime's CPU
    provider has no bf16 convolutions, so a bf16 run exports fp32)."""
    from featsvm.features import engines
    from featsvm.features.key import FeatureKey

    key = FeatureKey.from_record(record.config, record.path)
    run_engine, run_precision = engines.parse_tag(key.precision)
    if run_precision != engines.QUANTISED:
        return BackboneSource(run_engine, run_precision, "fp32")
    cache = record.config.get("cache") or {}
    graph = engines.quantised_model_path(str(cache.get("path")))
    if not graph.is_file():
        raise PredictError(
            f"{record.path}: its features came from the int8 graph {graph}, which is not there "
            f"(it is kept next to the run's cache {cache.get('path')}); export from the folder "
            "the run was made in, or copy that cache folder (the .h5 and its .int8.onnx) to "
            "that path")
    sha = engines.file_sha256(graph)
    want = (cache.get("engine") or {}).get("model_sha256")
    if want and sha != want:
        raise PredictError(f"{graph}: sha256 {sha[:16]}… is not that of the int8 graph the "
                           f"run's features came from ({str(want)[:16]}…)")
    return BackboneSource(run_engine, run_precision, engines.QUANTISED, graph, sha)


def _backbone_graph(embedder: Any, source: BackboneSource, crop: int) -> Any:
    """The backbone as ONNX (image -> features): the int8 graph as it is, or the network
    exported at fp32."""
    import onnx

    from featsvm.features.onnx_export import export_embedder

    if source.graph is not None:
        return _used_opsets_only(onnx.load(str(source.graph)))
    with tempfile.TemporaryDirectory(prefix="featsvm-export-") as tmp:
        return onnx.load(str(export_embedder(embedder, crop, Path(tmp) / "backbone.onnx")))


def _used_opsets_only(model: Any) -> Any:
    """Drop the operator-set imports of domains no node uses (ONNX Runtime's quantiser
    declares every domain it knows, e.g. ``ai.onnx.ml`` 5; the head declares the version its
    nodes need, and models declaring two versions of one domain cannot be merged)."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [op for op in model.opset_import if op.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


def _ood_meta(block: dict[str, Any] | None, flag: Any) -> dict[str, Any] | None:
    """The metadata's ``ood`` entry: None when the graph has no OOD outputs."""
    if flag is None:
        return None
    from featsvm.evaluation.ood_onnx import FLAG, SCORE

    return {"threshold": float(flag.threshold), "score_output": SCORE, "flag_output": FLAG,
            "threshold_from": (block or {}).get("threshold_from"),
            "method": (block or {}).get("method")}


def parity_path(out: str | os.PathLike[str]) -> Path:
    p = Path(out)
    return p.with_name(p.name + ".parity.json")


def _set_meta(model: Any, meta: dict[str, Any]) -> None:
    for prop in list(model.metadata_props):
        if prop.key == META_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta, sort_keys=True)


def _joined(backbone: Any, head: Any, flag: Any, pre: dict[str, Any]) -> Any:
    """backbone graph (image -> features) + head graph (features -> probabilities), and, when
    the run has an OOD flag, its nodes on the same features (-> ood_score, ood)."""
    import onnx
    from onnx import compose

    from featsvm.evaluation.ood_onnx import add_ood
    from featsvm.features.onnx_export import OUTPUT
    from featsvm.models.onnx_head import INPUT, head_to_onnx

    head_model = compose.add_prefix(head_to_onnx(head, int(pre["dim"])), "head/",
                                    rename_outputs=False)
    version = max(backbone.ir_version, head_model.ir_version)
    backbone.ir_version = head_model.ir_version = version
    merged = compose.merge_models(backbone, head_model, io_map=[(OUTPUT, f"head/{INPUT}")],
                                  producer_name="featsvm", producer_version=__version__)
    if flag is not None:
        add_ood(merged, flag, OUTPUT)
    onnx.checker.check_model(merged)
    return merged


def _parity(model_bytes: bytes, predictor: Any, data_dir: str | os.PathLike[str] | None
            ) -> dict[str, Any]:
    import onnxruntime as ort

    from featsvm.evaluation.ood_onnx import FLAG, SCORE
    from featsvm.features.onnx_input import prepare_batch

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    pre = predictor.preprocessing.to_json()
    names = [o.name for o in session.get_outputs()]
    has_ood = SCORE in names

    def batches(images: list[Any]) -> list[list[Any]]:
        return [images[i:i + BATCH] for i in range(0, len(images), BATCH)]

    def graph(images: list[Any]) -> list[np.ndarray]:
        """The graph's probabilities (and OOD scores and flags) of `images`."""
        wanted = ["probabilities", SCORE, FLAG] if has_ood else ["probabilities"]
        runs = [session.run(wanted, {"image": prepare_batch(b, pre)}) for b in batches(images)]
        if not runs:
            return [np.zeros((0, len(LABELS))), np.zeros(0), np.zeros(0, dtype=bool)]
        return [np.concatenate(parts) for parts in zip(*runs, strict=True)]

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
        ref = np.concatenate([predictor.predict_proba(b) for b in batches(images)] or
                             [np.zeros((0, len(LABELS)))])
        against, where = "the run's own predictor", "seeded synthetic images"
    got = graph(images)
    agree = got[0].argmax(axis=1) == ref.argmax(axis=1)
    out: dict[str, Any] = {
        "images": len(images), "on": where, "against": against,
        "agreement": float(agree.mean()) if len(agree) else None,
        "n_disagree": int((~agree).sum()),
        "max_abs_prob_diff": float(np.abs(got[0] - ref).max()) if len(ref) else None,
        "ood_in_graph": has_ood,
    }
    if has_ood:
        out.update(_ood_parity(got[1], got[2], predictor, batches(images)))
    return out


def _ood_parity(score: np.ndarray, flags: np.ndarray, predictor: Any,
                batches: list[list[Any]]) -> dict[str, Any]:
    """The graph's OOD scores and flags against the run's own predictor on the same images:
    its flags (`Predictor.predict_with_ood`) and scores (`OODFlag.score` of its embeddings)."""
    flag = predictor.parts["ood_flag"]
    ref_flags: list[bool | None] = []
    ref_score = []
    for b in batches:
        ref_flags.extend(predictor.predict_with_ood(b)[1])
        ref_score.append(flag.score(predictor.parts["embed"](b)))  # memo: no second forward
    ref = np.concatenate(ref_score) if ref_score else np.zeros(0)
    same = flags == np.array(ref_flags, dtype=bool)
    diff = np.abs(score.astype(np.float64) - ref)
    return {"ood_against": "the run's own predictor (OODFlag on its embeddings)",
            "ood_threshold": float(flag.threshold),
            "ood_agreement": float(same.mean()) if len(same) else None,
            "ood_n_disagree": int((~same).sum()),
            "ood_flagged": int(flags.sum()), "ood_flagged_by_run": int(sum(map(bool, ref_flags))),
            "max_abs_ood_score_diff": float(diff.max()) if len(diff) else None,
            "max_rel_ood_score_diff": (float((diff / np.maximum(np.abs(ref), 1e-12)).max())
                                       if len(diff) else None)}
