"""Hand-crafted "backbones": shortcut baselines that see no cell morphology on purpose.

If a CNN embedding + head does not beat these, the model may be reading the look of the
acquisition session (stain, illumination, the burnt-in annotation) rather than the cells.
Both go through the same extract / fit / cv / report path as the CNNs (they are
`features.backbones.BackboneSpec` entries carrying an `ImageFeatures`), with their own cache
fingerprints.

* ``colour_stats`` (27 numbers): for each RGB channel, on the whole decoded image at its own
  size (0-255 scale): mean, standard deviation (population, ddof 0) and the percentiles
  1, 5, 25, 50, 75, 95, 99 (numpy's default linear interpolation). Order: channel-major,
  ``R_mean, R_std, R_p1 ... R_p99, G_mean ... B_p99`` (`COLOUR_STATS_NAMES`).
  With the cell view (``--view cells``; `featsvm.features.preprocess`) the same 27 numbers
  are computed per cell crop over its **non-black pixels** only (the cell; the blacked-out
  background is left out: max channel >= ``FOREGROUND_LEVEL``) and averaged over the
  field's cells like a CNN embedding: the shortcut check of the cell view.
* ``annotation_box`` (576 numbers): only the bottom-right scale-annotation box
  (`featsvm.data.annotation.annotation_box`: 25 % of the width x 20 % of the height),
  resized to 16 x 12 pixels (bilinear, PIL) and flattened row-major as RGB values / 255.
  16 x 12 rather than 32 x 24 (2,304 numbers): on the real data's test split the smaller box
  scores the same (logistic 80.4 vs 79.8 %, RBF SVM 87.2 vs 86.9 %) and its logistic head fits
  6x faster, which matters because pooled 10-fold CV of the larger box took 21 minutes.
  Raw resized pixels rather than an embedding: the annotation is a flat graphic (text and a
  scale bar on a plain background) that a linear or RBF head reads directly, and this keeps
  the baseline free of any pretrained network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from featsvm.data.annotation import ANNOTATION_BOX, crop_annotation

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
COLOUR_STATS_NAMES = tuple(
    f"{ch}_{stat}"
    for ch in "RGB"
    for stat in ("mean", "std", *(f"p{p}" for p in PERCENTILES))
)
BOX_SIZE = (16, 12)  # (width, height) the annotation box is resized to
# a pixel of a cell crop belongs to the cell when its max channel reaches this (0-255 scale;
# 0.06 x 255, the black level of featsvm.features.cells)
FOREGROUND_LEVEL = 15.3


@dataclass(frozen=True)
class ImageFeatures:
    """A non-torch embedder: decoded RGB image -> 1-D float32 vector of `dim` numbers.

    `params` (JSON-able) describe the computation; with `name` and `version` they are part of
    the preprocessing record and therefore of the cache fingerprint: bump `version` whenever
    `fn` changes its output."""

    name: str
    layer: str  # the single "embedding layer" name shown in cache files and reports
    dim: int
    fn: Callable[[Image.Image], np.ndarray]
    version: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, **self.params}


def colour_stats(img: Image.Image, foreground: bool = False) -> np.ndarray:
    """27 colour statistics of the whole image (see the module doc for the order); with
    `foreground`, of its non-black pixels (all pixels when every one is black)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    if foreground:
        keep = arr.max(axis=1) >= FOREGROUND_LEVEL
        arr = arr[keep] if keep.any() else arr
    out = []
    for c in range(3):
        v = arr[:, c]
        out += [v.mean(), v.std(), *np.percentile(v, PERCENTILES)]
    return np.asarray(out, dtype=np.float32)


def annotation_box_pixels(img: Image.Image) -> np.ndarray:
    """The annotation box resized to BOX_SIZE, flattened (H, W, RGB order), values in [0, 1]."""
    box = crop_annotation(img).resize(BOX_SIZE, resample=Image.Resampling.BILINEAR)
    return (np.asarray(box, dtype=np.float32) / 255.0).reshape(-1)


COLOUR_STATS = ImageFeatures(
    name="colour_stats",
    layer="stats",
    dim=len(COLOUR_STATS_NAMES),
    fn=colour_stats,
    params={"percentiles": list(PERCENTILES), "scale": "0-255", "std_ddof": 0},
    description="per-channel mean, std and percentiles 1/5/25/50/75/95/99 of the whole image",
)

ANNOTATION_BOX_FEATURES = ImageFeatures(
    name="annotation_box",
    layer="pixels",
    dim=BOX_SIZE[0] * BOX_SIZE[1] * 3,
    fn=annotation_box_pixels,
    params={"box": list(ANNOTATION_BOX), "corner": "bottom-right", "size": list(BOX_SIZE),
            "resample": "bilinear", "scale": "0-1"},
    description="bottom-right annotation box only, resized to 16x12 RGB, flattened",
)


REGISTRY: dict[str, ImageFeatures] = {f.name: f for f in (COLOUR_STATS, ANNOTATION_BOX_FEATURES)}


class FeatureTensor:
    """Transform step: PIL image -> the named features as a float tensor [dim, 1, 1] (4-d
    batches, like images). A class, not a lambda, so that DataLoader workers can pickle it."""

    def __init__(self, name: str, foreground: bool = False) -> None:
        if name not in REGISTRY or (foreground and name != COLOUR_STATS.name):
            from featsvm.errors import PreprocessingError

            raise PreprocessingError(f"unknown hand-crafted features {name!r}; this featsvm "
                                     f"knows {', '.join(REGISTRY)}")
        self.name = name
        self.foreground = foreground  # colour_stats of the non-black pixels (cell crops)

    def __call__(self, img: Image.Image) -> Any:
        import torch

        values = (colour_stats(img, foreground=True) if self.foreground
                  else REGISTRY[self.name].fn(img))
        return torch.from_numpy(values).reshape(-1, 1, 1)
