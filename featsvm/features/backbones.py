"""Backbone specs: one declarative `BackboneSpec` per pretrained CNN, and the loader.

Each spec is data (in the spirit of timm's ``PretrainedCfg`` / torchvision's ``Weights``):
how to build the architecture, which embedding layers it offers and how wide they are, how an
image must be prepared (resize, interpolation, crop, mean/std), where its default weights
come from, and what is known about specific local weight files (keys expected missing,
model hooks they need, layers that are not ImageNet-trained). Nothing below branches on a
backbone's name.

Embedding rule: the default layer is the first in ``spec.layers`` whose required weights are
pretrained in the loaded file. So VGG16/AlexNet give fc7 (4096-d) when the classifier is
pretrained and the global-average-pooled last conv block otherwise (VGG16: 512-d, e.g. the
shared Keras conv-base file), InceptionV3 gives avgpool (2048-d) and EfficientNet-Lite0 its
1280-d pre-logits. Other layers (``logits``, InceptionV3 ``mixed_6c``) are chosen with
``layer=``.

Hand-crafted baselines (``colour_stats``, ``annotation_box``; `featsvm.features.handcrafted`)
are specs too: their ``image_features`` is a non-torch embedder (PIL image -> vector). Their
"transform" computes the vector (shaped [dim, 1, 1] so that batches stay 4-d like images), their
network is a flatten, and they need no weights (label ``none``). Extract, predict and the cache
treat them like any other backbone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import nn

from featsvm.errors import UsageError
from featsvm.features.handcrafted import (
    ANNOTATION_BOX_FEATURES,
    COLOUR_STATS,
    ImageFeatures,
)
from featsvm.features.key import NO_WEIGHTS_LABEL, FeatureKey, WeightsId
from featsvm.features.preprocess import ImageOptions
from featsvm.features.preprocessing import Preprocessing
from featsvm.features.weights import RANDOM_SEED, WeightsInfo, inspect_weights

# ------------------------------------------------------------------------------ spec types


@dataclass(frozen=True)
class EmbeddingLayer:
    """One layer an embedding can be taken from."""

    name: str
    dim: int
    make: Callable[[nn.Module], nn.Module]  # full model -> embedder sharing its parameters
    needs: tuple[str, ...] = ()  # state_dict key prefixes that must be pretrained
    default_candidate: bool = True  # False: only used when asked for (e.g. logits)
    description: str = ""


@dataclass(frozen=True)
class KnownFile:
    """What is known about one specific weights file (matched by sha256)."""

    sha256: str
    label: str
    expected_missing: tuple[str, ...] = ()
    expected_unexpected: tuple[str, ...] = ()
    hooks: tuple[str, ...] = ()  # names in features.hooks.HOOKS applied after loading
    not_imagenet_from: str | None = None  # first module whose weights are not ImageNet-trained
    note: str = ""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[], nn.Module]  # architecture with random (seeded) init, no download
    layers: tuple[EmbeddingLayer, ...]
    input_size: int
    resize_size: int
    interpolation: str  # "bilinear" | "bicubic"
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_weights: str  # provenance of the default ImageNet weights
    default_url: str
    library: str  # "torchvision" | "timm"
    classifier_prefixes: tuple[str, ...]  # keys of the 1000-class classifier
    ignore_key_prefixes: tuple[str, ...] = ()  # dropped from files (e.g. InceptionV3 AuxLogits)
    known_files: tuple[KnownFile, ...] = field(default=())
    gflops: float = 0.0  # multiply-adds x 2 per image at input_size, for the benchmark
    # Fastest CPU batch size measured by benchmarks/batch_size.py (fp32, 2 cores): small
    # batches stay in cache for the conv nets; AlexNet's big fully connected layers want more.
    cpu_batch_size: int = 4
    reference: str = ""
    # a hand-crafted, non-torch embedder (shortcut baselines): no weights, no network
    image_features: ImageFeatures | None = None
    # May `--precision auto` run this network in bf16 on a CPU with native bf16? Only where
    # bf16 features keep cosine >= 0.999 with fp32 (benchmarks/engines.py); otherwise auto
    # keeps fp32 for it (featsvm.device.resolve_precision). An explicit bf16 still runs.
    auto_bf16: bool = True

    def layer(self, name: str) -> EmbeddingLayer:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise UsageError(
            f"{self.name} has no embedding layer {name!r}; choose one of "
            f"{', '.join(lay.name for lay in self.layers)}"
        )

    def known_file(self, sha256: str) -> KnownFile | None:
        return next((k for k in self.known_files if k.sha256 == sha256), None)


# ------------------------------------------------------------------------------ embedders


class InceptionInput(nn.Module):
    """torchvision InceptionV3 ``transform_input``: ImageNet-normalised -> (x/127.5 - 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ch0 = x[:, 0:1] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
        ch1 = x[:, 1:2] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
        ch2 = x[:, 2:3] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
        return torch.cat((ch0, ch1, ch2), 1)


def _gap() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def _vgg_fc7(m: nn.Module) -> nn.Module:
    # classifier = [fc6, relu, dropout, fc7, relu, dropout, fc8]: keep up to fc7's ReLU
    return nn.Sequential(m.features, m.avgpool, nn.Flatten(1), *list(m.classifier)[:5])


def _alexnet_fc7(m: nn.Module) -> nn.Module:
    # classifier = [dropout, fc6, relu, dropout, fc7, relu, fc8]
    return nn.Sequential(m.features, m.avgpool, nn.Flatten(1), *list(m.classifier)[:6])


def _conv_gap(m: nn.Module) -> nn.Module:
    return nn.Sequential(m.features, *_gap())


def _whole(m: nn.Module) -> nn.Module:
    return m


def _flatten(_m: nn.Module) -> nn.Module:
    return nn.Flatten(1)


_INCEPTION_STEM = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
    "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
    "Mixed_6c",
)
_INCEPTION_TOP = ("Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")


def _inception_input(m: nn.Module) -> list[nn.Module]:
    return [InceptionInput()] if getattr(m, "transform_input", False) else []


def _inception_avgpool(m: nn.Module) -> nn.Module:
    mods = [getattr(m, n) for n in _INCEPTION_STEM + _INCEPTION_TOP]
    return nn.Sequential(*_inception_input(m), *mods, m.avgpool, nn.Flatten(1))


def _inception_mixed_6c(m: nn.Module) -> nn.Module:
    mods = [getattr(m, n) for n in _INCEPTION_STEM]
    return nn.Sequential(*_inception_input(m), *mods, *_gap())


def _effnet_pre_logits(m: nn.Module) -> nn.Module:
    # timm EfficientNet: forward_features = conv_stem, bn1, blocks, conv_head, bn2;
    # global_pool is a SelectAdaptivePool2d that also flattens.
    return nn.Sequential(m.conv_stem, m.bn1, m.blocks, m.conv_head, m.bn2, m.global_pool,
                         nn.Flatten(1))


# ------------------------------------------------------------------------------ builders


def _build_vgg16() -> nn.Module:
    return torchvision.models.vgg16(weights=None)


def _build_alexnet() -> nn.Module:
    return torchvision.models.alexnet(weights=None)


def _build_inception_v3() -> nn.Module:
    # transform_input=True: inputs are ImageNet-normalised, the model maps them to x/127.5-1
    # (what both torchvision's and the Keras-converted weights expect).
    return torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, transform_input=True
    )


def _build_efficientnet_lite0() -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_VGG_CLASSIFIER = tuple(f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias"))

SPECS: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="vgg16",
            build=_build_vgg16,
            layers=(
                EmbeddingLayer("fc7", 4096, _vgg_fc7, ("classifier.0.", "classifier.3."),
                               description="penultimate fully connected layer, after ReLU"),
                EmbeddingLayer("gap", 512, _conv_gap,
                               description="global average of block5_pool (last conv block)"),
                EmbeddingLayer("logits", 1000, _whole, ("classifier.",), False,
                               "1000 ImageNet class logits"),
            ),
            input_size=224, resize_size=256, interpolation="bilinear", crop_size=224,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            default_weights="torchvision VGG16_Weights.IMAGENET1K_V1",
            default_url="https://download.pytorch.org/models/vgg16-397923af.pth",
            library="torchvision",
            classifier_prefixes=("classifier.",),
            known_files=(
                KnownFile(
                    sha256="df6e537f398449ff23af884434315cb34620402f41054e825eab382a3fcc6602",
                    label="VGG16 ImageNet conv base, original Oxford weights (Keras release); "
                    "no classifier",
                    expected_missing=_VGG_CLASSIFIER,
                    note="conv layers only; Keras caffe preprocessing folded into features.0 "
                    "(use torchvision normalisation)",
                ),
            ),
            gflops=30.95,
            reference="Simonyan & Zisserman 2015",
        ),
        BackboneSpec(
            name="inception_v3",
            build=_build_inception_v3,
            layers=(
                EmbeddingLayer("avgpool", 2048, _inception_avgpool,
                               description="global average pool after Mixed_7c"),
                EmbeddingLayer("mixed_6c", 768, _inception_mixed_6c,
                               description="global average of Mixed_6c (Keras mixed5)"),
                EmbeddingLayer("logits", 1000, _whole, ("fc.",), False,
                               "1000 ImageNet class logits"),
            ),
            input_size=299, resize_size=342, interpolation="bilinear", crop_size=299,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            default_weights="torchvision Inception_V3_Weights.IMAGENET1K_V1",
            default_url="https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
            library="torchvision",
            classifier_prefixes=("fc.",),
            ignore_key_prefixes=("AuxLogits.",),
            known_files=(
                KnownFile(
                    sha256="9705e7702949faae59bcbd61e11f337c245804e85ea8839d0e3139db680184f3",
                    label="InceptionV3 from nsfwjs: ImageNet stem to Mixed_6c (8-bit), "
                    "Mixed_6d onward tuned on another task; no fc",
                    expected_missing=("fc.weight", "fc.bias"),
                    hooks=("keras_avgpool",),
                    not_imagenet_from="Mixed_6d",
                    note="Mixed_6d and later were fine-tuned on NSFW images: the avgpool "
                    "embedding is not an ImageNet feature; layer mixed_6c (768-d) is the "
                    "deepest purely ImageNet one",
                ),
            ),
            gflops=11.46,
            reference="Szegedy et al. 2016",
        ),
        BackboneSpec(
            name="alexnet",
            build=_build_alexnet,
            layers=(
                EmbeddingLayer("fc7", 4096, _alexnet_fc7, ("classifier.1.", "classifier.4."),
                               description="penultimate fully connected layer, after ReLU"),
                EmbeddingLayer("gap", 256, _conv_gap,
                               description="global average of the last conv block"),
                EmbeddingLayer("logits", 1000, _whole, ("classifier.6.",), False,
                               "1000 ImageNet class logits"),
            ),
            input_size=224, resize_size=256, interpolation="bilinear", crop_size=224,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            default_weights="torchvision AlexNet_Weights.IMAGENET1K_V1",
            default_url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
            library="torchvision",
            classifier_prefixes=("classifier.",),
            gflops=1.43,
            cpu_batch_size=32,
            reference="Krizhevsky et al. 2012 (torchvision 'one weird trick' variant)",
        ),
        BackboneSpec(
            name="efficientnet_lite0",
            build=_build_efficientnet_lite0,
            layers=(
                EmbeddingLayer("pre_logits", 1280, _effnet_pre_logits,
                               description="global average pool after conv_head (1280-d)"),
                EmbeddingLayer("logits", 1000, _whole, ("classifier.",), False,
                               "1000 ImageNet class logits"),
            ),
            input_size=224, resize_size=256, interpolation="bicubic", crop_size=224,
            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            default_weights="timm tf_efficientnet_lite0.in1k",
            default_url="https://github.com/rwightman/pytorch-image-models/releases/download/"
            "v0.1-weights/tf_efficientnet_lite0-0aa007d2.pth",
            library="timm",
            classifier_prefixes=("classifier.",),
            known_files=(
                KnownFile(
                    sha256="0e570cb8311025cc1bc390e913ec2181d2e492bca0166994070fe187e9b45bbb",
                    label="EfficientNet-Lite0 ImageNet (TensorFlow release), timm "
                    "tf_efficientnet_lite0 layout, with classifier",
                ),
            ),
            gflops=0.80,
            # bf16 features: cosine 0.997 vs fp32 (benchmarks/results/engines.md): the
            # depthwise convolutions and ReLU6 clipping lose more than VGG16 / InceptionV3 /
            # AlexNet do, and the network is fast in fp32 anyway.
            auto_bf16=False,
            reference="Tan & Le 2019 (Lite variant, TensorFlow release)",
        ),
    )
}


def _handcrafted(features: ImageFeatures, reference: str) -> BackboneSpec:
    """The spec of a hand-crafted baseline: only `features` matters; the image fields are
    unused (the features read the decoded image at its own size)."""
    return BackboneSpec(
        name=features.name,
        build=nn.Identity,
        layers=(EmbeddingLayer(features.layer, features.dim, _flatten,
                               description=features.description),),
        input_size=0, resize_size=0, interpolation="none", crop_size=0,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        default_weights=NO_WEIGHTS_LABEL, default_url="", library="featsvm",
        classifier_prefixes=(), cpu_batch_size=64, reference=reference,
        image_features=features, auto_bf16=False,  # no network: precision means nothing
    )


NO_WEIGHTS = WeightsInfo(NO_WEIGHTS_LABEL, None, "hand-crafted features: no weights")

for _spec in (
    _handcrafted(COLOUR_STATS, "shortcut baseline: 27 colour statistics of the whole image"),
    _handcrafted(ANNOTATION_BOX_FEATURES,
                 "shortcut baseline: the burnt-in scale-annotation corner only"),
):
    SPECS[_spec.name] = _spec


def get_spec(name: str) -> BackboneSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise UsageError(f"unknown backbone {name!r}; choose one of {', '.join(SPECS)}") from None


# ------------------------------------------------------------------------------ preprocessing


def _pretrained(weights: WeightsInfo, prefixes: tuple[str, ...]) -> bool:
    """Are the keys under `prefixes` filled by the weights file? (random: trivially yes)"""
    if weights.is_random or not prefixes:
        return True
    return not any(k.startswith(prefixes) for k in weights.missing_keys)


def choose_layer(
    spec: BackboneSpec, weights: WeightsInfo, layer: str | None = None
) -> EmbeddingLayer:
    """The embedding layer to use: `layer` if given (and its weights are present), else the
    first default candidate whose required weights were loaded (see module doc)."""
    if layer is not None:
        chosen = spec.layer(layer)
        if not _pretrained(weights, chosen.needs):
            raise UsageError(
                f"layer {layer!r} of {spec.name} needs pretrained {', '.join(chosen.needs)} "
                f"weights, which {weights.label!r} does not provide; choose one of "
                f"{', '.join(x.name for x in spec.layers if _pretrained(weights, x.needs))}"
            )
        return chosen
    for cand in spec.layers:
        if cand.default_candidate and _pretrained(weights, cand.needs):
            return cand
    raise UsageError(f"no usable embedding layer for {spec.name} with {weights.label!r}")


def preprocessing_for(
    spec: BackboneSpec, weights: WeightsInfo, layer: str | None = None,
    options: ImageOptions | None = None,
) -> Preprocessing:
    """Everything between an RGB image and its embedding with these weights, with the image
    `options` (view, stain, colour, annotation mask; None: the defaults). A hand-crafted
    baseline takes only the annotation mask."""
    chosen = choose_layer(spec, weights, layer)
    if spec.image_features is not None:
        return Preprocessing(
            backbone=spec.name,
            features=spec.image_features.record(),
            layer=chosen.name,
            dim=chosen.dim,
            options=options or ImageOptions(),
        )
    known = spec.known_file(weights.sha256 or "")
    return Preprocessing(
        backbone=spec.name,
        input_size=spec.input_size,
        resize=spec.resize_size,
        interpolation=spec.interpolation,
        crop=spec.crop_size,
        mean=spec.mean,
        std=spec.std,
        layer=chosen.name,
        dim=chosen.dim,
        hooks=known.hooks if known else (),
        not_imagenet_from=known.not_imagenet_from if known else None,
        options=options or ImageOptions(),
    )


def make_transform(preprocessing: Preprocessing | Mapping[str, Any]) -> Callable[[Any], Any]:
    """The backbone transform of a `Preprocessing` (or of its JSON dict, from a cache file or
    a run record): PIL RGB image -> normalised float tensor [3,H,W]; for a hand-crafted
    baseline its feature vector as a [dim, 1, 1] tensor."""
    return Preprocessing.from_json(preprocessing).transform()


# ------------------------------------------------------------------------------ loading


@dataclass
class LoadedBackbone:
    spec: BackboneSpec
    model: nn.Module  # full network, eval mode
    embedder: nn.Module  # normalised batch [N,3,H,W] -> [N, dim]; shares model's parameters
    dim: int
    layer: str
    weights: WeightsInfo
    preprocessing: Preprocessing

    @property
    def transform(self) -> Callable[[Any], Any]:
        return self.preprocessing.transform()


def load_backbone(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    layer: str | None = None,
    options: ImageOptions | None = None,
) -> LoadedBackbone:
    """Build backbone `name`, load its weights (see `featsvm.features.weights`), apply the hooks its
    weights file needs, and return the model in eval mode with its embedder."""
    spec = get_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)  # 'random' weights are reproducible
        model = spec.build()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    info, state = _weights(spec, weights, weights_dir, shapes)
    if state is not None:
        model.load_state_dict(state, strict=False)
    preprocessing = preprocessing_for(spec, info, layer, options)
    preprocessing.apply_hooks(model)
    model.eval()
    chosen = spec.layer(str(preprocessing.layer))
    embedder = chosen.make(model).eval()
    return LoadedBackbone(spec, model, embedder, chosen.dim, chosen.name, info, preprocessing)


def describe(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    layer: str | None = None,
    options: ImageOptions | None = None,
) -> tuple[BackboneSpec, WeightsInfo, Preprocessing]:
    """(spec, weights info, preprocessing) without building the real model: cheap, used to
    find a cache file before deciding whether any image needs computing."""
    spec = get_spec(name)
    info, _ = _weights(spec, weights, weights_dir)
    return spec, info, preprocessing_for(spec, info, layer, options)


def _weights(
    spec: BackboneSpec,
    weights: str | os.PathLike[str] | None,
    weights_dir: str | os.PathLike[str] | None,
    shapes: dict[str, torch.Size] | None = None,
) -> tuple[WeightsInfo, dict[str, torch.Tensor] | None]:
    """`inspect_weights`, except that hand-crafted features have none (any --weights /
    --weights-dir is ignored for them: a study passes one folder for all backbones)."""
    if spec.image_features is not None:
        return NO_WEIGHTS, None
    return inspect_weights(spec, weights, weights_dir, model_shapes=shapes)


def feature_key(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    layer: str | None = None,
    precision: str = "fp32",
    options: ImageOptions | None = None,
) -> FeatureKey:
    """The `FeatureKey` these options give (weights resolved and hashed, no model built)."""
    _spec, info, pre = describe(name, weights, weights_dir, layer, options)
    return FeatureKey(name, WeightsId.from_info(info), precision, pre)
