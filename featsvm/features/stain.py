"""Stain handling: Reinhard normalisation to a reference, HED-space jitter, colour-free input.

* **Reinhard** (Reinhard et al. 2001): per-channel mean and standard deviation of the image in
  CIE-Lab (``skimage.color.rgb2lab``) are mapped to those of a reference. The statistics are
  taken over *foreground* pixels only (not black): a cell crop with its background blacked out
  (or a C-NMC cell on black) is normalised by its cell pixels, and the black stays black. This
  is why the scikit-image implementation is used rather than torchstain: torchstain's Reinhard
  and Macenko normalisers take whole images without a foreground mask (black padding would
  dominate the statistics; Macenko's optical-density threshold also fails on nearly-uniform
  crops), and would add a dependency for a few lines of scikit-image.
* **Reference**: :func:`reference_from_images` averages the per-image foreground Lab statistics
  over a list of images — call it with Taleqani *training* images (their cell crops for the
  cell view). The six numbers are part of the preprocessing dict, hence of every cache
  fingerprint and run record.
* **HED jitter** (Tellez et al. 2019) for fine-tuning augmentation: the image is deconvolved
  into hematoxylin / eosin / DAB (``skimage.color.rgb2hed``), each channel scaled by
  ``1 + U(-sigma, sigma)`` and shifted by ``U(-bias, bias)``, and recombined (``hed2rgb``).
* **Colour-free input** (``colour``): ``grey`` (luminance, ``rgb2gray``) or ``hematoxylin``
  (the H channel of ``rgb2hed``, inverted so nuclei are dark, rescaled to [0, 1] by a fixed
  range), replicated to three channels for ImageNet backbones; ``rgb`` leaves the image alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from featsvm.errors import UsageError
from featsvm.names import COLOURS

BLACK_LEVEL = 0.06  # max channel below this: background of a segmented / suppressed crop
# fixed range of the rgb2hed hematoxylin channel mapped to [0, 1] (0: no stain)
H_RANGE = (0.0, 0.25)


@dataclass(frozen=True)
class LabStats:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_list(self) -> list[float]:
        return [round(float(v), 4) for v in (*self.mean, *self.std)]

    @classmethod
    def from_list(cls, values: Iterable[float]) -> LabStats:
        v = [float(x) for x in values]
        if len(v) != 6:
            raise UsageError(f"a Reinhard reference has 6 numbers (Lab mean, std), got {v}")
        return cls((v[0], v[1], v[2]), (v[3], v[4], v[5]))


def _rgb01(image: np.ndarray | Image.Image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    return arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)


def _to_image(rgb01: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(rgb01 * 255.0), 0, 255).astype(np.uint8))


def foreground(rgb01: np.ndarray) -> np.ndarray:
    return rgb01.max(axis=2) >= BLACK_LEVEL


def lab_stats(image: np.ndarray | Image.Image) -> LabStats | None:
    """Lab mean/std over the foreground pixels (None when there are fewer than 16)."""
    from skimage.color import rgb2lab

    rgb = _rgb01(image)
    fg = foreground(rgb)
    if fg.sum() < 16:
        return None
    lab = rgb2lab(rgb)[fg]
    return LabStats(tuple(lab.mean(axis=0)), tuple(np.maximum(lab.std(axis=0), 1e-3)))


def reference_from_images(images: Iterable[np.ndarray | Image.Image]) -> LabStats:
    """Reinhard reference: the mean of per-image foreground Lab statistics."""
    stats = [s for s in (lab_stats(im) for im in images) if s is not None]
    if not stats:
        raise UsageError("no image with foreground pixels to build a stain reference from")
    return LabStats(tuple(np.mean([s.mean for s in stats], axis=0)),
                    tuple(np.mean([s.std for s in stats], axis=0)))


def reinhard(image: np.ndarray | Image.Image, reference: LabStats) -> Image.Image:
    """`image` with its foreground Lab statistics mapped to `reference` (black stays black)."""
    from skimage.color import lab2rgb, rgb2lab

    rgb = _rgb01(image)
    fg = foreground(rgb)
    src = lab_stats(rgb)
    if src is None:
        return _to_image(rgb)
    lab = rgb2lab(rgb)
    mean, std = np.array(src.mean), np.array(src.std)
    rmean, rstd = np.array(reference.mean), np.array(reference.std)
    lab = (lab - mean) / std * rstd + rmean
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    with warnings.catch_warnings():  # out-of-gamut colours are clipped, as intended
        warnings.simplefilter("ignore", UserWarning)
        out = np.clip(lab2rgb(lab), 0, 1)
    out[~fg] = rgb[~fg]
    return _to_image(out)


def hed_jitter(image: np.ndarray | Image.Image, rng: np.random.Generator,
               sigma: float = 0.05, bias: float = 0.05) -> Image.Image:
    """Random stain variation in HED space (scale and shift of each stain channel)."""
    from skimage.color import hed2rgb, rgb2hed

    rgb = _rgb01(image)
    fg = foreground(rgb)
    hed = rgb2hed(rgb)
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3)
    beta = rng.uniform(-bias, bias, size=3) * np.abs(hed).reshape(-1, 3).max(axis=0).clip(1e-3)
    out = np.clip(hed2rgb(hed * alpha + beta), 0, 1)
    out[~fg] = rgb[~fg]
    return _to_image(out)


def colour_free(image: np.ndarray | Image.Image, colour: str) -> Image.Image:
    """`rgb` (unchanged), `grey` or `hematoxylin` as a 3-channel image."""
    if colour == "rgb":
        return image if isinstance(image, Image.Image) else _to_image(_rgb01(image))
    from skimage.color import rgb2gray, rgb2hed

    rgb = _rgb01(image)
    if colour == "grey":
        g = rgb2gray(rgb)
    elif colour == "hematoxylin":
        h = rgb2hed(rgb)[..., 0]
        g = 1.0 - np.clip((h - H_RANGE[0]) / (H_RANGE[1] - H_RANGE[0]), 0, 1)
        g[~foreground(rgb)] = 0.0  # black background stays black
    else:
        raise UsageError(f"colour must be one of {', '.join(COLOURS)}, got {colour!r}")
    return _to_image(np.repeat(g[..., None], 3, axis=2))
