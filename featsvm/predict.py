"""`featsvm predict`: classify new images with any finished run.

Everything about how an image becomes a prediction is taken from the run record, never
re-typed: the preprocessing in ``config.json`` (a `features.preprocessing.Preprocessing`)
builds the transform, the model file is checked against its sha256 sidecar
before it is loaded, and

* a **head** run (``kind = "head"``) embeds the images on the fly with the run's backbone,
  embedding layer and precision, loading backbone weights whose sha256 must equal the one the
  run recorded (found at the recorded path, in ``--weights-dir`` / ``FEATSVM_WEIGHTS_DIR``, or
  given with ``--weights``), then applies the fitted head (``model.skops``, loaded without
  running code);
* an **end-to-end** run (``kind = "end_to_end"``) rebuilds the CNN from its checkpoint
  (`featsvm.models.finetune.load_finetuned`) and evaluates exactly as training evaluated (pixels
  rounded to uint8 after the transform, then normalised; with the cell view, the mean of the
  probabilities of the image's cells).

Out-of-distribution flag: a run whose ``config.json`` holds an ``ood`` block with a file
(``ood.skops``, `featsvm.evaluation.ood.OODFlag`) flags ``ood = 1`` for every image whose
embedding is further from the run's training images than its val-chosen threshold: the
backbone's embedding for a head run, the penultimate-layer embedding (input of the final
linear classifier, captured in the same forward pass as the probabilities; the mean over the
cells in the cell view) for an end-to-end run. Runs made without one leave ``ood`` empty.

An **ensemble** run (``kind = "ensemble"``, `featsvm.ensemble`) loads its member runs as
above (each checked against the sha256s the ensemble recorded) and returns the mean of their
probabilities; an image is ``ood = 1`` when any member that has a flag flags it.

A file that cannot be read or decoded is reported by name and skipped; the others are
predicted.

Abstention: a run whose ``config.json`` holds ``abstention.threshold`` (chosen on its val
split, `featsvm.evaluation.selective`) marks ``abstain = 1`` for every image whose confidence
(max class probability) is below it; older runs without one leave ``abstain`` empty.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featsvm.data.dataset import (
    IMAGE_EXTENSIONS,
    ImageError,
    check_utf8_name,
    decode_rgb,
    iter_image_files,
    printable_name,
    read_image_bytes,
)
from featsvm.errors import PredictError
from featsvm.features.preprocessing import Preprocessing
from featsvm.fileio import sha256_bytes, sha256_file, write_text_atomic
from featsvm.labels import LABELS, malignant_probability, predicted_label
from featsvm.runs import PROB_COLUMNS, RunRecord, read_run

CSV_COLUMNS = ("file", "sha256", "pred_label", "prob_malignant", *PROB_COLUMNS, "ood",
               "confidence", "abstain")


@dataclass(frozen=True)
class Prediction:
    file: str  # as given, or relative to data_root when given
    sha256: str
    proba: np.ndarray  # (len(LABELS),)
    ood: bool | None = None  # unlike the run's training images (None: the run has no flag)
    abstain: bool | None = None  # below the run's val-chosen threshold (None: none)

    @property
    def confidence(self) -> float:
        return float(np.max(self.proba))

    @property
    def pred_label(self) -> str:
        return predicted_label(self.proba)

    @property
    def prob_malignant(self) -> float:
        return malignant_probability(self.proba)


@dataclass
class PredictResult:
    run_id: str
    model: str
    predictions: list[Prediction] = field(default_factory=list)
    threshold: float | None = None  # the run's val-chosen confidence threshold
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


# ---------------------------------------------------------------- inputs


def collect_inputs(inputs: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[
        tuple[str, str]]]:
    """Files named directly (whatever their extension) plus image files found under folders.
    Missing paths are returned as skipped, with the reason."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list(iter_image_files(p))
            if not found:
                skipped.append((str(p), "folder holds no image files "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))})"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            skipped.append((str(p), "no such file or folder"))
    return files, skipped


# ---------------------------------------------------------------- models


class EmbeddingMemo:
    """Image embeddings already computed in this process, by (the run's feature cache name,
    engine and precision, a hash of the decoded pixels). Head runs that share a backbone
    cache (the SVM and logistic heads of one study) then embed each image once: `featsvm run`
    passes one memo to every evaluation of an ``[[external]]`` set. Only rows the same
    network and preprocessing computed are reused, so results do not change."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], np.ndarray] = {}
        self.hits = 0

    @staticmethod
    def _image_id(image: Any) -> str:
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
        return h.hexdigest()

    def embed(self, model: str, images: list[Any],
              compute: Callable[[list[Any]], np.ndarray]) -> np.ndarray:
        """Rows of `images` for `model` (a string naming network + preprocessing), calling
        `compute` only on those not seen before."""
        keys = [(model, self._image_id(im)) for im in images]
        todo = [i for i, k in enumerate(keys) if k not in self._rows]
        if todo:
            for i, row in zip(todo, compute([images[i] for i in todo]), strict=True):
                self._rows[keys[i]] = row
        self.hits += len(images) - len(todo)
        return np.stack([self._rows[k] for k in keys])


class Predictor:
    """A loaded run: call `predict_proba(images)` on a list of PIL RGB images.

    `parts` holds the loaded pieces for code that needs more than probabilities
    (`featsvm.explain`, `featsvm.export`): ``device``; for a head run ``embedder``, ``head``
    (the `FittedHead`), ``embed`` (images -> the embeddings the head reads, computed as the
    run's cache was) and ``ood_flag`` (the `OODFlag` or None); for an end-to-end run ``net``
    and ``normaliser``; for an ensemble ``members`` (the members' `Predictor`s)."""

    def __init__(self, record: RunRecord, proba_fn: Callable[[list[Any]], np.ndarray],
                 transform: Callable[[Any], Any],
                 ood_fn: Callable[[list[Any]], Any] | None = None, **parts: Any) -> None:
        self.record = record
        self._proba_fn = proba_fn
        self.transform = transform
        self._ood_fn = ood_fn  # runs with an OOD flag: images -> (proba, flags)
        self.parts = parts

    @property
    def kind(self) -> str:
        return str(self.record.config.get("kind"))

    @property
    def preprocessing(self) -> Preprocessing:
        """The run's recorded preprocessing (how an image becomes the model's input)."""
        return Preprocessing.from_json(self.record.config.get("preprocessing") or {})

    def predict_proba(self, images: list[Any]) -> np.ndarray:
        if not images:
            return np.zeros((0, len(LABELS)))
        return self._proba_fn(images)

    def predict_with_ood(self, images: list[Any]) -> tuple[np.ndarray, list[bool | None]]:
        """Class probabilities and the OOD flag of each image (None without a flag)."""
        if not images:
            return np.zeros((0, len(LABELS))), []
        if self._ood_fn is None:
            return self._proba_fn(images), [None] * len(images)
        proba, ood = self._ood_fn(images)
        return proba, [None if v is None else bool(v) for v in ood]

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike[str],
        weights: str | os.PathLike[str] | None = None,
        weights_dir: str | os.PathLike[str] | None = None,
        device: str = "auto",
        trust_pickle: bool = False,
        engine: str | None = None,
        memo: EmbeddingMemo | None = None,
    ) -> Predictor:
        """`trust_pickle`: also load a head saved as a pickle by older featsvm versions (runs
        code from the file: only for run folders you made). `engine`: what runs a head run's
        backbone (`featsvm.features.engines`); None = what made the run's cache. `memo`: share
        a head run's image embeddings with other runs of the same cache (`EmbeddingMemo`)."""
        record = read_run(run_dir)
        kind = record.config.get("kind")
        if kind == "head":
            return cls._head(record, weights, weights_dir, device, trust_pickle, engine, memo)
        if kind == "ensemble":
            return cls._ensemble(record, weights, weights_dir, device, trust_pickle, engine,
                                 memo)
        if engine not in (None, "torch"):
            raise PredictError(f"--engine {engine} runs the backbone of a head run; "
                               f"{run_dir} is a {kind} run (torch only)")
        if kind == "end_to_end":
            return cls._end_to_end(record, device)
        if kind == "cv":
            raise PredictError(
                f"{run_dir} is a cross-validation run: it measures a model but keeps none "
                f"(its folds' models are discarded). Predict with a "
                f"`featsvm {'fit' if record.config.get('head') else 'finetune'}` run of "
                f"{record.config.get('model')}"
            )
        raise PredictError(f"{run_dir}: config.json kind {kind!r} is none of 'head', "
                           "'end_to_end' and 'ensemble'")

    @classmethod
    def _head(cls, record: RunRecord, weights: str | os.PathLike[str] | None,
              weights_dir: str | os.PathLike[str] | None, device: str,
              trust_pickle: bool = False, engine: str | None = None,
              memo: EmbeddingMemo | None = None) -> Predictor:
        import torch

        from featsvm.device import autocast_context, check_precision, resolve_device
        from featsvm.features.key import FeatureKey
        from featsvm.features.preprocess import pool

        cfg = record.config
        from featsvm.models.modelfile import load_head

        head = load_head(record, trust_pickle)  # sidecar + config.json sha256, no pickle
        if "layer" not in (cfg.get("preprocessing") or {}):
            raise PredictError(f"{record.path}/config.json: preprocessing has no 'layer'; "
                               "was it written by `featsvm fit`?")
        key = FeatureKey.from_record(cfg, record.path)
        pre = key.preprocessing
        loaded = _load_recorded_backbone(key, cfg, weights, weights_dir)
        if not loaded.preprocessing.same_as(pre.base()):
            raise PredictError(
                f"{record.path}: the run's preprocessing {pre.to_json()} differs from what "
                f"this featsvm version builds for {key.backbone} "
                f"({loaded.preprocessing.to_json()}); predict with the featsvm version that "
                "made the run"
            )
        # from the run's record, not from the spec: view (field | cells), stain, colour
        transform = pre.image_transform()
        engine, precision, runner = _engine(cfg, record, key, loaded, engine)
        dev = resolve_device("cpu" if runner is not None else device)
        embedder = loaded.embedder.to(dev).eval()
        if runner is None:
            check_precision(dev, precision)

        ood_flag = _load_ood_flag(record, trust_pickle)

        def compute(images: list[Any]) -> np.ndarray:
            stacks = [transform(im) for im in images]  # [k, 3, H, W] each (k cells or 1)
            counts = [len(t) for t in stacks]
            if runner is not None:
                return pool(runner(torch.cat(stacks).numpy()), counts)
            x = torch.cat(stacks).to(dev)
            with torch.inference_mode(), autocast_context(dev, precision):
                feats = embedder(x)
            return pool(feats.float().cpu().numpy(), counts)

        def embed(images: list[Any]) -> np.ndarray:
            if memo is None:
                return compute(images)
            return memo.embed(f"{key.file_name} {engine} {precision} {dev.type}", images,
                              compute)

        def proba(images: list[Any]) -> np.ndarray:
            return head.predict_proba(embed(images))

        def proba_ood(images: list[Any]) -> tuple[np.ndarray, np.ndarray]:
            feats = embed(images)
            return head.predict_proba(feats), ood_flag.flag(feats)

        def first(im: Any) -> Any:  # one tensor [3, H, W] per image (the field, or its
            return transform(im)[0]  # largest cell in the cell view), for featsvm.explain

        return cls(record, proba, first, proba_ood if ood_flag is not None else None,
                   embedder=embedder, head=head, device=dev, compute=f"{engine} {precision}",
                   embed=embed, ood_flag=ood_flag)

    @classmethod
    def _ensemble(cls, record: RunRecord, weights: str | os.PathLike[str] | None,
                  weights_dir: str | os.PathLike[str] | None, device: str,
                  trust_pickle: bool = False, engine: str | None = None,
                  memo: EmbeddingMemo | None = None) -> Predictor:
        """A soft-vote ensemble (`featsvm.ensemble`): its members' predictors (each checked
        against the sha256s the ensemble recorded), the mean of their probabilities; OOD
        when any member with a flag flags the image."""
        from featsvm.ensemble import CV, any_member_flags, mean_probabilities, member_records

        if record.config.get("members_kind") == CV:
            raise PredictError(
                f"{record.path} is an ensemble of cross-validation runs: it measures a model "
                "but keeps none. Predict with an ensemble of `featsvm fit` / `finetune` runs")
        members = [cls.from_run(m.path, weights, weights_dir, device, trust_pickle, engine,
                                memo) for m in member_records(record)]

        def proba(images: list[Any]) -> np.ndarray:
            return mean_probabilities([m.predict_proba(images) for m in members])

        def proba_ood(images: list[Any]) -> tuple[np.ndarray, list[bool | None]]:
            outs = [m.predict_with_ood(images) for m in members]
            return (mean_probabilities([p for p, _ in outs]),
                    any_member_flags([flags for _, flags in outs]))

        has_flag = any(m._ood_fn is not None for m in members)
        return cls(record, proba, members[0].transform, proba_ood if has_flag else None,
                   members=members, device=members[0].parts.get("device"))

    @classmethod
    def _end_to_end(cls, record: RunRecord, device: str) -> Predictor:
        import torch

        from featsvm.device import check_precision, resolve_device
        from featsvm.evaluation.calibration import apply_temperature
        from featsvm.models.networks import (
            capture_embeddings,
            load_finetuned,
            normaliser_for,
            predict_proba,
        )
        from featsvm.models.pixels import pool_rows

        net, transform, cfg = load_finetuned(record.path)  # checks the sidecar first
        ood_flag = _load_ood_flag(record)
        dev = resolve_device(device)
        precision = str(cfg.get("precision") or "fp32")
        check_precision(dev, precision)
        net = net.to(dev)
        from featsvm.features.preprocessing import Preprocessing

        normaliser = normaliser_for(Preprocessing.from_json(cfg.get("preprocessing") or {}))
        temperature = (cfg.get("calibration") or {}).get("temperature")

        def inputs(im: Any) -> torch.Tensor:  # [k, 3, H, W]: k cells, or the one field
            x = transform(im)
            return x if x.dim() == 4 else x.unsqueeze(0)

        def forward(images: list[Any], embed: bool) -> tuple[np.ndarray, np.ndarray | None]:
            # as in training: transform, keep as uint8, normalise per batch; with the cell
            # view an image's probabilities (and embedding) are the mean of its cells'
            stacks = [normaliser.to_uint8(inputs(im)) for im in images]
            owner = np.repeat(np.arange(len(stacks)), [len(t) for t in stacks])
            with capture_embeddings(net, embed) as emb:
                p = predict_proba(net, torch.cat(stacks), normaliser, dev, precision,
                                  batch_size=max(1, len(owner)))
            p = pool_rows(p, owner, len(stacks))
            # the run's temperature (fitted on its val split), as its predictions.csv has it
            p = p if temperature is None else apply_temperature(p, float(temperature))
            if not embed:
                return p, None
            return p, pool_rows(torch.cat(emb).double().numpy(), owner, len(stacks))

        def proba(images: list[Any]) -> np.ndarray:
            return forward(images, False)[0]

        def proba_ood(images: list[Any]) -> tuple[np.ndarray, np.ndarray]:
            p, emb = forward(images, True)  # the embedding of the same forward pass
            return p, ood_flag.flag(emb)

        def first(im: Any) -> Any:  # one tensor [3, H, W] per image (the field, or its
            return inputs(im)[0]  # largest cell in the cell view), for featsvm.explain

        return cls(record, proba, first, proba_ood if ood_flag is not None else None,
                   net=net, normaliser=normaliser, device=dev)


def _load_ood_flag(record: RunRecord, trust_pickle: bool = False) -> Any:
    """The run's OOD flag (`featsvm.evaluation.ood.OODFlag`, checked against its sidecar and
    the sha256 config.json records), or None for a run made without one."""
    from featsvm.models.modelfile import load_model

    ood_cfg = record.config.get("ood") or {}
    if not ood_cfg.get("file"):
        return None
    return load_model(record.path / ood_cfg["file"], ood_cfg.get("sha256"),
                      trust_pickle=trust_pickle)


def _engine(cfg: dict[str, Any], record: RunRecord, key: Any, loaded: Any,
            engine: str | None) -> tuple[str, str, Any]:
    """(engine, precision, runner or None for torch) for a head run's backbone: by default
    what made the run's cache (its compute tag); another engine runs fp32, except the int8
    graph of an int8 cache, which any exported engine runs as it is."""
    from featsvm.features import engines

    run_engine, run_precision = engines.parse_tag(key.precision)
    engine = engine or run_engine
    precision = run_precision if engine == run_engine else "fp32"
    if engine == engines.TORCH:
        return engine, precision, None
    graph = None
    if precision == engines.QUANTISED:  # the very graph the run's cache was made with
        graph = engines.quantised_model_path(str((cfg.get("cache") or {}).get("path")))
        if not graph.is_file():
            raise PredictError(
                f"{record.path}: its features came from the int8 graph {graph}, which is not "
                "there; predict from the folder it was made in, or with --engine torch")
    runner = engines.build_runner(engine, precision, loaded.embedder.eval(),
                                  engines.input_size(key.preprocessing), quantised_path=graph)
    return engine, precision, runner


def _load_recorded_backbone(
    key: Any, cfg: dict[str, Any], weights: str | os.PathLike[str] | None,
    weights_dir: str | os.PathLike[str] | None,
) -> Any:
    """The run's backbone (`key`: a `FeatureKey`) with weights whose sha256 equals the
    recorded one.

    Order: explicit `weights` / `weights_dir`; the recorded source path; FEATSVM_WEIGHTS_DIR;
    the library's ImageNet file. Random ('random' label) runs rebuild the seeded init."""
    from featsvm.features.backbones import load_backbone
    from featsvm.features.weights import WeightsError

    backbone, layer = key.backbone, key.layer
    rec = cfg.get("weights") or {}
    want = key.weights.sha256
    if key.weights.is_random:
        return load_backbone(backbone, weights="none", layer=layer)
    attempts: list[tuple[str | os.PathLike[str] | None, str | os.PathLike[str] | None, str]] = []
    if weights is not None or weights_dir is not None:
        attempts.append((weights, weights_dir, "the weights you named"))
    source = rec.get("source")
    if source and Path(str(source)).is_file() and sha256_file(str(source)) == want:
        attempts.append((str(source), None, f"the recorded file {source}"))
    attempts.append((None, None, "FEATSVM_WEIGHTS_DIR or the library's ImageNet file"))
    problems: list[str] = []
    for w, wd, where in attempts:
        try:
            loaded = load_backbone(backbone, weights=w, weights_dir=wd, layer=layer)
        except (WeightsError, FileNotFoundError, ValueError) as exc:
            problems.append(f"{where}: {exc}")
            continue
        if loaded.weights.sha256 == want:
            return loaded
        problems.append(f"{where}: sha256 {str(loaded.weights.sha256)[:16]}… is not the run's")
    raise PredictError(
        f"cannot find the {backbone} weights this run was trained on ({key.weights.label!r}, "
        f"sha256 {want[:16]}…). Give them with --weights FILE or --weights-dir DIR "
        f"(or FEATSVM_WEIGHTS_DIR). Tried: " + "; ".join(problems)
    )


def abstention_threshold(record: RunRecord) -> float | None:
    """The run's val-chosen confidence threshold, or None (a run made before abstention)."""
    value = (record.config.get("abstention") or {}).get("threshold")
    return None if value is None else float(value)


# ---------------------------------------------------------------- the whole job


def predict(
    run_dir: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int = 16,
    data_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
    trust_pickle: bool = False,
    engine: str | None = None,
    memo: EmbeddingMemo | None = None,
) -> PredictResult:
    """Predict every image in `inputs` (files and folders) with the run at `run_dir`.

    `data_root`: report files relative to this folder (e.g. to compare with a run's
    predictions.csv relpaths). `trust_pickle`, `memo`: see `Predictor.from_run`."""
    predictor = Predictor.from_run(run_dir, weights, weights_dir, device, trust_pickle, engine,
                                   memo)
    return predict_files(predictor, inputs, batch_size, data_root, progress)


def predict_files(predictor: Any, inputs: Sequence[str | os.PathLike[str]],
                  batch_size: int = 16, data_root: str | os.PathLike[str] | None = None,
                  progress: bool = True) -> PredictResult:
    """Predict every image in `inputs` with a loaded `predictor` (a `Predictor`, or anything
    with its ``record`` and ``predict_with_ood``, e.g. `featsvm.predict_onnx.OnnxPredictor`)."""
    from tqdm import tqdm

    files, skipped = collect_inputs(inputs)
    result = PredictResult(run_id=predictor.record.run_id,
                           model=str(predictor.record.config.get("model")), skipped=skipped,
                           threshold=abstention_threshold(predictor.record))
    root = Path(data_root).resolve() if data_root is not None else None

    def name(p: Path) -> str:
        if root is not None:
            try:
                return p.resolve().relative_to(root).as_posix()
            except ValueError:
                pass
        return str(p)

    batch: list[tuple[str, str, Any]] = []

    def flush() -> None:
        if not batch:
            return
        result.predictions.extend(predict_images(predictor, batch))
        batch.clear()

    for path in tqdm(files, desc="predict", unit="img", disable=not progress):
        try:
            check_utf8_name(name(path))
            data = read_image_bytes(path)
            digest = sha256_bytes(data)
            im = decode_rgb(data, str(path))
        except (ImageError, OSError) as exc:
            result.skipped.append((printable_name(name(path)), str(exc)))
            continue
        batch.append((name(path), digest, im))
        if len(batch) >= batch_size:
            flush()
    flush()
    return result


def predict_images(predictor: Predictor, batch: Sequence[tuple[str, str, Any]]
                   ) -> list[Prediction]:
    """Predictions for in-memory images: `batch` holds (name, sha256, PIL RGB image). The one
    place that turns a run's probabilities into `Prediction`s (used by `predict` and by
    `featsvm serve`)."""
    if not batch:
        return []
    proba, ood = predictor.predict_with_ood([im for _, _, im in batch])
    threshold = abstention_threshold(predictor.record)
    return [Prediction(fname, digest, np.asarray(row, dtype=float), flag,
                       None if threshold is None else bool(np.max(row) < threshold))
            for (fname, digest, _), row, flag in zip(batch, proba, ood, strict=True)]


def predictions_csv(result: PredictResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for p in result.predictions:
        w.writerow([p.file, p.sha256, p.pred_label, f"{p.prob_malignant:.6f}",
                    *(f"{v:.6f}" for v in p.proba), "" if p.ood is None else int(p.ood),
                    f"{p.confidence:.6f}", "" if p.abstain is None else int(p.abstain)])
    return buf.getvalue()


def write_predictions_csv(result: PredictResult, path: str | os.PathLike[str]) -> None:
    write_text_atomic(path, predictions_csv(result))
