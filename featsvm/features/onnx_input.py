"""A backbone's input transform in numpy and Pillow only, for `featsvm predict --onnx` (which
must run without torch): the same steps as the torchvision transform
`featsvm.features.backbones.make_transform` builds from a preprocessing dict, on the same
Pillow calls.

* ``Resize(resize)``: the shorter side to ``resize`` pixels, the longer one to
  ``int(resize * long / short)`` (torchvision's rule), with Pillow's bilinear or bicubic
  filter (what torchvision uses on PIL images; Pillow's resampling always antialiases);
* ``CenterCrop(crop)``: top / left offsets ``int(round((size - crop) / 2))``;
* ``ToTensor`` + ``Normalize``: uint8 / 255, then (x - mean) / std per channel, [3, H, W].

The image options that act on the whole field (``mask_annotation``, Reinhard ``stain``,
``colour``) run first, through the same torch-free functions the torch path uses. The cell
view needs the cell detector and mean-pooling over cells: an ONNX export refuses it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from featsvm.errors import UsageError

_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST}


def check_exportable(pre: dict[str, Any]) -> None:
    """Refuse preprocessing an ONNX model cannot reproduce on its own (see module doc)."""
    if "features" in pre:
        raise UsageError("a hand-crafted baseline has no network to export")
    if pre.get("view", "field") != "field":
        raise UsageError("export handles the field view only (the cell view needs the cell "
                         "detector and pools several crops per image)")
    if pre.get("interpolation") not in _FILTERS:
        raise UsageError(f"unknown interpolation {pre.get('interpolation')!r}")


def _resize(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), _FILTERS[interpolation])


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if w < size or h < size:
        raise UsageError(f"image {w}x{h} is smaller than the {size}-pixel crop after resizing")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _whole_field_options(image: Image.Image, pre: dict[str, Any]) -> Image.Image:
    if pre.get("mask_annotation"):
        from featsvm.data.annotation import mask_annotation

        image = mask_annotation(image)
    if pre.get("stain", "none") == "reinhard":
        from featsvm.features import stain

        image = stain.reinhard(image, stain.LabStats.from_list(pre["stain_reference"]))
    if pre.get("colour", "rgb") != "rgb":
        from featsvm.features import stain

        image = stain.colour_free(image, pre["colour"])
    return image


def prepare(image: Image.Image, pre: dict[str, Any]) -> np.ndarray:
    """One PIL image -> float32 [3, crop, crop], as the torch transform makes it."""
    image = _whole_field_options(image.convert("RGB"), pre)
    image = _resize(image, int(pre["resize"]), str(pre["interpolation"]))
    image = _center_crop(image, int(pre["crop"]))
    x = np.asarray(image, dtype=np.float32) / 255.0
    mean = np.asarray(pre["mean"], dtype=np.float32)
    std = np.asarray(pre["std"], dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1), dtype=np.float32)


def prepare_batch(images: list[Image.Image], pre: dict[str, Any]) -> np.ndarray:
    return np.stack([prepare(im, pre) for im in images]) if images else np.zeros(
        (0, 3, int(pre["crop"]), int(pre["crop"])), dtype=np.float32)
