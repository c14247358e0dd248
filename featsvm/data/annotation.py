"""Where the burnt-in scale annotation sits, and how to hide it or keep only it.

Every image of the ALL releases carries a scale annotation burnt into its bottom-right corner
by the microscope software, and its look is not independent of the class (benchmarks/overlay.py:
that corner alone classifies the four classes far above chance). The box used here is the
bottom-right one of the four corner boxes that `featsvm.data.duplicates` ignores: 25 % of the
width x 20 % of the height (``DuplicateConfig.corner_mask``), measured on the frame as stored
(224 x 224 in the 3,256 release: the box is 56 x 45 pixels).

* `mask_annotation`: the box filled with the image's median colour (the ``--mask-annotation``
  preprocessing option of every backbone);
* `crop_annotation`: only the box (the ``annotation_box`` shortcut baseline).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# (width, height) fraction of the frame; the same numbers as DuplicateConfig.corner_mask.
ANNOTATION_BOX = (0.25, 0.2)

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive


def annotation_box(width: int, height: int, frac: tuple[float, float] = ANNOTATION_BOX) -> Box:
    """The bottom-right annotation box of a `width` x `height` frame (at least 1 pixel)."""
    bw = max(1, round(frac[0] * width))
    bh = max(1, round(frac[1] * height))
    return (width - bw, height - bh, width, height)


def median_colour(img: Image.Image) -> tuple[int, int, int]:
    """Per-channel median of the whole RGB image (what a masked box is filled with)."""
    med = np.median(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)
    return tuple(int(v) for v in med)  # type: ignore[return-value]


def mask_annotation(img: Image.Image) -> Image.Image:
    """A copy of `img` with the annotation box filled with the image's median colour (the
    median is taken over the whole, unmasked image). Nothing outside the box changes."""
    img = img.convert("RGB")
    x0, y0, x1, y1 = annotation_box(*img.size)
    out = img.copy()
    ImageDraw.Draw(out).rectangle((x0, y0, x1 - 1, y1 - 1), fill=median_colour(img))
    return out


def crop_annotation(img: Image.Image) -> Image.Image:
    """Only the annotation box of `img` (RGB)."""
    img = img.convert("RGB")
    return img.crop(annotation_box(*img.size))
