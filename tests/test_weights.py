"""Weights resolution and refusal: local files, weights.toml, offline default, shared files."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import pytest
import torch

import featsvm.features.weights as W
from featsvm.features.backbones import get_spec, load_backbone
from featsvm.features.weights import WeightsError, inspect_weights, resolve_source


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(W.ENV_WEIGHTS_DIR, raising=False)


def _state(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    state = load_backbone(name, weights="none").model.state_dict()
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_none_is_random() -> None:
    src = resolve_source(get_spec("vgg16"), "none")
    assert (src.kind, src.label, src.sha256) == ("none", "random", None)


def test_local_file_full(tmp_path: Path) -> None:
    state = {k: v + 1.0 if v.is_floating_point() else v
             for k, v in _state("efficientnet_lite0").items()}
    full = tmp_path / "lite0.pth"
    torch.save(state, full)
    lb = load_backbone("efficientnet_lite0", weights=full)
    assert lb.weights.sha256 == _sha(full) and lb.weights.label == "file:lite0.pth"
    assert lb.weights.missing_keys == () and lb.weights.unexpected_keys == ()
    assert torch.equal(lb.model.state_dict()["conv_stem.weight"], state["conv_stem.weight"])
    assert (lb.layer, lb.dim) == ("pre_logits", 1280)


def test_local_alexnet_conv_file(tmp_path: Path) -> None:
    """AlexNet has no shared file: a local conv-only file fills features.*, the layer is GAP."""
    conv = {k: v * 2 for k, v in _state("alexnet", "features.").items()}
    conv["extra.weight"] = torch.zeros(3)
    partial = tmp_path / "alexnet-conv.pth"
    torch.save(conv, partial)
    info, _ = inspect_weights(get_spec("alexnet"), partial)
    assert set(info.missing_keys) == {f"classifier.{i}.{p}" for i in (1, 4, 6)
                                      for p in ("weight", "bias")}
    assert info.unexpected_keys == ("extra.weight",)
    lb = load_backbone("alexnet", weights=partial)
    assert (lb.layer, lb.dim) == ("gap", 256)  # no pretrained classifier
    assert torch.equal(lb.model.features[0].weight, conv["features.0.weight"])


def test_refuses_wrong_shapes_and_empty_fill(tmp_path: Path) -> None:
    state = _state("alexnet", "features.")
    state["features.0.weight"] = torch.zeros(8, 3, 3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match=r"features\.0\.weight: file \(8, 3, 3, 3\)"):
        load_backbone("alexnet", weights=bad)
    other = tmp_path / "other.pth"
    torch.save({"encoder.w": torch.zeros(2)}, other)
    with pytest.raises(WeightsError, match="fills no layer"):
        inspect_weights(get_spec("alexnet"), other)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="weights_only"):
        inspect_weights(get_spec("alexnet"), junk)
    with pytest.raises(WeightsError, match="not found"):
        inspect_weights(get_spec("alexnet"), tmp_path / "absent.pth")


def test_offline_default_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str) -> Path:
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(W, "_fetch_url", offline)
    for weights in (None, "default"):
        with pytest.raises(WeightsError) as err:
            resolve_source(get_spec("vgg16"), weights)
        msg = str(err.value)
        for option in ("--weights PATH", "--weights-dir DIR", "FEATSVM_WEIGHTS_DIR",
                       "--weights none", "Network is unreachable"):
            assert option in msg


def _index(folder: Path, entries: dict[str, tuple[str, str]]) -> None:
    text = "".join(f'[{b}]\nfile = "{f}"\nsha256 = "{s}"\nlabel = "test {b}"\n\n'
                   for b, (f, s) in entries.items())
    (folder / "weights.toml").write_text(text)


def test_weights_dir_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "a.pth"
    torch.save(_state("alexnet", "features."), f)
    _index(tmp_path, {"alexnet": ("a.pth", _sha(f))})
    src = resolve_source(get_spec("alexnet"), weights_dir=tmp_path)
    assert (src.path, src.label, src.sha256) == (f, "test alexnet", _sha(f))
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(tmp_path))
    assert resolve_source(get_spec("alexnet")).path == f  # honoured without an option
    assert resolve_source(get_spec("alexnet"), "none").label == "random"  # explicit wins
    with pytest.raises(WeightsError, match="no entry for 'vgg16'"):
        resolve_source(get_spec("vgg16"))
    _index(tmp_path, {"alexnet": ("a.pth", "0" * 64)})
    with pytest.raises(WeightsError, match="does not match the sha256"):
        resolve_source(get_spec("alexnet"))


# Expected missing keys, from shared/weights/MANIFEST.md
MANIFEST_MISSING = {
    "vgg16": {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")},
    "inception_v3": {"fc.weight", "fc.bias"},
    "efficientnet_lite0": set(),
    "alexnet": {f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias")},
}


@pytest.mark.shared_weights
def test_shared_weights_through_index(shared_weights: Path) -> None:
    with open(shared_weights / "weights.toml", "rb") as f:
        index = tomllib.load(f)
    assert set(index) == set(MANIFEST_MISSING)
    for name, entry in index.items():
        info, state = inspect_weights(get_spec(name), weights_dir=shared_weights)
        assert info.sha256 == entry["sha256"] == _sha(shared_weights / entry["file"])
        assert info.label == entry["label"]
        assert set(info.missing_keys) == MANIFEST_MISSING[name]
        assert info.unexpected_keys == ()
        assert state is not None and len(state) > 0
    lb = load_backbone("inception_v3", weights_dir=shared_weights)
    assert lb.preprocessing.hooks == ("keras_avgpool",)
    assert lb.preprocessing.not_imagenet_from == "Mixed_6d"
    assert (lb.layer, lb.dim) == ("avgpool", 2048)
    assert lb.model.state_dict()["Conv2d_1a_3x3.conv.weight"].dtype == torch.float32
    assert load_backbone("vgg16", weights_dir=shared_weights).layer == "gap"
    alex = load_backbone("alexnet", weights_dir=shared_weights)
    assert (alex.layer, alex.dim) == ("gap", 256)  # conv layers only: never fc6/fc7
