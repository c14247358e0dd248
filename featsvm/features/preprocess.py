"""Image options between a file and a backbone: view (field | cells), stain, colour.

`ImageOptions` are part of the preprocessing dict of every cache and run record, hence of
every fingerprint; only non-default values are written, so the fingerprints of plain
``field / none / rgb`` caches made before these options existed stay valid.

* ``view = "field"``: the whole image, through the backbone's own transform (resize, crop).
* ``view = "cells"``: the white cells found by `featsvm.features.cells` (detector version
  ``detector``, recorded when it is not the first; at most ``max_cells``, largest first),
  each cropped at a normalised scale (``cell_size`` pixels, the cell spanning 80 % of it)
  with the background blacked out; a segmented single-cell image is one cell.
  **An image's embedding is the mean of its cells' embeddings** (pooled embedding: one cache
  row per image, so heads, CV and the cache work unchanged). A field where no cell is found
  is embedded whole, resized to ``cell_size`` (`featsvm cells DATA` lists such fields).
* ``cell_resolution`` (cell view; 0 = off): *resolution normalisation*. Each crop window
  (native pixels) is first reduced to at most ``cell_resolution`` pixels per side with an
  area-averaging filter (`featsvm.features.cells.limit_resolution`), then resized to
  ``cell_size`` as always, so a cell from a high-magnification camera (e.g. single-cell
  images ~250 px across) carries no more detail than a Taleqani cell (224-px fields, crop
  windows of ~32 px: `featsvm.features.cells.NATIVE_CELL_PX`, what ``cells+lowres`` uses).
* ``stain = "reinhard"``: Reinhard normalisation of each input (crop or field) to
  ``stain_reference`` (Lab mean and std), computed from the TRAIN images of a split manifest
  only (`reinhard_reference`), stored in the preprocessing dict.
* ``colour = "grey" | "hematoxylin"``: colour-free input (`featsvm.features.stain.colour_free`).
* ``mask_annotation``: the burnt-in scale-annotation box (bottom-right, `featsvm.data.annotation`)
  filled with the image's median colour first, before any view, stain or colour step
  (``--mask-annotation``; ``+masked`` in model names).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from featsvm.errors import UsageError
from featsvm.features.cells import DETECTOR_VERSION, NATIVE_CELL_PX
from featsvm.names import COLOURS, STAINS, VIEWS

DEFAULT_CELL_SIZE = 112  # the 224-px Taleqani fields hold cells of ~25-30 px: 112 loses nothing
# Cells pooled per field (largest first). In-lab only (every 8th train+val image of the split,
# 367 fields; efficientnet_lite0 frozen + logistic regression C=1, 5-fold grouped CV; detector
# version 2): top-1 71.1 %, top-2 82.0, top-3 84.5, top-5 88.3, top-8 89.4, top-12 91.6 %
# (the detector finds a median of 8 per field); 12 is featsvm.features.cells.MAX_CELLS.
DEFAULT_MAX_CELLS = 12
REFERENCE_IMAGES = 300  # train images whose inputs form the stain reference
OPTION_KEYS = ("view", "stain", "stain_reference", "colour", "cell_size", "max_cells",
               "mask_annotation", "detector", "cell_resolution")
MIN_CELL_RESOLUTION = 8
LOWRES = "lowres"  # input token: cell_resolution = NATIVE_CELL_PX ("lowres<N>": N pixels)


@dataclass(frozen=True)
class ImageOptions:
    view: str = "field"
    stain: str = "none"
    stain_reference: tuple[float, ...] | None = None
    colour: str = "rgb"
    cell_size: int = DEFAULT_CELL_SIZE
    max_cells: int = DEFAULT_MAX_CELLS
    mask_annotation: bool = False
    detector: int = DETECTOR_VERSION  # cell detector version (featsvm.features.cells)
    cell_resolution: int = 0  # crop windows reduced to <= this many px per side (0 = off)

    def __post_init__(self) -> None:
        for name, value, allowed in (("view", self.view, VIEWS), ("stain", self.stain, STAINS),
                                     ("colour", self.colour, COLOURS)):
            if value not in allowed:
                raise UsageError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.stain == "reinhard" and (self.stain_reference is None
                                         or len(self.stain_reference) != 6):
            raise UsageError("stain 'reinhard' needs a 6-number stain_reference (Lab mean, "
                             "std) from training images; see featsvm.features.preprocess")
        if self.cell_size < 32 or self.max_cells < 1:
            raise UsageError("cell_size must be >= 32 and max_cells >= 1")
        if self.cell_resolution and (self.cell_resolution < MIN_CELL_RESOLUTION
                                     or self.view != "cells"):
            raise UsageError(f"cell resolution {self.cell_resolution}: 0 (off) or >= "
                             f"{MIN_CELL_RESOLUTION} pixels, with the cell view only")
        from featsvm.features.cells import detector_params

        detector_params(self.detector)  # a known version

    def to_dict(self) -> dict[str, Any]:
        """The non-default options (what goes into the preprocessing dict)."""
        out: dict[str, Any] = {}
        if self.view != "field":
            out.update(view=self.view, cell_size=self.cell_size, max_cells=self.max_cells)
            if self.detector != 1:  # caches of the first detector keep their fingerprints
                out["detector"] = self.detector
            if self.cell_resolution:  # only when on: every other cache keeps its fingerprint
                out["cell_resolution"] = self.cell_resolution
        if self.stain != "none":
            out.update(stain=self.stain,
                       stain_reference=[round(float(v), 4) for v in self.stain_reference or ()])
        if self.colour != "rgb":
            out["colour"] = self.colour
        if self.mask_annotation:
            out["mask_annotation"] = True
        return out

    @classmethod
    def from_preprocessing(cls, pre: dict[str, Any]) -> ImageOptions:
        ref = pre.get("stain_reference")
        return cls(view=pre.get("view", "field"), stain=pre.get("stain", "none"),
                   stain_reference=tuple(ref) if ref else None,
                   colour=pre.get("colour", "rgb"),
                   cell_size=int(pre.get("cell_size", DEFAULT_CELL_SIZE)),
                   max_cells=int(pre.get("max_cells", DEFAULT_MAX_CELLS)),
                   mask_annotation=bool(pre.get("mask_annotation", False)),
                   # records of the cell view without a version were made by the first
                   detector=int(pre.get("detector", 1 if pre.get("view") == "cells"
                                        else DETECTOR_VERSION)),
                   cell_resolution=int(pre.get("cell_resolution", 0)))

    def describe(self) -> str:
        parts = [f"view {self.view}"]
        if self.view == "cells":
            parts.append(f"{self.cell_size}-px cells, <= {self.max_cells} per image, mean-pooled, "
                         f"detector v{self.detector}")
            if self.cell_resolution:
                parts.append(f"resolution-normalised to {self.cell_resolution} px")
        if self.stain != "none":
            parts.append(f"stain {self.stain}")
        if self.colour != "rgb":
            parts.append(f"colour {self.colour}")
        if self.mask_annotation:
            parts.append("annotation masked")
        return ", ".join(parts)


def backbone_part(pre: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing dict without the image options (what the backbone spec builds)."""
    return {k: v for k, v in pre.items() if k not in OPTION_KEYS}


def _inputs(image, opts: ImageOptions) -> tuple[list, bool]:
    """(images to embed, are they cell crops) for one PIL image."""
    from featsvm.features.cells import cell_crops, detector_params

    if opts.view == "cells":
        crops = cell_crops(image, size=opts.cell_size, suppress_background=True,
                           params=detector_params(opts.detector), max_cells=opts.max_cells,
                           resolution=opts.cell_resolution)
        return (crops or [image.resize((opts.cell_size, opts.cell_size))]), True
    return [image], False


def _recolour(images: list, opts: ImageOptions) -> list:
    from featsvm.features import stain

    if opts.stain == "reinhard":
        ref = stain.LabStats.from_list(opts.stain_reference or ())
        images = [stain.reinhard(im, ref) for im in images]
    if opts.colour != "rgb":
        images = [stain.colour_free(im, opts.colour) for im in images]
    return images


def image_transform(
    opts: ImageOptions,
    field_tf: Callable[[Any], Any],
    crop_tf: Callable[[Any], Any] | None = None,
) -> Callable[[Any], Any]:
    """PIL RGB image -> float tensor [k, 3, H, W] (k = 1 for the field view, the number of
    cells for the cell view): the image options `opts`, then `field_tf` (the backbone's own
    transform) on a field or `crop_tf` (to tensor + normalise) on cell crops. Called through
    `featsvm.features.preprocessing.Preprocessing.image_transform`."""
    import torch

    from featsvm.data.annotation import mask_annotation

    def transform(image) -> torch.Tensor:
        image = image.convert("RGB")
        if opts.mask_annotation:
            image = mask_annotation(image)
        images, crops = _inputs(image, opts)
        tf = crop_tf if crops and crop_tf is not None else field_tf
        return torch.stack([tf(im) for im in _recolour(images, opts)])

    return transform


def pool(embeddings: np.ndarray, counts: list[int]) -> np.ndarray:
    """Mean of consecutive row blocks of sizes `counts` (one row per image)."""
    out = np.empty((len(counts), embeddings.shape[1]), dtype=embeddings.dtype)
    start = 0
    for i, n in enumerate(counts):
        out[i] = embeddings[start:start + n].mean(axis=0)
        start += n
    return out


# ------------------------------------------------------------------------------ stain reference


def reference_path(split_path: str | os.PathLike[str], view: str) -> Path:
    p = Path(split_path)
    return p.with_name(f"{p.name}.reinhard-{view}.json")


def reinhard_reference(
    split_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None,
    view: str = "field",
    cell_size: int = DEFAULT_CELL_SIZE,
    max_cells: int = DEFAULT_MAX_CELLS,
) -> tuple[float, ...]:
    """The Reinhard reference of a split: Lab statistics of the inputs (fields or cell crops) of
    every k-th TRAIN image (at most REFERENCE_IMAGES), computed once and kept next to the
    manifest (``<split>.reinhard-<view>.json``, tied to the manifest's sha256). Never from
    val/test or external images."""
    from featsvm.data.dataset import load_rgb
    from featsvm.data.manifest import read_manifest
    from featsvm.features import stain
    from featsvm.fileio import write_text_atomic

    manifest = read_manifest(split_path)
    side = reference_path(split_path, view)
    if side.is_file():
        rec = json.loads(side.read_text())
        if (rec.get("split_sha256") == manifest.sha256 and rec.get("cell_size") == cell_size
                and rec.get("detector", 1) == (DETECTOR_VERSION if view == "cells" else 1)):
            return tuple(rec["lab"])
    if data_dir is None:
        raise UsageError(f"no stain reference {side} for this split yet: run `featsvm extract "
                         f"DATA_DIR ... --stain reinhard --split {split_path}` first")
    train = manifest.subset("train")
    if not train:
        raise UsageError(f"{split_path} has no train images to take a stain reference from")
    step = max(1, len(train) // REFERENCE_IMAGES)
    opts = ImageOptions(view=view, cell_size=cell_size, max_cells=max_cells)
    inputs = [im for r in train[::step]
              for im in _inputs(load_rgb(Path(data_dir) / r.relpath), opts)[0]]
    ref = stain.reference_from_images(inputs).to_list()
    write_text_atomic(side, json.dumps({
        "lab": ref, "view": view, "cell_size": cell_size, "split_sha256": manifest.sha256,
        "detector": DETECTOR_VERSION if view == "cells" else 1,
        "n_train_images": len(train[::step]), "n_inputs": len(inputs),
        "rule": f"every {step}th train image of the manifest",
    }, indent=2) + "\n")
    return tuple(ref)


def resolve_options(
    view: str = "field",
    stain: str = "none",
    colour: str = "rgb",
    split_path: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    mask_annotation: bool = False,
    cell_resolution: int = 0,
) -> ImageOptions:
    """ImageOptions from command-line values; `reinhard` takes its reference from the split's
    train images (computed with `data_dir`, or read from the file a previous extract wrote).
    The reference is that of the plain view (`cell_resolution` changes the detail of a crop,
    not its colour)."""
    ref = None
    if stain == "reinhard":
        if split_path is None:
            raise UsageError("--stain reinhard needs --split (the reference comes from its "
                             "train images)")
        ref = reinhard_reference(split_path, data_dir, view)
    return ImageOptions(view=view, stain=stain, stain_reference=ref, colour=colour,
                        mask_annotation=mask_annotation, cell_resolution=cell_resolution)


class InputSpec(NamedTuple):
    """The parts of a study input name (`parse_input`); keyword arguments of
    `resolve_options`."""

    view: str
    stain: str = "none"
    colour: str = "rgb"
    cell_resolution: int = 0


def parse_input(spec: str) -> InputSpec:
    """(view, stain, colour, cell_resolution) of a study input name such as ``field``,
    ``cells``, ``cells+reinhard``, ``cells+grey`` or ``cells+lowres+reinhard`` (view first,
    then any of a stain, a colour and ``lowres``: the cell view's resolution normalisation
    to `NATIVE_CELL_PX`, or ``lowres<N>`` to N pixels)."""
    view, *rest = spec.split("+")
    stain, colour, resolution = "none", "rgb", 0
    for part in rest:
        if part in STAINS:
            stain = part
        elif part in COLOURS:
            colour = part
        elif part == LOWRES:
            resolution = NATIVE_CELL_PX
        elif part.startswith(LOWRES) and part[len(LOWRES):].isdigit():
            resolution = int(part[len(LOWRES):])
        else:
            raise UsageError(f"input {spec!r}: {part!r} is neither a stain ({', '.join(STAINS)}) "
                             f"nor a colour ({', '.join(COLOURS)}) nor {LOWRES}[N] (cell "
                             "resolution)")
    if view not in VIEWS:
        raise UsageError(f"input {spec!r} must start with a view: {', '.join(VIEWS)}")
    if resolution and (view != "cells" or resolution < MIN_CELL_RESOLUTION):
        raise UsageError(f"input {spec!r}: {LOWRES} is for the cells view, with N >= "
                         f"{MIN_CELL_RESOLUTION}")
    return InputSpec(view, stain, colour, resolution)


def input_options(
    spec: str,
    split_path: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> ImageOptions:
    """The `ImageOptions` of a study / ``[finetune] input`` name (`parse_input`, then
    `resolve_options`)."""
    return resolve_options(**parse_input(spec)._asdict(), split_path=split_path,
                           data_dir=data_dir)


def input_name(options: ImageOptions) -> str:
    """The inverse of `parse_input` (``field`` for the defaults)."""
    parts = [options.view]
    if options.cell_resolution:
        parts.append(LOWRES if options.cell_resolution == NATIVE_CELL_PX
                     else f"{LOWRES}{options.cell_resolution}")
    if options.stain != "none":
        parts.append(options.stain)
    if options.colour != "rgb":
        parts.append(options.colour)
    if options.mask_annotation:
        parts.append("masked")
    return "+".join(parts)
