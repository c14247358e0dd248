"""End-to-end CNN baselines: the study's basic CNN from scratch, and fine-tuned backbones.

What it does, in order:

1. reads the split manifest and decodes every train/val/test image **once** into memory as
   uint8 at the model's input geometry (3,256 images at 224 px is about 0.5 GB), checking each
   file's sha256 against the manifest; unreadable or changed files are reported and skipped
   (`featsvm.models.pixels`);
2. builds the model (`models.networks`): `basic_cnn.BasicCNN`, or the pretrained embedder from
   `featsvm.features.backbones.load_backbone` (the same specs and weight resolution as ``extract``;
   no second copy of model code) followed by a new dropout + ``Linear(D, 4)`` head;
3. trains with AdamW (discriminative learning rates: backbone ``lr * backbone_lr_mult``, head
   ``lr``), a per-step cosine schedule with linear warm-up, optional label smoothing, class
   weights, and smear-appropriate augmentation on the training split only (horizontal and
   vertical flips, 90-degree rotations, mild brightness/contrast/saturation jitter);
4. after every epoch scores the val split, keeps the best weights by val macro-F1 (or balanced
   accuracy), stops early after ``patience`` epochs without improvement, and writes a
   resumable checkpoint and ``history.csv``;
5. reloads the best weights, predicts val and test, scores them with
   `evaluation.metrics.score_predictions` (the same function ``fit`` uses), fits the
   out-of-distribution flag on the network's penultimate-layer embedding (`fit_ood`: the
   same `evaluation.ood` flag and ``config.json`` ``ood`` block as head runs; val and test
   embeddings come from the prediction pass, train costs one more un-augmented pass), and
   writes the run record (`featsvm.runs`): ``model.pt`` and ``ood.skops`` + sha256 sidecars,
   predictions, metrics, config last. A resumed run ends the same way (the flag is fitted
   once, on the best weights); ``finetune --cv`` keeps no model and fits no flag.

**Freezing** (``freeze``): ``"none"`` trains everything; ``"all"`` trains only the new head;
``"auto"`` freezes all but the backbone's last block (see ``LAST_TRAINABLE``; the CPU
variant); any other value is a dotted module name inside the embedder (e.g. ``blocks.5``,
``features.23``, ``Mixed_7b``) and freezes every parameter registered up to and including that
module. Frozen BatchNorm layers stay in eval mode so their statistics do not drift. Frozen
leading layers cost only a forward pass (autograd builds no graph for them).

**Determinism and resume.** The shuffling order, the augmentation draws and the dropout
masks of epoch ``e`` are seeded from ``(seed, e)``, so a run that is interrupted and resumed
from its last checkpoint (saved after every epoch) ends in exactly the same state as an
uninterrupted one on the CPU. A run is resumed explicitly (``resume=RUN_DIR``) or, by default,
automatically: an unfinished run folder under ``runs_dir`` whose fingerprint (data, split,
model, weights and every training setting) matches is continued instead of starting afresh.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from featsvm import runs
from featsvm.config import ConfigError, build
from featsvm.data.manifest import Manifest, ManifestRow, read_manifest
from featsvm.evaluation import calibration, trust
from featsvm.evaluation import metrics as fm
from featsvm.features.key import WeightsId
from featsvm.fileio import (
    FileLock,
    atomic_path,
    is_no_space,
    no_space_message,
    remove_temp_files,
    write_text_atomic,
)
from featsvm.labels import LABELS
from featsvm.models.networks import (
    FinetuneError,
    apply_freeze,
    build_model,
    capture_embeddings,
    normaliser_for,
    split_trunk,
)
from featsvm.models.pixels import (
    ImageSet,
    Normaliser,
    augment,
    batches,
    dihedral,
    hed_jitter,
    preload,
)
from featsvm.names import BASIC_CNN, MODELS

logger = logging.getLogger(__name__)

SELECT_METRICS = ("macro_f1", "balanced_accuracy")
CLASS_WEIGHTS = ("balanced", "none")

MODEL_FILE = "model.pt"
LAST_CHECKPOINT = "checkpoint-last.pt"
BEST_CHECKPOINT = "checkpoint-best.pt"
FINGERPRINT_FILE = "fingerprint.txt"
TRAIN_LOCK = "train.lock"  # flock held while a process trains in the run folder
HISTORY_COLUMNS = (
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1",
    "val_balanced_accuracy", "lr_head", "lr_backbone", "seconds", "best",
)


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class FinetuneConfig:
    """The ``[finetune]`` TOML section. ``overrides.<model>`` sub-tables replace any key for
    one model (e.g. fewer epochs and ``freeze = "auto"`` for efficientnet_lite0 on a CPU)."""

    models: tuple[str, ...] = (BASIC_CNN,)  # what `featsvm run` trains
    model: str = BASIC_CNN
    epochs: int = 15
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-3  # head (and basic-cnn) learning rate
    backbone_lr_mult: float = 0.1  # pretrained layers train at lr * this
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine floor, as a fraction of the peak
    label_smoothing: float = 0.0
    class_weights: str = "balanced"
    augment: bool = True
    color_jitter: float = 0.1  # +-10 % brightness, contrast, saturation
    # HED-space stain augmentation strength (models.pixels.hed_jitter); 0 = off. Training only.
    stain_jitter: float = 0.0
    # What the network sees, as a study input name (featsvm.features.preprocess.parse_input):
    # "field" (the whole image), "cells" (each white cell cropped on black; the network is
    # trained on cells carrying their image's label and an image's probabilities are the mean
    # of its cells'), "+reinhard" (stain-normalised to the split's train images), "+grey" /
    # "+hematoxylin" (colour-free), "+lowres" (cells: resolution-normalised crops,
    # featsvm.features.cells.NATIVE_CELL_PX). Part of the preprocessing record and the
    # fingerprint.
    input: str = "field"
    select_metric: str = "macro_f1"
    patience: int = 5  # epochs without val improvement before stopping; 0 = never stop early
    # Wall-clock cap on training (minutes, 0 = none; the frozen-trunk cache counts): no epoch
    # is started that would end past it by the mean epoch time so far. The cosine schedule is
    # still laid out over `epochs`, so set `epochs` to what fits; this is a guard for slower
    # machines.
    max_train_minutes: float = 0.0
    # Frozen-trunk cache (CPU speed-up for freeze != "none"): run the frozen leading layers
    # once per image and train only the rest on the stored outputs. Augmentation then has to
    # happen before the trunk, so it is limited to `cache_views` precomputed dihedral views
    # per train image (1 = none; up to 8), views 1.. stain-jittered when stain_jitter > 0;
    # there is no colour jitter.
    cache_frozen: bool = False
    cache_views: int = 1
    cache_max_gb: float = 4.0
    freeze: str = "none"
    head_dropout: float = 0.2
    basic_cnn_size: int = 128
    basic_cnn_channels: tuple[int, ...] = (32, 64, 128, 128)
    basic_cnn_dense: int = 128
    basic_cnn_dropout: float = 0.5
    channels_last: bool = True
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    workers: int = 2  # threads decoding images while preloading
    n_boot: int = 1000  # bootstrap resamples for the metric CIs
    target_error: float = 0.01  # abstention: the val-chosen confidence threshold aims at this
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> FinetuneConfig:
        if self.model not in MODELS:
            raise ConfigError(f"[finetune] model {self.model!r} unknown; use one of {MODELS}")
        for name in self.models:
            if name not in MODELS:
                raise ConfigError(f"[finetune] models: {name!r} unknown; use one of {MODELS}")
        if self.select_metric not in SELECT_METRICS:
            raise ConfigError(f"[finetune] select_metric must be one of {SELECT_METRICS}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ConfigError(f"[finetune] class_weights must be one of {CLASS_WEIGHTS}")
        if self.epochs < 1 or self.batch_size < 2 or self.eval_batch_size < 1:
            raise ConfigError("[finetune] epochs must be >= 1 and batch_size >= 2")
        if not 1 <= self.cache_views <= 8:
            raise ConfigError("[finetune] cache_views must be between 1 and 8")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ConfigError("[finetune] color_jitter must be in [0, 1)")
        if not 0.0 <= self.stain_jitter < 1.0:
            raise ConfigError("[finetune] stain_jitter must be in [0, 1)")
        from featsvm.errors import UsageError
        from featsvm.features.preprocess import parse_input

        try:
            parse_input(self.input)
        except UsageError as exc:
            raise ConfigError(f"[finetune] input: {exc}") from None
        return self

    def for_model(self, model: str | None = None, **changes: Any) -> FinetuneConfig:
        """This config for one model: its ``overrides`` table applied, then `changes`
        (values that are None are ignored, so CLI options left unset keep the config's)."""
        model = model or self.model
        base = dataclasses.replace(self, model=model)
        table = self.overrides.get(model, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[finetune.overrides.{model}] must be a table")
        if "overrides" in table or "model" in table:
            raise ConfigError(f"[finetune.overrides.{model}] may not set model or overrides")
        merged = {**_plain(base), **table, **{k: v for k, v in changes.items() if v is not None}}
        merged["overrides"] = self.overrides
        return build(FinetuneConfig, merged, f"[finetune.overrides.{model}]").validate()


def _plain(cfg: FinetuneConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def model_name(cfg: FinetuneConfig, pretrained: bool) -> str:
    """The run's model name: the network, its input when not the whole field (as head runs
    name theirs: ``efficientnet_lite0<cells+lowres>``), and "(fine-tuned)" for a pretrained
    backbone."""
    name = cfg.model if cfg.input == "field" else f"{cfg.model}<{cfg.input}>"
    return f"{name} (fine-tuned)" if pretrained else name


def finetune_config(doc: dict[str, Any] | None, source: str = "") -> FinetuneConfig:
    """Build the ``[finetune]`` section of a loaded TOML document (defaults when absent)."""
    from featsvm.config import section

    return section(FinetuneConfig, doc, "finetune", source).validate()


def fingerprint(cfg: FinetuneConfig, split_sha256: str, weights: WeightsId,
                data_dir: Path, image_options: dict[str, Any] | None = None) -> str:
    """What makes two training runs the same run (device, threads and CIs left out).
    `image_options`: the non-default image options of the inputs (`ImageOptions.to_dict`,
    with the stain reference), which replace the ``input`` name."""
    settings = _plain(cfg)
    for key in ("models", "overrides", "device", "threads", "workers", "n_boot",
                "cache_max_gb", "target_error", "input"):
        settings.pop(key)
    if not settings.get("stain_jitter"):  # off: fingerprints of earlier runs stay valid
        settings.pop("stain_jitter", None)
    if settings.get("precision") == "auto":  # what it means here, as `finetune` resolves it
        from featsvm.device import resolve_device, resolve_precision

        settings["precision"] = resolve_precision(resolve_device(cfg.device), "auto")
    content: dict[str, Any] = {"settings": settings, "split": split_sha256,
                               "weights": weights.to_json(),
                               "data_dir": str(Path(data_dir).resolve())}
    if image_options:  # the plain field view: fingerprints of earlier runs stay valid
        content["image_options"] = image_options
    blob = json.dumps(content, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def _set_train_mode(model: nn.Module) -> None:
    """train() but keep fully frozen BatchNorm layers in eval mode (fixed statistics)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in m.parameters(recurse=False)
        ):
            m.eval()


def _param_groups(model: nn.Module, backbone: str | None, cfg: FinetuneConfig
                  ) -> list[dict[str, Any]]:
    if backbone is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr,
                 "name": "head"}]
    head = [p for p in model.head.parameters() if p.requires_grad]  # type: ignore[union-attr]
    body = [p for p in model.embedder.parameters() if p.requires_grad]  # type: ignore[union-attr]
    groups = [{"params": head, "lr": cfg.lr, "name": "head"}]
    if body:
        groups.append({"params": body, "lr": cfg.lr * cfg.backbone_lr_mult, "name": "backbone"})
    return groups


def cosine_with_warmup(total_steps: int, warmup_steps: int, floor: float
                       ) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to `floor`."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


# ---------------------------------------------------------------- inputs: pixels or cache



class PixelFeeder:
    """Inputs straight from the decoded images: augmented per batch for training."""

    def __init__(self, net: nn.Module, sets: dict[str, ImageSet], normaliser: Normaliser,
                 cfg: FinetuneConfig, device: torch.device) -> None:
        self.net, self.sets, self.normaliser = net, sets, normaliser
        self.cfg, self.device = cfg, device

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normaliser(x).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def train(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = self.sets["train"].pixels[idx].float().div_(255.0)
        if self.cfg.augment:
            x = augment(x, gen, self.cfg.color_jitter)
            if self.cfg.stain_jitter > 0:
                x = hed_jitter(x, gen, self.cfg.stain_jitter)
        return self._prep(x)

    def eval(self, split: str, sl: slice) -> torch.Tensor:
        return self._prep(self.sets[split].pixels[sl].float().div_(255.0))


class CachedFeeder:
    """Inputs from the frozen trunk's stored outputs (see FinetuneConfig.cache_frozen)."""

    def __init__(self, net: nn.Module, feats: dict[str, torch.Tensor], cfg: FinetuneConfig,
                 device: torch.device) -> None:
        self.net, self.feats, self.cfg, self.device = net, feats, cfg, device

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        views = self.feats["train"]  # [V, N, ...]
        v = torch.randint(0, views.shape[0], (len(idx),), generator=gen)
        return self._prep(views[v, idx])

    def eval(self, split: str, sl: slice) -> torch.Tensor:
        feats = self.feats[split]
        # train holds [V, N, ...]: view 0 is the images as they are
        return self._prep((feats[0] if split == "train" else feats)[sl])


@torch.no_grad()
def cache_trunk(
    trunk: nn.Module,
    sets: dict[str, ImageSet],
    normaliser: Normaliser,
    cfg: FinetuneConfig,
    device: torch.device,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Frozen-trunk outputs: train [V, N, ...] (view 0 as is, views 1.. a seeded random
    flip/rotation per image and, with ``augment`` and ``stain_jitter`` > 0, a seeded HED stain
    jitter: `featsvm.models.pixels.hed_jitter`), val and test [N, ...]; in eval mode."""
    from featsvm.device import autocast_context

    trunk.eval()
    first = sets["train"].pixels[:1].float().div_(255.0)
    x0 = normaliser(first).to(device)
    shape = tuple(trunk(x0).shape[1:])
    per = int(np.prod(shape)) * 4
    n_total = (cfg.cache_views * sets["train"].n_inputs + sets["val"].n_inputs
               + sets["test"].n_inputs)
    if per * n_total > cfg.cache_max_gb * 1e9:
        raise FinetuneError(
            f"the frozen-trunk cache would take {per * n_total / 1e9:.1f} GB ({shape} per "
            f"image x {n_total}), over cache_max_gb = {cfg.cache_max_gb:g}: freeze a deeper "
            "module, lower cache_views, raise cache_max_gb, or set cache_frozen = false"
        )
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + 17)
    # a generator of its own: the flips/rotations drawn above stay those of a run without it
    stain_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 29)
    jitter = cfg.stain_jitter if cfg.augment else 0.0
    jobs: list[tuple[str, int]] = [("train", v) for v in range(cfg.cache_views)]
    jobs += [("val", 0), ("test", 0)]
    out: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    total = sum(sets[name].n_inputs for name, _ in jobs)
    bar = tqdm(total=total, desc="frozen trunk", disable=not progress, unit="img", leave=False)
    for name, view in jobs:
        pixels = sets[name].pixels
        ds = (torch.zeros(len(pixels), dtype=torch.int64) if view == 0
              else torch.randint(1, 8, (len(pixels),), generator=gen))
        chunks = []
        for sl in batches(len(pixels), cfg.eval_batch_size):
            x = pixels[sl].float().div_(255.0)
            x = torch.stack([dihedral(img, int(d)) for img, d in zip(x, ds[sl], strict=True)])
            if view > 0 and jitter > 0:
                x = hed_jitter(x, stain_gen, jitter)
            x = normaliser(x).to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, cfg.precision):
                y = trunk(x)
            chunks.append(y.float().cpu().contiguous())
            bar.update(sl.stop - sl.start)
        out[name].append(torch.cat(chunks) if chunks else torch.zeros((0, *shape)))
    bar.close()
    return {"train": torch.stack(out["train"]), "val": out["val"][0], "test": out["test"][0]}


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def _forward(feeder: PixelFeeder | CachedFeeder, split: str, n: int, embed: bool = False
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """Softmax probabilities of a split's `n` inputs and, with `embed`, their
    penultimate-layer embeddings from the same pass (`networks.capture_embeddings`)."""
    from featsvm.device import autocast_context

    feeder.net.eval()
    out = []
    with capture_embeddings(feeder.net, embed) as emb:
        for sl in batches(n, feeder.cfg.eval_batch_size):
            with autocast_context(feeder.device, feeder.cfg.precision):
                logits = feeder.net(feeder.eval(split, sl))
            out.append(torch.softmax(logits.float(), dim=1).cpu().double())
    proba = torch.cat(out).numpy() if out else np.zeros((0, len(LABELS)))
    if not embed:
        return proba, None
    return proba, torch.cat(emb).double().numpy() if emb else np.zeros((0, 0))


def _predict(feeder: PixelFeeder | CachedFeeder, split: str, n: int) -> np.ndarray:
    return _forward(feeder, split, n)[0]


def _predict_images(feeder: PixelFeeder | CachedFeeder, split: str, images: ImageSet
                    ) -> np.ndarray:
    """Probabilities per image of a split: the mean over its inputs (cells) when an image
    gives several (`ImageSet.pool`)."""
    return images.pool(_predict(feeder, split, images.n_inputs))


def _forward_images(feeder: PixelFeeder | CachedFeeder, split: str, images: ImageSet
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, penultimate-layer embeddings) per image of a split, both pooled the
    same way over an image's inputs (the mean over its cells in the cell view)."""
    proba, emb = _forward(feeder, split, images.n_inputs, embed=True)
    assert emb is not None
    return images.pool(proba), images.pool(emb) if len(emb) else emb


def _val_scores(proba: np.ndarray, targets: torch.Tensor) -> dict[str, float]:
    t = targets.numpy()
    pred = proba.argmax(axis=1)
    k = len(LABELS)
    cm = np.bincount(t * k + pred, minlength=k * k).reshape(k, k)
    eps = 1e-12
    loss = float(-np.log(np.clip(proba[np.arange(len(t)), t], eps, 1.0)).mean()) if len(t) else 0.0
    return {
        "loss": loss,
        "accuracy": fm.accuracy(cm) or 0.0,
        "macro_f1": fm.macro_f1(cm) or 0.0,
        "balanced_accuracy": fm.balanced_accuracy(cm) or 0.0,
    }


# ---------------------------------------------------------------- checkpoints and resume


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint object."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


def _save_torch(obj: Any, path: Path) -> None:
    """Atomic torch.save (a kill leaves the old file, never a torn one). A full disk is a
    one-line FinetuneError naming the file and the space needed (torch reports it as a bare
    RuntimeError); the temp file is removed either way."""
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as exc:
        needed = _nbytes(obj) + (1 << 20)
        if is_no_space(exc) or shutil.disk_usage(path.parent).free < needed:
            raise FinetuneError(no_space_message(path, needed, "write")) from None
        raise


def _load_checkpoint(path: Path, device: torch.device | str, keys: tuple[str, ...] = ()
                     ) -> Any:
    """torch.load (weights only) of a checkpoint, or FinetuneError saying it is damaged."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
        missing = [k for k in keys if k not in ck]
        if missing:
            raise KeyError(f"lacks {missing}")
    except Exception as exc:  # noqa: BLE001 - empty, torn or foreign files alike
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise FinetuneError(
            f"{path} is damaged ({why}); cannot resume {path.parent}: delete that folder "
            "(or start a new run with --no-resume)"
        ) from None
    return ck


def _checkpoint_looks_sound(path: Path) -> str | None:
    """Cheap check before choosing a folder to resume: None, or why it is damaged."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        if not zipfile.is_zipfile(path):
            return "not a torch zip archive"
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        return f"corrupt member {bad}" if bad else None
    except (OSError, zipfile.BadZipFile) as exc:
        return str(exc)


def _run_busy(lock_path: Path, exclusive: bool) -> FinetuneError:
    return FinetuneError(
        f"{lock_path.parent} is being trained by another featsvm process right now (lock "
        f"held on {lock_path}); wait for it to finish, or start a separate run with "
        "--no-resume. A killed process releases the lock automatically."
    )


def find_resumable(runs_dir: Path, fp: str,
                   damaged: list[tuple[Path, str]] | None = None) -> Path | None:
    """The newest unfinished run folder under `runs_dir` with fingerprint `fp` whose last
    checkpoint looks sound; folders with a damaged one are appended to `damaged` (folder,
    reason) and never chosen, so a broken checkpoint is not resumed again and again."""
    if not Path(runs_dir).is_dir():
        return None
    found = []
    for d in Path(runs_dir).iterdir():
        fpf, ck = d / FINGERPRINT_FILE, d / LAST_CHECKPOINT
        if (d.is_dir() and fpf.is_file() and ck.is_file() and not runs.is_complete(d)
                and fpf.read_text(encoding="utf-8").strip() == fp):
            why = _checkpoint_looks_sound(ck)
            if why is None:
                found.append((ck.stat().st_mtime, d))
            elif damaged is not None:
                damaged.append((d, why))
    return max(found)[1] if found else None


def find_unstarted(runs_dir: Path, fp: str) -> Path | None:
    """The oldest run folder with fingerprint `fp` that has no checkpoint at all (a run killed
    before its first epoch ended): starting again there leaves no abandoned folder behind."""
    if not Path(runs_dir).is_dir():
        return None
    found = sorted(
        d for d in Path(runs_dir).iterdir()
        if d.is_dir() and (d / FINGERPRINT_FILE).is_file() and not (d / LAST_CHECKPOINT).exists()
        and not runs.is_complete(d)
        and (d / FINGERPRINT_FILE).read_text(encoding="utf-8").strip() == fp
    )
    return found[0] if found else None


def _write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(run_dir / runs.HISTORY_FILE, buf.getvalue())


@contextlib.contextmanager
def _deterministic(on: bool) -> Iterator[None]:
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


# ---------------------------------------------------------------- training


@dataclass
class FinetuneResult:
    run_dir: Path
    finished: bool  # False when stopped by max_epochs_this_call (resumable)
    record: runs.RunRecord | None
    epochs_done: int
    best_epoch: int
    skipped: list[tuple[str, str]]
    resumed_from_epoch: int


def finetune(
    data_dir: str | os.PathLike[str],
    split: str | os.PathLike[str],
    cfg: FinetuneConfig,
    weights: str | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    runs_dir: str | os.PathLike[str] = "runs",
    resume: str | os.PathLike[str] | bool = True,
    progress: bool = True,
    max_epochs_this_call: int | None = None,
    options: Any = None,
) -> FinetuneResult:
    """Train `cfg.model` on the split's train images and write a run record.

    `options`: the `featsvm.features.preprocess.ImageOptions` of the inputs (view, stain,
    colour, annotation mask); default: resolved from ``cfg.input`` (`image_options`).

    `resume`: True = continue a matching unfinished run under `runs_dir` if there is one;
    False = always start a new run; a path = continue that run folder (its fingerprint must
    match). `max_epochs_this_call` stops after that many epochs in this call, leaving a
    resumable checkpoint (time-sliced training; tests use it to simulate an interruption).
    """
    from featsvm.device import check_precision, resolve_device, resolve_precision

    cfg = cfg.validate()
    data_dir = Path(data_dir)
    manifest: Manifest = read_manifest(split)
    device = resolve_device(cfg.device)
    check_precision(device, cfg.precision)
    if cfg.precision == "auto":  # bf16 where the CPU has it natively (featsvm.device)
        cfg = dataclasses.replace(cfg, precision=resolve_precision(device, cfg.precision))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    if options is None:
        options = image_options(cfg, split, data_dir)
    else:  # recorded with the run's settings
        from featsvm.features.preprocess import input_name

        cfg = dataclasses.replace(cfg, input=input_name(options))
    torch.manual_seed(cfg.seed)  # head initialisation
    built = build_model(cfg.model, cfg, weights, weights_dir, options)
    frozen_until = apply_freeze(built, cfg.freeze)
    fp = fingerprint(cfg, manifest.sha256, built.weights, data_dir, options.to_dict())
    run_dir = run_folder(resume, Path(runs_dir), fp, cfg.model)

    # one process per run folder (a second identical command is refused, not merged)
    with FileLock(run_dir / TRAIN_LOCK, True, _run_busy):
        for tmp in remove_temp_files(run_dir):
            logger.warning("removed %s, left in %s by a save that was killed", tmp.name,
                           run_dir)
        images = load_images(data_dir, manifest, built, cfg, progress, split)
        feeder, augmentation, cache_seconds = make_feeder(built, images, cfg, device, progress)
        opt = Optimisation.build(built.model, built.backbone, images.sets["train"].targets, cfg,
                                 device)
        training = Training(cfg, device, run_dir, fp, built.model, feeder, opt, images,
                            progress, cache_seconds)
        training.resume()
        training.describe(frozen_until)
        st = training.state
        if not training.run(max_epochs_this_call):
            return FinetuneResult(run_dir, False, None, st.epoch, st.best_epoch, images.skipped,
                                  st.resumed_from)
        record = write_record(training, manifest, built, images, str(data_dir), frozen_until,
                              augmentation)
        for name in (LAST_CHECKPOINT, BEST_CHECKPOINT, TRAIN_LOCK):
            (run_dir / name).unlink(missing_ok=True)
        return FinetuneResult(run_dir, True, record, st.epoch, st.best_epoch, images.skipped,
                              st.resumed_from)


# ---------------------------------------------------------------- the steps of finetune()


def image_options(cfg: FinetuneConfig, split: str | os.PathLike[str],
                  data_dir: str | os.PathLike[str] | None) -> Any:
    """The `ImageOptions` of ``cfg.input`` (a Reinhard reference from the split's train
    images, computed once and kept next to the manifest)."""
    from featsvm.features.preprocess import input_options

    return input_options(cfg.input, split, data_dir)


def run_folder(resume: str | os.PathLike[str] | bool, runs_dir: Path, fp: str,
               model: str) -> Path:
    """Where this training writes: the folder to resume (given, or found by fingerprint), or a
    new run folder with the fingerprint recorded."""
    run_dir: Path | None = None
    if isinstance(resume, str | os.PathLike):
        run_dir = Path(resume)
        fpf = run_dir / FINGERPRINT_FILE
        if not (run_dir / LAST_CHECKPOINT).is_file() or not fpf.is_file():
            raise FinetuneError(f"{run_dir} has no {LAST_CHECKPOINT}: nothing to resume")
        if runs.is_complete(run_dir):
            raise FinetuneError(f"{run_dir} is already a complete run; nothing to resume")
        if fpf.read_text(encoding="utf-8").strip() != fp:
            raise FinetuneError(
                f"{run_dir} was started with different data, split, model, weights or "
                "settings (fingerprint differs); resume it with the same options, or start "
                "a new run without --resume"
            )
    elif resume:
        damaged: list[tuple[Path, str]] = []
        run_dir = find_resumable(runs_dir, fp, damaged)
        for d, why in damaged:
            logger.warning("not resuming %s: its %s is damaged (%s); starting afresh (delete "
                           "that folder)", d, LAST_CHECKPOINT, why)
    if run_dir is None and resume is True:
        run_dir = find_unstarted(runs_dir, fp)  # killed before its first checkpoint
    if run_dir is None:
        run_dir = runs.new_run_dir(runs_dir, model.replace("_", "-"), "ft")
        write_text_atomic(run_dir / FINGERPRINT_FILE, fp + "\n")
    return run_dir


@dataclass
class TrainImages:
    """The decoded train / val / test images, and what could not be used."""

    sets: dict[str, ImageSet]
    normaliser: Normaliser
    skipped: list[tuple[str, str]]
    seconds: float


def load_images(data_dir: Path, manifest: Manifest, built: Any, cfg: FinetuneConfig,
                progress: bool, split: str | os.PathLike[str]) -> TrainImages:
    """Decode every image of the three splits once (`featsvm.models.pixels.preload`); with
    the cell view every image gives its cell crops."""
    t0 = time.perf_counter()
    normaliser = normaliser_for(built.preprocessing)
    sets: dict[str, ImageSet] = {}
    skipped: list[tuple[str, str]] = []
    for name in ("train", "val", "test"):
        sets[name], sk = preload(data_dir, manifest.subset(name), built.transform, normaliser,
                                 cfg.workers, progress, desc=f"decode {name}")
        skipped.extend(sk)
    seconds = time.perf_counter() - t0
    for relpath, reason in skipped:
        logger.warning("skipped %s: %s", relpath, reason)
    if len(sets["train"]) < 2:
        raise FinetuneError(f"{split}: fewer than 2 usable train images; nothing to train on")
    if len(sets["val"]) == 0:
        raise FinetuneError(f"{split}: no usable val images; the val split selects the epoch")
    return TrainImages(sets, normaliser, skipped, seconds)


def make_feeder(built: Any, images: TrainImages, cfg: FinetuneConfig, device: torch.device,
                progress: bool) -> tuple[PixelFeeder | CachedFeeder, str, float]:
    """The model on its device and where its inputs come from: the decoded pixels, or the
    frozen trunk's cached outputs (``cache_frozen``). Returns (feeder, augmentation in words,
    seconds spent caching the trunk)."""
    model = built.model
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if not cfg.cache_frozen:
        augmentation = (f"per batch: flips, 90-degree rotations, colour jitter "
                        f"+-{cfg.color_jitter:g}"
                        + (f", HED stain jitter {cfg.stain_jitter:g}" if cfg.stain_jitter
                           else "") if cfg.augment else "none")
        return PixelFeeder(model, images.sets, images.normaliser, cfg, device), augmentation, 0.0
    if built.backbone is None:
        raise FinetuneError("cache_frozen applies to pretrained backbones, not basic-cnn")
    tc = time.perf_counter()
    trunk, rest = split_trunk(model)
    feats = cache_trunk(trunk, images.sets, images.normaliser, cfg, device, progress)
    cache_seconds = time.perf_counter() - tc
    stain = (f" + HED stain jitter {cfg.stain_jitter:g}"
             if cfg.augment and cfg.stain_jitter and cfg.cache_views > 1 else "")
    augmentation = (f"{cfg.cache_views} cached view(s) per train image (identity + random "
                    f"flips/90-degree rotations{stain}); no colour jitter")
    logger.info("cached the frozen trunk (%d stages, output %s) in %.0f s", len(list(trunk)),
                tuple(feats["val"].shape[1:]), cache_seconds)
    return CachedFeeder(rest, feats, cfg, device), augmentation, cache_seconds


def class_weights(targets: torch.Tensor, cfg: FinetuneConfig) -> torch.Tensor:
    """Loss weights per class: inverse train frequency ("balanced") or all ones."""
    counts = torch.bincount(targets, minlength=len(LABELS)).double()
    if cfg.class_weights == "balanced":
        cw = torch.where(counts > 0, counts.sum() / (len(LABELS) * counts.clamp(min=1)), 0.0)
    else:
        cw = torch.ones(len(LABELS), dtype=torch.float64)
    return cw.float()


@dataclass
class Optimisation:
    """AdamW with discriminative learning rates, the warm-up + cosine schedule per step, the
    fp16 grad scaler (CUDA only) and the class-weighted loss."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    use_scaler: bool
    criterion: nn.Module
    group_names: list[str]
    steps_per_epoch: int

    @classmethod
    def build(cls, model: nn.Module, backbone: str | None, targets: torch.Tensor,
              cfg: FinetuneConfig, device: torch.device) -> Optimisation:
        groups = _param_groups(model, backbone, cfg)
        optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "name"} for g in groups],
            lr=cfg.lr, weight_decay=cfg.weight_decay,
        )
        steps_per_epoch = len(list(_train_batches(len(targets), cfg.batch_size)))
        total_steps = steps_per_epoch * cfg.epochs
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_with_warmup(total_steps, warmup, cfg.min_lr_ratio))
        use_scaler = device.type == "cuda" and cfg.precision == "fp16"
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        criterion = nn.CrossEntropyLoss(weight=class_weights(targets, cfg).to(device),
                                        label_smoothing=cfg.label_smoothing)
        return cls(optimizer, scheduler, scaler, use_scaler, criterion,
                   [g["name"] for g in groups], steps_per_epoch)

    def lrs(self) -> dict[str, float]:
        return {n: g["lr"]
                for n, g in zip(self.group_names, self.optimizer.param_groups, strict=True)}


@dataclass
class TrainState:
    """Where training stands; saved in the last checkpoint after every epoch."""

    epoch: int = 0  # epochs completed
    best_score: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    resumed_from: int = 0
    stopped_early: bool = False
    stopped_by_budget: bool = False


class Training:
    """The epoch loop of one run folder: early stopping on the val split, the wall-clock
    budget, the best weights kept, and a resumable checkpoint after every epoch."""

    def __init__(self, cfg: FinetuneConfig, device: torch.device, run_dir: Path, fp: str,
                 model: nn.Module, feeder: PixelFeeder | CachedFeeder, opt: Optimisation,
                 images: TrainImages, progress: bool, cache_seconds: float) -> None:
        self.cfg, self.device, self.run_dir, self.fp = cfg, device, run_dir, fp
        self.model, self.feeder, self.opt, self.images = model, feeder, opt, images
        self.progress, self.cache_seconds = progress, cache_seconds
        self.state = TrainState()

    def resume(self) -> None:
        """Continue from the run folder's last checkpoint, if it has one."""
        last = self.run_dir / LAST_CHECKPOINT
        if not last.is_file():
            return
        opt, st = self.opt, self.state
        ck = _load_checkpoint(last, self.device, ("model", "optimizer", "scheduler", "epoch",
                                                  "best_score", "best_epoch", "history"))
        self.model.load_state_dict(ck["model"])
        opt.optimizer.load_state_dict(ck["optimizer"])
        opt.scheduler.load_state_dict(ck["scheduler"])
        if opt.use_scaler and ck.get("scaler"):
            opt.scaler.load_state_dict(ck["scaler"])
        st.epoch, st.best_score = int(ck["epoch"]), float(ck["best_score"])
        st.best_epoch, st.train_seconds = int(ck["best_epoch"]), float(ck["train_seconds"])
        st.history = list(ck["history"])
        st.best_state = self._best_state(ck)
        st.resumed_from = st.epoch
        logger.info(f"resuming {self.run_dir} after epoch {st.epoch} (best so far: epoch "
                    f"{st.best_epoch}, val {self.cfg.select_metric} {st.best_score:.4f})")

    def _best_state(self, ck: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The weights of the checkpoint's best epoch. The last checkpoint is written before
        the best one, so a kill between the two leaves a best file of an earlier epoch: the
        best epoch is then the last checkpoint's own epoch, whose weights it holds."""
        path = self.run_dir / BEST_CHECKPOINT
        best = _load_checkpoint(path, "cpu") if path.is_file() else None
        if isinstance(best, dict) and "state_dict" in best and "epoch" in best:
            if int(best["epoch"]) == int(ck["best_epoch"]):
                return best["state_dict"]
        elif best is not None:  # written by an older featsvm: a bare state dict
            return best
        if int(ck["best_epoch"]) == int(ck["epoch"]):
            return {k: v.detach().cpu().clone() for k, v in ck["model"].items()}
        raise FinetuneError(
            f"{path} does not hold the weights of best epoch {ck['best_epoch']} recorded in "
            f"{LAST_CHECKPOINT}; cannot resume {self.run_dir}: delete that folder (or start a "
            "new run with --no-resume)"
        )

    def describe(self, frozen_until: str | None) -> None:
        sets = self.images.sets
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info(f"{self.cfg.model}: {self.n_trainable:,} of {self.n_params:,} parameters "
                    f"trainable{f' (frozen up to {frozen_until})' if frozen_until else ''}; "
                    f"{len(sets['train'])} train / {len(sets['val'])} val / {len(sets['test'])} "
                    f"test images{self._inputs_note()} on {self.device}, "
                    f"{self.opt.steps_per_epoch} steps per epoch; "
                    f"run folder {self.run_dir}")

    def _inputs_note(self) -> str:
        sets = self.images.sets
        if all(v.owner is None for v in sets.values()):
            return ""
        return (f" ({sets['train'].n_inputs} / {sets['val'].n_inputs} / "
                f"{sets['test'].n_inputs} cell inputs)")

    def run(self, max_epochs_this_call: int | None = None) -> bool:
        """Train until the last epoch, early stopping or the time budget (True), or until
        `max_epochs_this_call` epochs were run in this call (False: resumable)."""
        st = self.state
        with _deterministic(self.device.type == "cpu"):
            while st.epoch < self.cfg.epochs:
                if self._should_stop():
                    break
                if (max_epochs_this_call is not None
                        and st.epoch - st.resumed_from >= max_epochs_this_call):
                    return False
                self._epoch()
        return True

    def _should_stop(self) -> bool:
        cfg, st = self.cfg, self.state
        if st.best_epoch and cfg.patience and st.epoch - st.best_epoch >= cfg.patience:
            st.stopped_early = True
            return True
        budget = cfg.max_train_minutes * 60.0
        spent = st.train_seconds + self.cache_seconds
        if budget > 0 and st.epoch > 0 and spent + st.train_seconds / st.epoch > budget:
            st.stopped_by_budget = True
            logger.info(f"stopping after epoch {st.epoch}: another epoch would exceed "
                        f"max_train_minutes = {cfg.max_train_minutes:g}")
            return True
        return False

    def _epoch(self) -> None:
        """One epoch: train, score val, keep the best weights, checkpoint, log a line."""
        cfg, st, opt = self.cfg, self.state, self.opt
        train_set, val_set = self.images.sets["train"], self.images.sets["val"]
        te = time.perf_counter()
        tr_loss, tr_acc = _train_epoch(self.feeder, train_set.targets, opt.optimizer, opt.scheduler,
                                       opt.scaler, opt.criterion, cfg, self.device, st.epoch,
                                       self.progress)
        val = _val_scores(_predict_images(self.feeder, "val", val_set), val_set.image_targets)
        seconds = time.perf_counter() - te
        st.train_seconds += seconds
        st.epoch += 1
        score = val[cfg.select_metric]
        improved = score > st.best_score
        if improved:
            st.best_score, st.best_epoch = score, st.epoch
            st.best_state = {k: v.detach().cpu().clone()
                             for k, v in self.model.state_dict().items()}
        lrs = opt.lrs()
        st.history.append({
            "epoch": st.epoch, "train_loss": tr_loss, "train_accuracy": tr_acc,
            "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"], "val_balanced_accuracy": val["balanced_accuracy"],
            "lr_head": lrs.get("head", ""), "lr_backbone": lrs.get("backbone", ""),
            "seconds": seconds, "best": int(improved),
        })
        self._checkpoint()  # the last checkpoint first: it names the best epoch ...
        if improved:  # ... whose weights it holds until this file catches up (`_best_state`)
            _save_torch({"epoch": st.epoch, "state_dict": st.best_state},
                        self.run_dir / BEST_CHECKPOINT)
        summary = (
            f"epoch {st.epoch}/{cfg.epochs}  loss {tr_loss:.4f}  acc {tr_acc:.3f} | val loss "
            f"{val['loss']:.4f}  acc {val['accuracy']:.3f}  macro-F1 {val['macro_f1']:.3f}  "
            f"bal-acc {val['balanced_accuracy']:.3f} | {seconds:.0f} s"
            f"{'  *best*' if improved else ''}"
        )
        logger.info(summary)

    def _checkpoint(self) -> None:
        st, opt = self.state, self.opt
        _save_torch({
            "fingerprint": self.fp, "epoch": st.epoch, "model": self.model.state_dict(),
            "optimizer": opt.optimizer.state_dict(), "scheduler": opt.scheduler.state_dict(),
            "scaler": opt.scaler.state_dict() if opt.use_scaler else {},
            "best_score": st.best_score, "best_epoch": st.best_epoch,
            "train_seconds": st.train_seconds, "history": st.history,
        }, self.run_dir / LAST_CHECKPOINT)
        _write_history(self.run_dir, st.history)


# ---------------------------------------------------------------- the run record


def write_record(training: Training, manifest: Manifest, built: Any, images: TrainImages,
                 data_dir: str, frozen_until: str | None, augmentation: str) -> runs.RunRecord:
    """Reload the best weights, predict val and test, fit the temperature on val, score them
    (with calibration and abstention blocks), fit the OOD flag (`fit_ood`), and write the run
    record: ``model.pt`` + sha256 sidecar, ``ood.skops`` + sidecar, predictions, metrics,
    config last."""
    cfg, st, run_dir = training.cfg, training.state, training.run_dir
    assert st.best_state is not None
    training.model.load_state_dict({k: v.to(training.device) for k, v in st.best_state.items()})
    tp = time.perf_counter()
    eval_rows: list[ManifestRow] = []
    probas: list[np.ndarray] = []
    embeddings: dict[str, np.ndarray] = {}
    for name in ("val", "test"):
        p, embeddings[name] = _forward_images(training.feeder, name, images.sets[name])
        probas.append(p)
        eval_rows.extend(images.sets[name].rows)
    raw = np.concatenate(probas) if probas else np.zeros((0, len(LABELS)))
    predict_seconds = time.perf_counter() - tp
    ood, ood_seconds = fit_ood(training, images, embeddings)
    temperature, proba, calib, selective, abstention = calibrate_and_abstain(raw, eval_rows,
                                                                             cfg)
    metrics = fm.score_predictions(manifest, eval_rows, proba, n_boot=cfg.n_boot, seed=cfg.seed)
    metrics["calibration"], metrics["selective"] = calib, selective

    model_path = run_dir / MODEL_FILE
    _save_torch({
        "format": "featsvm-finetune-1", "model": cfg.model, "labels": list(LABELS),
        "architecture": built.architecture, "preprocessing": built.preprocessing.to_json(),
        "state_dict": st.best_state,
    }, model_path)
    runs.write_sidecar(model_path)
    config = _record_config(training, manifest, built, images, predict_seconds)
    config["timing"]["ood_seconds"] = round(ood_seconds, 2)
    config.update({"data_dir": data_dir, "freeze_until": frozen_until, "ood": ood,
                   "augmentation": augmentation, "abstention": abstention,
                   "calibration": {
                       "method": "temperature" if temperature is not None else "none",
                       "temperature": temperature,
                       "fitted_on": "val" if temperature is not None else None,
                       "note": "softmax(logits / T), T fitted by NLL on the val split (predict "
                               "applies it); val metrics are in-sample for T, test is untouched",
                   }})
    return runs.finish_run(run_dir, config, metrics, eval_rows, proba)


def fit_ood(training: Training, images: TrainImages, embeddings: dict[str, np.ndarray]
            ) -> tuple[dict[str, Any] | None, float]:
    """The run's out-of-distribution flag, as head runs fit theirs
    (`featsvm.evaluation.ood.fit_ood_flag`: fitted on the train images' embeddings, threshold
    at 95 % of val, in-lab test rate), on the network's penultimate-layer embedding (the
    input of its final linear classifier; the mean over an image's cells in the cell view).
    `embeddings` holds val and test from the prediction pass; train costs one more forward
    pass in eval mode, un-augmented (with the frozen-trunk cache only the trainable rest runs,
    on the cached identity view). Saved as ``ood.skops``; returns (config.json ``ood`` block
    or None, seconds)."""
    from featsvm.evaluation.ood import fit_ood_flag
    from featsvm.models.modelfile import save_ood_flag

    t0 = time.perf_counter()
    _, train = _forward_images(training.feeder, "train", images.sets["train"])
    flag, info = fit_ood_flag(train, embeddings["val"], embeddings["test"])
    if info is not None:
        info["embedding"] = (f"penultimate layer ({train.shape[1]}-d input of the final linear "
                             "classifier)" + ("; mean over the image's cells"
                                              if images.sets["train"].owner is not None
                                              else ""))
    ood = save_ood_flag(training.run_dir, flag, info)
    seconds = time.perf_counter() - t0
    if ood is not None:
        logger.info("OOD flag: threshold %.3f (95 %% of val); %.1f %% of test images flagged; "
                    "%.1f s", ood["threshold"], 100 * (ood["rate_test"] or 0.0), seconds)
    return ood, seconds


def calibrate_and_abstain(raw: np.ndarray, eval_rows: list[ManifestRow], cfg: FinetuneConfig
                          ) -> tuple[float | None, np.ndarray, dict[str, Any], dict[str, Any],
                                     dict[str, Any]]:
    """Temperature scaling fitted on the val rows only (`raw`: softmax of the val rows, then the
    test rows), applied to all; returns (T, calibrated probabilities, metrics calibration
    block, metrics selective block, config abstention block)."""
    n_val = sum(r.split == "val" for r in eval_rows)
    val_idx = fm.label_indices([r.label for r in eval_rows[:n_val]])
    temperature = (calibration.fit_temperature(calibration.log_proba(raw[:n_val]), val_idx)
                   if n_val else None)
    proba = raw if temperature is None else calibration.apply_temperature(raw, temperature)

    def part(sl: slice) -> tuple[list[str], np.ndarray | None, np.ndarray, list[Any]]:
        rs = eval_rows[sl]
        return ([r.label for r in rs], None if temperature is None else raw[sl], proba[sl],
                [r.group for r in rs])

    calib, selective, abstention = trust.run_blocks(
        part(slice(0, n_val)), part(slice(n_val, None)), temperature,
        "temperature" if temperature is not None else "none",
        target_error=cfg.target_error, n_boot=cfg.n_boot, seed=cfg.seed,
    )
    return temperature, proba, calib, selective, abstention


def _record_config(training: Training, manifest: Manifest, built: Any, images: TrainImages,
                   predict_seconds: float) -> dict[str, Any]:
    """config.json of the run (a data table; `write_record` adds the paths and settings)."""
    cfg, st = training.cfg, training.state
    train_s, cache_s = st.train_seconds, training.cache_seconds
    return {
        "run_id": training.run_dir.name,
        "kind": "end_to_end",
        "model": model_name(cfg, built.backbone is not None),
        "backbone": built.backbone,
        "head": None,
        "weights": built.weights.to_json(),
        "preprocessing": built.preprocessing.to_json(),
        "split": {"path": str(manifest.path), "sha256": manifest.sha256},
        "seed": cfg.seed,
        "model_file": MODEL_FILE,
        "timing": {
            "fit_seconds": round(train_s + cache_s, 2),
            "train_epochs_seconds": round(train_s, 2),
            "cache_seconds": round(cache_s, 2),
            "preload_seconds": round(images.seconds, 2),
            "predict_seconds": round(predict_seconds, 2),
            "seconds_per_epoch": round(train_s / max(1, st.epoch), 2),
        },
        "versions": runs.versions(),
        "created": runs.now_iso(),
        "device": str(training.device),
        "precision": cfg.precision,
        "threads": torch.get_num_threads(),
        "finetune": {k: v for k, v in _plain(cfg).items() if k not in ("models", "overrides")},
        "parameters": {"total": training.n_params, "trainable": training.n_trainable},
        "epochs_run": st.epoch,
        "best_epoch": st.best_epoch,
        "stopped_early": st.stopped_early,
        "stopped_by_budget": st.stopped_by_budget,
        "select_metric": cfg.select_metric,
        "best_val_score": st.best_score,
        "resumed": st.resumed_from > 0,
        "fingerprint": training.fp,
        "n_images": {k: len(v) for k, v in images.sets.items()},
        "n_inputs": {k: v.n_inputs for k, v in images.sets.items()},
        "inputs": _inputs_description(built.preprocessing),
        "skipped": [{"relpath": r, "reason": why} for r, why in images.skipped],
    }


def _inputs_description(pre: Any) -> str:
    """How an image becomes the network's inputs and its prediction, in words."""
    opts = pre.options
    text = opts.describe()
    if opts.view == "cells":
        text += ("; trained on the cells, each carrying its image's label; an image's "
                 "probabilities are the mean of its cells' (a field without a detected cell "
                 "is one input, the whole field resized)")
    return text


def _train_batches(n: int, batch_size: int) -> Iterator[slice]:
    """Batches of an epoch; a trailing batch of one image is dropped (BatchNorm needs two)."""
    for sl in batches(n, batch_size):
        if sl.stop - sl.start >= 2:
            yield sl


def _train_epoch(
    feeder: PixelFeeder | CachedFeeder,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    cfg: FinetuneConfig,
    device: torch.device,
    epoch: int,
    progress: bool,
) -> tuple[float, float]:
    from featsvm.device import autocast_context

    seed = cfg.seed * 100_003 + epoch
    torch.manual_seed(seed)  # dropout masks of this epoch
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(targets), generator=gen)
    model = feeder.net
    _set_train_mode(model)
    total_loss, correct, seen = 0.0, 0, 0
    steps = list(_train_batches(len(targets), cfg.batch_size))
    bar = tqdm(steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
               leave=False, unit="batch")
    for sl in bar:
        idx = order[sl]
        x = feeder.train(idx, gen)
        y = targets[idx].to(device)
        with autocast_context(device, cfg.precision):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        b = len(idx)
        total_loss += float(loss.detach()) * b
        correct += int((logits.argmax(1) == y).sum())
        seen += b
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    return total_loss / max(1, seen), correct / max(1, seen)
