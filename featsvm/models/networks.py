"""The end-to-end networks: building one (basic CNN or pretrained backbone + new head),
freezing its leading layers, cutting off the frozen trunk, reading the penultimate-layer
embedding (`capture_embeddings`: the input of the final linear classifier, which the OOD flag
of an end-to-end run is fitted on), and reloading a finished run.

Pretrained models reuse `featsvm.features.backbones.load_backbone` (the same specs and weight
resolution as ``extract``; no second copy of model code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from featsvm import runs
from featsvm.errors import FinetuneError
from featsvm.features.key import WeightsId
from featsvm.features.preprocessing import Preprocessing
from featsvm.labels import LABELS
from featsvm.models.basic_cnn import BasicCNN, BasicCNNSpec, basic_cnn_preprocessing
from featsvm.models.pixels import Normaliser, batches
from featsvm.names import BACKBONES, BASIC_CNN, MODELS


class NetworkOptions(Protocol):
    """The part of `models.finetune.FinetuneConfig` that shapes the network."""

    basic_cnn_size: int
    basic_cnn_channels: tuple[int, ...]
    basic_cnn_dense: int
    basic_cnn_dropout: float
    head_dropout: float

# freeze="auto": the module (path in the backbone's full model) up to which, inclusive,
# everything is frozen, leaving the last block (and for VGG16/AlexNet with a pretrained
# classifier, fc6/fc7) plus the new head trainable. A test checks that each resolves.
FREEZE_AUTO: dict[str, str] = {
    "vgg16": "features.21",  # block4's last conv; block5 (features.24-28) trains
    "alexnet": "features.8",  # the fourth conv; the fifth (features.10) trains
    "inception_v3": "Mixed_7b",  # Mixed_7c trains
    "efficientnet_lite0": "blocks.5",  # blocks.6, conv_head and bn2 train
}


class FinetuneModel(nn.Module):
    """A pretrained embedder ([N, 3, H, W] -> [N, D]) with a new dropout + linear head."""

    def __init__(self, embedder: nn.Module, dim: int, num_classes: int = len(LABELS),
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.embedder = embedder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedder(x))


@dataclass
class BuiltModel:
    model: nn.Module
    preprocessing: Preprocessing
    transform: Callable[[Image.Image], torch.Tensor]
    backbone: str | None
    weights: WeightsId
    architecture: dict[str, Any]  # what load_finetuned needs to rebuild the module
    full_model: nn.Module | None = None  # the backbone's whole network (names for --freeze)


def _basic_spec(cfg: NetworkOptions) -> BasicCNNSpec:
    return BasicCNNSpec(cfg.basic_cnn_size, tuple(cfg.basic_cnn_channels), cfg.basic_cnn_dense,
                        cfg.basic_cnn_dropout)


def inputs_transform(pre: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised tensor, as `pre` describes it: [3, H, W] for the plain
    whole field (the backbone's transform), [k, 3, H, W] when it has image options (view,
    stain, colour, mask; `Preprocessing.image_transform`: k = the number of cell crops in the
    cell view, else 1)."""
    from featsvm.features.preprocess import ImageOptions

    if pre.options != ImageOptions():
        return pre.image_transform()
    return pre.transform()


def normaliser_for(pre: Preprocessing) -> Normaliser:
    """The input normalisation of `pre`, probed on the backbone's own transform (stain
    normalisation or colour removal would move the probe's black and white)."""
    return Normaliser.probe(pre.transform())


def _with_options(pre: Preprocessing, options: Any, cell_size: int | None = None
                  ) -> Preprocessing:
    """`pre` with the image options (as `extract` records them); the basic CNN's fixed input
    size sets the cell crop size (its dense layer needs it)."""
    if options is None:
        return pre
    if cell_size is not None and options.view == "cells":
        options = dataclasses.replace(options, cell_size=cell_size)
    return pre.with_options(options)


def build_model(
    model: str,
    cfg: NetworkOptions,
    weights: str | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    options: Any = None,
) -> BuiltModel:
    """The network to train, its preprocessing and its weights provenance."""
    from featsvm.features.backbones import load_backbone

    if model == BASIC_CNN:
        if weights not in (None, "none"):
            raise FinetuneError("basic-cnn is trained from scratch: it takes no --weights")
        spec = _basic_spec(cfg)
        pre = _with_options(basic_cnn_preprocessing(spec), options, spec.input_size)
        return BuiltModel(
            BasicCNN(len(LABELS), spec), pre, inputs_transform(pre), None, WeightsId.none(),
            {"kind": BASIC_CNN, "spec": dataclasses.asdict(spec)},
        )
    if model not in BACKBONES:
        raise FinetuneError(f"unknown model {model!r}; use one of {', '.join(MODELS)}")
    loaded = load_backbone(model, weights=weights, weights_dir=weights_dir)
    net = FinetuneModel(loaded.embedder, int(loaded.dim), len(LABELS), cfg.head_dropout)
    pre = _with_options(loaded.preprocessing, options)
    return BuiltModel(net, pre, inputs_transform(pre), model, WeightsId.from_info(loaded.weights),
                      {"kind": "backbone", "backbone": model, "dim": int(loaded.dim),
                       "head_dropout": cfg.head_dropout}, loaded.model)


def apply_freeze(built: BuiltModel, freeze: str) -> str | None:
    """Freeze embedder parameters per `freeze` (see the module docstring); returns the module
    frozen up to (None when nothing is frozen).

    A module name is looked up first in the backbone's full model (``blocks.5``,
    ``Mixed_7b``, ``features.21``: the names users know) and mapped to the embedder by
    identity, then among the embedder's own module names.
    """
    freeze = (freeze or "none").strip()
    if built.backbone is None:
        if freeze != "none":
            raise FinetuneError("basic-cnn is trained from scratch: use --freeze none")
        return None
    if freeze == "none":
        return None
    embedder = built.model.embedder  # type: ignore[union-attr]
    params = list(embedder.named_parameters())
    if freeze == "all":
        for _, p in params:
            p.requires_grad_(False)
        return "all"
    until = FREEZE_AUTO.get(built.backbone) if freeze == "auto" else freeze
    if until is None:
        raise FinetuneError(f"--freeze auto has no rule for {built.backbone}; name a module")
    full = dict(built.full_model.named_modules()) if built.full_model is not None else {}
    own = dict(embedder.named_modules())
    target = full.get(until) or own.get(until)
    if target is None or not any(target is m for m in own.values()):
        tops = [n for n, _ in (full or own).items() if n and n.count(".") <= 1]
        raise FinetuneError(
            f"--freeze {until!r}: no module of that name in the {built.backbone} embedder; "
            f"use none, all, auto or one of: {', '.join(tops[:80])}"
        )
    inside = {id(p) for p in target.parameters()}
    last = max((i for i, (_, p) in enumerate(params) if id(p) in inside), default=-1)
    if last < 0:
        raise FinetuneError(f"--freeze {until!r}: that module has no parameters; name a layer "
                            "that has weights (a convolution or a block)")
    for i, (_, p) in enumerate(params):
        p.requires_grad_(i > last)
    return until


def _chain(module: nn.Module) -> list[nn.Module]:
    """`module` as a flat list of stages whose composition is its forward: plain
    ``nn.Sequential`` containers are expanded recursively, anything else is one stage."""
    if type(module) is nn.Sequential:
        return [m for child in module for m in _chain(child)]
    return [module]


def split_trunk(model: nn.Module) -> tuple[nn.Sequential, nn.Module]:
    """(trunk, rest) of a FinetuneModel: the trunk is the longest leading run of embedder
    stages with no trainable parameter; rest = remaining stages + head. Both share the
    model's modules, so training `rest` trains `model`."""
    stages = _chain(model.embedder)  # type: ignore[union-attr]
    cut = 0
    while cut < len(stages) and not any(p.requires_grad for p in stages[cut].parameters()):
        cut += 1
    if cut == 0:
        raise FinetuneError("cache_frozen needs frozen leading layers: set freeze (e.g. auto)")
    return nn.Sequential(*stages[:cut]), nn.Sequential(*stages[cut:], model.head)  # type: ignore[union-attr]


def final_linear(model: nn.Module) -> nn.Linear:
    """The network's final linear classifier: the last ``nn.Linear`` registered in `model`.
    Every network here registers its classifier last (`BasicCNN.classifier` after its
    features, `FinetuneModel.head` after the embedder, the trunk-split ``rest`` ends with the
    head), and a test checks that the layer's output is the network's logits."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise FinetuneError(f"{type(model).__name__} has no linear classifier")
    return last


@contextlib.contextmanager
def capture_embeddings(model: nn.Module, on: bool = True) -> Iterator[list[torch.Tensor]]:
    """Inside the block every forward pass of `model` appends the input of its final linear
    classifier (the penultimate-layer embedding, [N, D] float32 on the CPU) to the yielded
    list: the embedding comes from the same pass as the logits, at no extra cost. `on` False:
    nothing is captured (the list stays empty)."""
    out: list[torch.Tensor] = []
    if not on:
        yield out
        return

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        out.append(args[0].detach().float().flatten(1).cpu())

    handle = final_linear(model).register_forward_pre_hook(hook)
    try:
        yield out
    finally:
        handle.remove()


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    pixels: torch.Tensor,
    normaliser: Normaliser,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 64,
    channels_last: bool = False,
) -> np.ndarray:
    """Softmax probabilities (float64, LABELS order) for uint8 pixels [N, 3, H, W]."""
    from featsvm.device import autocast_context

    model.eval()
    out = []
    for sl in batches(len(pixels), batch_size):
        x = normaliser(pixels[sl].float().div_(255.0)).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, precision):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu().double())
    if not out:
        return np.zeros((0, len(LABELS)))
    return torch.cat(out).numpy()


def load_finetuned(run_dir: str | os.PathLike[str]
                   ) -> tuple[nn.Module, Callable[[Image.Image], torch.Tensor], dict[str, Any]]:
    """(model in eval mode, PIL->tensor transform, config) of an end-to-end run record. The
    transform gives [k, 3, H, W] for runs trained with image options (`inputs_transform`).

    The checkpoint is checked against its sidecar and config.json first; the file is loaded with
    ``weights_only=True`` (no code runs). The backbone architecture is rebuilt from its spec
    with random weights and then filled from the checkpoint, so no weights file is needed.
    """
    from featsvm.features.backbones import load_backbone

    record = runs.read_run(run_dir)
    if record.config.get("kind") != "end_to_end":
        raise FinetuneError(f"{run_dir} is a {record.config.get('kind')!r} run, not end_to_end")
    runs.verify_model(record)  # its sidecar and the sha256 config.json records
    try:
        ck = torch.load(record.model_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is a broken record
        raise runs.RunRecordError(f"{record.model_path}: cannot load the checkpoint "
                                  f"({type(exc).__name__}: {exc})") from None
    arch = ck["architecture"]
    pre = Preprocessing.from_json(ck["preprocessing"])
    if arch["kind"] == BASIC_CNN:
        spec = arch["spec"]
        net: nn.Module = BasicCNN(len(LABELS), BasicCNNSpec(
            spec["input_size"], tuple(spec["channels"]), spec["dense"], spec["dropout"]))
    else:
        loaded = load_backbone(arch["backbone"], weights="none", layer=pre.layer)
        # hooks the training weights needed (e.g. Keras pooling for the nsfwjs InceptionV3)
        # are not implied by random weights: re-apply what the run recorded
        pre.apply_hooks(loaded.model, skip=loaded.preprocessing.hooks)
        net = FinetuneModel(loaded.embedder, int(arch["dim"]), len(LABELS), arch["head_dropout"])
    net.load_state_dict(ck["state_dict"])
    net.eval()
    return net, inputs_transform(pre), record.config
