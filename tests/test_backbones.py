"""Backbone spec table, embedders, preprocessing round trip and the Keras pooling hook."""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image
from torch import nn

from featsvm.features.backbones import (
    SPECS,
    choose_layer,
    get_spec,
    load_backbone,
    make_transform,
    preprocessing_for,
)
from featsvm.features.hooks import keras_avgpool_semantics
from featsvm.features.weights import WeightsInfo

# (input size, resize, interpolation, default layer with a full pretrained file, its width)
EXPECTED = {
    "vgg16": (224, 256, "bilinear", "fc7", 4096),
    "inception_v3": (299, 342, "bilinear", "avgpool", 2048),
    "alexnet": (224, 256, "bilinear", "fc7", 4096),
    "efficientnet_lite0": (224, 256, "bicubic", "pre_logits", 1280),
}


@functools.cache
def _random(name: str):
    """One random-weights build per backbone for the whole module (builds are slow)."""
    return load_backbone(name, weights="none")


def test_spec_table() -> None:
    assert set(SPECS) == set(EXPECTED) | {"colour_stats", "annotation_box"}
    full = WeightsInfo("some file", "0" * 64, "test")
    for name, (size, resize, interp, layer, dim) in EXPECTED.items():
        spec = get_spec(name)
        assert (spec.input_size, spec.crop_size, spec.resize_size) == (size, size, resize)
        assert spec.interpolation == interp
        chosen = choose_layer(spec, full)
        assert (chosen.name, chosen.dim) == (layer, dim)
        assert spec.default_url.startswith("https://")


def test_layer_rule_without_classifier() -> None:
    """A file without classifier weights gives the conv-block GAP, and fc7 is refused."""
    vgg = get_spec("vgg16")
    no_cls = WeightsInfo("conv base", "1" * 64, "test",
                         missing_keys=("classifier.0.weight", "classifier.3.weight"))
    assert (choose_layer(vgg, no_cls).name, choose_layer(vgg, no_cls).dim) == ("gap", 512)
    with pytest.raises(ValueError, match="needs pretrained"):
        choose_layer(vgg, no_cls, "fc7")
    assert choose_layer(get_spec("alexnet"), no_cls).name == "fc7"  # other keys: alexnet fc6=1
    inc = get_spec("inception_v3")
    no_fc = WeightsInfo("no fc", "2" * 64, "test", missing_keys=("fc.weight", "fc.bias"))
    assert choose_layer(inc, no_fc).name == "avgpool"
    assert choose_layer(inc, no_fc, "mixed_6c").dim == 768
    with pytest.raises(ValueError, match="logits"):
        choose_layer(inc, no_fc, "logits")


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="vgg16"):
        get_spec("resnet50")
    with pytest.raises(ValueError, match="fc7, gap, logits"):
        get_spec("vgg16").layer("pool5")


@pytest.mark.parametrize(
    ("name", "size"), [("alexnet", 64), ("efficientnet_lite0", 64), ("inception_v3", 80)]
)
def test_embedders_random(name: str, size: int) -> None:
    lb = _random(name)
    assert lb.weights.label == "random" and lb.weights.sha256 is None
    assert not lb.model.training and not lb.embedder.training
    model_params = {p.data_ptr() for p in lb.model.parameters()}
    assert all(p.data_ptr() in model_params for p in lb.embedder.parameters())
    with torch.inference_mode():
        out = lb.embedder(torch.randn(2, 3, size, size))
        for layer in lb.spec.layers:
            assert layer.make(lb.model)(torch.randn(1, 3, size, size)).shape == (1, layer.dim)
    assert out.shape == (2, lb.dim) == (2, EXPECTED[name][4])
    if name == "alexnet":  # an embedder takes a new head; gradients reach the backbone
        head = nn.Sequential(lb.embedder, nn.Linear(lb.dim, 4)).train()
        head(torch.randn(2, 3, size, size)).sum().backward()
        assert lb.model.features[0].weight.grad is not None
        lb.model.eval()  # the shared modules were switched to train mode with the head
        lb.model.zero_grad(set_to_none=True)


def test_random_weights_are_reproducible() -> None:
    a = _random("alexnet").model.state_dict()
    b = load_backbone("alexnet", weights="none").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_make_transform_round_trip() -> None:
    pre = preprocessing_for(get_spec("inception_v3"), WeightsInfo("x", "3" * 64, "t"))
    t = make_transform(pre)
    img = Image.new("RGB", (224, 160), (124, 116, 104))
    x = t(img)
    assert x.shape == (3, 299, 299)
    # ImageNet mean colour normalises to about 0
    assert x.abs().max() < 0.02
    with pytest.raises(ValueError, match="interpolation"):
        make_transform({k: v for k, v in pre.to_json().items() if k != "interpolation"})


def test_keras_avgpool_hook_excludes_padding() -> None:
    from torchvision.models.inception import InceptionA

    block = InceptionA(8, pool_features=4)
    seen: list[torch.Tensor] = []
    keras_avgpool_semantics(nn.Sequential(block))
    block.branch_pool.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    block(torch.ones(1, 8, 5, 5))
    # Keras 'same' average of a constant is that constant, also at borders and corners
    assert torch.allclose(seen[0], torch.ones_like(seen[0]))


def _reference_embedding(name: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same embeddings computed through each library's own forward code."""
    if name == "efficientnet_lite0":
        return m.forward_head(m.forward_features(x), pre_logits=True)
    if name == "inception_v3":
        fc, m.fc = m.fc, nn.Identity()
        try:
            return m(x)
        finally:
            m.fc = fc
    # torchvision VGG/AlexNet: full model with the last Linear removed
    last, m.classifier[-1] = m.classifier[-1], nn.Identity()
    try:
        return m(x)
    finally:
        m.classifier[-1] = last


@pytest.mark.parametrize(
    ("name", "size"), [("alexnet", 64), ("efficientnet_lite0", 64), ("inception_v3", 80)]
)
def test_embedder_equals_library_forward(name: str, size: int) -> None:
    lb = _random(name)
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        torch.testing.assert_close(lb.embedder(x), _reference_embedding(name, lb.model, x))


def test_the_light_name_lists_match_the_registries() -> None:
    """featsvm.names (what the CLI offers without importing torch) agrees with the code."""
    from featsvm import names
    from featsvm.features.backbones import SPECS
    from featsvm.models.networks import FREEZE_AUTO

    assert tuple(SPECS) == names.FEATURES == (*names.BACKBONES, *names.BASELINES)
    assert all(SPECS[b].image_features is not None for b in names.BASELINES)
    assert all(SPECS[b].image_features is None for b in names.BACKBONES)
    assert set(FREEZE_AUTO) == set(names.BACKBONES)
    assert (names.BASIC_CNN, *names.BACKBONES) == names.MODELS
