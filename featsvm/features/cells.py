"""Cells as the unit: find white cells in a blood-smear field and crop each at a normalised scale.

Detection (stain-aware nucleus-colour threshold, scikit-image throughout):

1. *Nucleus colour score*: Romanowsky-stained white-cell nuclei absorb green far more than
   blue: dark blue-violet lymphoid nuclei (the hematogones of the benign fields, R low), purple
   blasts and pink-violet Pro-B cells (R high) all have blue far above green, while red cells
   and background are pink / grey / grey-blue with blue close to green. The score (detector
   version 2, ``score = "blue"``) is ``B - G`` on the [0, 1] image, smoothed with a Gaussian
   (``skimage.filters.gaussian``). Version 1 used ``min(R, B) - G`` ("purple"), which is low
   for the dark blue-violet nuclei (R low): in benign fields it missed most small dark cells
   and boxed pale red cells instead (seen in ``featsvm cells --preview`` contact sheets of
   Taleqani training fields). The hematoxylin channel of ``skimage.color.rgb2hed`` also
   lights up the dark red cells.
2. *Adaptive threshold*: ``median + rel_threshold * (p99.5 - median)`` of the score, i.e.
   halfway between the field's typical pixel and its most purple pixels (at least
   ``min_margin`` above the median, so pale fields do not promote red cells); a field whose
   contrast ``p99.5 - median`` is below ``min_contrast`` has no white cell.
3. *Morphology*: binary opening and closing with a disk, holes filled
   (``skimage.morphology``), touching cells split by a distance-transform watershed
   (``skimage.segmentation.watershed`` seeded by ``skimage.feature.peak_local_max``).
4. *Size filter*: regions whose area is below ``min_area_frac`` or above ``max_area_frac`` of the
   image area (platelets, debris, the burnt-in scale annotation; huge smudges) are dropped.
   Version 2 keeps regions from 0.15 % of the field (75 px of 224 x 224, a cell ~10 px
   across): the small dark lymphoid cells of the squashed 224-px fields are 10-14 px across
   and version 1's 0.3 % dropped many of them.
   Regions touching the bottom-right annotation corner are dropped too (the scale bar is drawn
   in a colour that can pass the threshold).

A *segmented single-cell image* (one cell on black, e.g. C-NMC 2019) is recognised by its
share of near-black pixels (``black_frac``) and is one cell: its non-black pixels.

Crops: each cell's bounding box (padded by ``pad``) is mapped to a ``size`` x ``size`` square
so that the cell's extent is ``fill`` of the crop in *both* axes: the cell diameter becomes a
fixed number of pixels whatever the camera magnification, and the 4:3 -> square squash of the
Taleqani release is undone per cell. With ``suppress_background`` the pixels outside the cell
mask are black, like segmented-cell datasets.

All parameters were chosen by looking at Taleqani fields (``featsvm cells --preview``
contact sheets of random fields); nothing was fitted to a score, and nothing to another lab's
images.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featsvm.errors import UsageError

# Upper bound of cells pooled per field (largest first): bounds the cost of a crowded field.
MAX_CELLS = 12
# The detail of a typical Taleqani training cell: the median crop-window side in native pixels
# (bbox max side / fill 0.8) of the <= MAX_CELLS cells the cell view crops, measured on 300
# seeded TRAIN fields of the real split (2,439 crops; detector v2): median 32.5 px (p25 28.8,
# p75 37.5; benign 27.5, blasts 31-34), rounded half-to-even to 32. Chosen on training fields
# only, never on another lab's images: `benchmarks/cell_resolution.py` (results in
# benchmarks/results/cell_resolution.json). The resolution of ``cells+lowres``
# (`featsvm.features.preprocess.ImageOptions.cell_resolution`, `crop_cell`'s `resolution`).
NATIVE_CELL_PX = 32


SCORES = ("blue", "purple")


@dataclass(frozen=True)
class DetectorParams:
    score: str = "blue"  # "blue": B - G (version 2); "purple": min(R, B) - G (version 1)
    smooth_sigma: float = 1.0  # Gaussian sigma (pixels of a 224-px field, scaled with size)
    rel_threshold: float = 0.5  # threshold between median and p99.5 of the nucleus score
    min_contrast: float = 0.06  # p99.5 - median below this: no white cell in the field
    min_margin: float = 0.05  # the threshold is at least this far above the median
    min_area_frac: float = 0.0015  # 75 px of a 224x224 field (version 1: 0.003)
    max_area_frac: float = 0.15
    open_radius_frac: float = 0.009  # 2 px of a 224-px field
    split_min_distance_frac: float = 0.05  # watershed seeds at least ~11 px apart (224 px)
    corner_frac: float = 0.1  # bottom-right square holding the scale annotation
    black_frac: float = 0.25  # share of near-black pixels that marks a segmented cell image
    black_level: float = 0.06  # max channel below this is "black"

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise UsageError(f"detector score must be one of {', '.join(SCORES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Detector versions, recorded in the preprocessing dict of every cell-view cache and run
# (`featsvm.features.preprocess.ImageOptions.detector`), so that a run made with one version
# is predicted with it and a changed detector never reuses a cache of the other.
DETECTOR_VERSIONS: dict[int, DetectorParams] = {
    1: DetectorParams(score="purple", min_area_frac=0.003),
    2: DetectorParams(),
}
DETECTOR_VERSION = 2  # what new caches and runs use


def detector_params(version: int) -> DetectorParams:
    try:
        return DETECTOR_VERSIONS[int(version)]
    except (KeyError, ValueError, TypeError):
        raise UsageError(f"unknown cell detector version {version!r}; this featsvm knows "
                         f"{', '.join(map(str, DETECTOR_VERSIONS))}") from None


@dataclass(frozen=True)
class Cell:
    bbox: tuple[int, int, int, int]  # min_row, min_col, max_row, max_col (exclusive)
    area: int
    centroid: tuple[float, float]
    mask: np.ndarray = field(repr=False, compare=False)  # bool, bbox-sized

    @property
    def diameter(self) -> float:
        """Equivalent-circle diameter in pixels."""
        return float(2.0 * np.sqrt(self.area / np.pi))


@dataclass
class Detection:
    cells: list[Cell]
    single: bool  # a segmented single-cell image (one cell on black)
    contrast: float
    threshold: float


def _as_float(rgb: np.ndarray | Image.Image) -> np.ndarray:
    arr = np.asarray(rgb.convert("RGB") if isinstance(rgb, Image.Image) else rgb)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise UsageError(f"expected an RGB image, got shape {arr.shape}")
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)


def nucleus_score(rgb: np.ndarray, score: str = "blue") -> np.ndarray:
    """Per pixel of a float RGB image in [0, 1]: ``B - G`` ("blue") or ``min(R, B) - G``
    ("purple"); white-cell nuclei are high."""
    if score == "purple":
        return np.minimum(rgb[..., 0], rgb[..., 2]) - rgb[..., 1]
    return rgb[..., 2] - rgb[..., 1]


def is_segmented(rgb: np.ndarray, params: DetectorParams = DetectorParams()) -> bool:
    """One cell on black (segmented-cell dataset)?"""
    black = rgb.max(axis=2) < params.black_level
    return float(black.mean()) >= params.black_frac


def _cell(region, shape: tuple[int, int]) -> Cell:
    r0, c0, r1, c1 = region.bbox
    return Cell((int(r0), int(c0), int(r1), int(c1)), int(region.area),
                (float(region.centroid[0]), float(region.centroid[1])),
                np.asarray(region.image, dtype=bool))


def detect(image: np.ndarray | Image.Image, params: DetectorParams = DetectorParams()
           ) -> Detection:
    """White cells of a field (largest first), or the one cell of a segmented image."""
    from scipy import ndimage as ndi
    from skimage import feature, filters, measure, morphology, segmentation

    rgb = _as_float(image)
    h, w = rgb.shape[:2]
    scale = min(h, w) / 224.0
    if is_segmented(rgb, params):
        fg = rgb.max(axis=2) >= params.black_level
        fg = ndi.binary_fill_holes(fg)
        regions = sorted(measure.regionprops(measure.label(fg)), key=lambda r: -r.area)
        cells = [_cell(regions[0], (h, w))] if regions else []
        return Detection(cells, True, 1.0, params.black_level)

    score = filters.gaussian(nucleus_score(rgb, params.score),
                             sigma=params.smooth_sigma * scale)
    med, top = np.percentile(score, [50, 99.5])
    contrast = float(top - med)
    thr = float(med + max(params.rel_threshold * (top - med), params.min_margin))
    if contrast < params.min_contrast:
        return Detection([], False, contrast, thr)
    mask = score > thr
    rad = max(1, round(params.open_radius_frac * min(h, w)))
    disk = morphology.disk(rad)
    mask = ndi.binary_closing(ndi.binary_opening(mask, disk), disk)
    mask = ndi.binary_fill_holes(mask)
    # split touching cells: watershed on the distance transform
    dist = ndi.distance_transform_edt(mask)
    min_dist = max(2, round(params.split_min_distance_frac * min(h, w)))
    peaks = feature.peak_local_max(dist, min_distance=min_dist, labels=measure.label(mask),
                                   exclude_border=False)
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-dist, markers, mask=mask)
    area = h * w
    cr, cc = h - round(params.corner_frac * h), w - round(params.corner_frac * w)
    cells: list[Cell] = []
    for region in measure.regionprops(labels):
        if not params.min_area_frac * area <= region.area <= params.max_area_frac * area:
            continue
        r0, c0, r1, c1 = region.bbox
        if r1 > cr and c1 > cc and region.centroid[0] > cr - 2 and region.centroid[1] > cc - 2:
            continue  # the burnt-in scale annotation corner
        cells.append(_cell(region, (h, w)))
    cells.sort(key=lambda c: -c.area)
    return Detection(cells, False, contrast, thr)


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` dilated by a disk of `radius` (``skimage.morphology.disk``: the lattice points
    with x^2 + y^2 <= radius^2), computed as "Euclidean distance to the mask <= radius" with
    one distance transform: the same pixels as ``scipy.ndimage.binary_dilation`` with that
    disk, in time independent of the radius (measured: a whole crop of a 450-px single-cell
    image 0.62 s -> 0.07 s)."""
    from scipy import ndimage as ndi

    if not mask.any():
        return mask.copy()
    return np.asarray(ndi.distance_transform_edt(~mask) <= radius)


def crop_cell(
    image: np.ndarray | Image.Image,
    cell: Cell,
    size: int = 224,
    fill: float = 0.8,
    suppress_background: bool = True,
    dilate: float = 0.08,
    resolution: int = 0,
) -> Image.Image:
    """The cell at a normalised scale: its bounding box becomes `fill` of a `size` x `size`
    crop in both axes (cell diameter -> ``fill * size`` pixels). Outside the image the crop is
    black; with `suppress_background` so is everything outside the (slightly dilated) cell
    mask. With `resolution` > 0 the crop window (native pixels) is first reduced to at most
    `resolution` pixels per side (`limit_resolution`), so that the crop carries no more
    detail than a cell spanning that many pixels."""
    from scipy import ndimage as ndi

    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if rgb.dtype != np.uint8:
        rgb = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
    h, w = rgb.shape[:2]
    r0, c0, r1, c1 = cell.bbox
    bh, bw = r1 - r0, c1 - c0
    full = np.zeros((h, w), dtype=bool)
    full[r0:r1, c0:c1] = cell.mask
    if suppress_background:
        rad = max(1, round(dilate * max(bh, bw)))
        full = dilate_disk(ndi.binary_fill_holes(full), rad)
        rgb = np.where(full[..., None], rgb, 0).astype(np.uint8)
    # window around the bbox such that the bbox is `fill` of it (per axis)
    wh, ww = bh / fill, bw / fill
    cy, cx = (r0 + r1) / 2.0, (c0 + c1) / 2.0
    top, left = round(cy - wh / 2), round(cx - ww / 2)
    bottom, right = top + max(1, round(wh)), left + max(1, round(ww))
    pad_t, pad_l = max(0, -top), max(0, -left)
    pad_b, pad_r = max(0, bottom - h), max(0, right - w)
    padded = np.pad(rgb, ((pad_t, pad_b), (pad_l, pad_r), (0, 0)))
    win = padded[top + pad_t:bottom + pad_t, left + pad_l:right + pad_l]
    crop = Image.fromarray(win)
    if resolution:
        crop = limit_resolution(crop, resolution)
    return crop.resize((size, size), Image.Resampling.BILINEAR)


def limit_resolution(window: Image.Image, resolution: int) -> Image.Image:
    """Resolution normalisation of a crop window: reduced to at most `resolution` pixels per
    side (never enlarged: a window already that small passes unchanged; the final resize to
    the crop size enlarges it).

    The filter is PIL's ``BOX``: each output pixel is the plain average of the native pixels
    it covers (fractional coverage weighted), which is what a camera with coarser pixels would
    record, so a large sharp cell becomes the cell a lower-magnification camera would have
    seen. Unlike ``LANCZOS`` it has no negative lobes, so the hard edge between the cell and
    the blacked-out background gets no ringing halo that training crops never have.
    (``reducing_gap`` is only a speed shortcut for large reductions, not needed for crops of
    a few hundred pixels.)"""
    if resolution < 1:
        raise UsageError(f"cell resolution must be positive, got {resolution}")
    w, h = window.size
    target = (min(w, resolution), min(h, resolution))
    if target == (w, h):
        return window
    return window.resize(target, Image.Resampling.BOX)


def cell_crops(
    image: Image.Image,
    size: int = 224,
    suppress_background: bool = True,
    params: DetectorParams = DetectorParams(),
    max_cells: int = MAX_CELLS,
    resolution: int = 0,
) -> list[Image.Image]:
    """Crops of the (largest `max_cells`) cells of an image; empty when none was found
    (`resolution`: `crop_cell`'s resolution normalisation, 0 = off)."""
    det = detect(image, params)
    return [crop_cell(image, c, size, suppress_background=suppress_background,
                      resolution=resolution)
            for c in det.cells[:max_cells]]


def draw_detections(image: Image.Image, detection: Detection, title: str = "") -> Image.Image:
    """The image with each detected cell's bounding box drawn (for a person to check)."""
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for c in detection.cells:
        r0, c0, r1, c1 = c.bbox
        draw.rectangle([c0, r0, c1 - 1, r1 - 1], outline=(0, 255, 0), width=2)
    label = title or f"{len(detection.cells)} cell(s)"
    draw.rectangle([0, 0, 8 * len(label) + 4, 12], fill=(0, 0, 0))
    draw.text((2, 0), label, fill=(255, 255, 0) if detection.cells else (255, 0, 0))
    return out


@dataclass
class Survey:
    """What the detector found in a folder: cells per image, and the images without any."""

    root: Path
    n_images: int
    n_single: int  # segmented single-cell images
    cells_per_image: dict[str, int]
    no_cell: list[str]  # relpaths where no cell was found (never dropped silently)
    unreadable: list[tuple[str, str]]
    preview: Path | None = None

    def summary(self) -> str:
        counts = np.array(list(self.cells_per_image.values()) or [0])
        lines = [
            f"{self.n_images} image(s) under {self.root}: {int(counts.sum())} cell(s), "
            f"median {float(np.median(counts)):.0f} per image (max {int(counts.max())}); "
            f"{self.n_single} segmented single-cell image(s)",
            f"no cell found in {len(self.no_cell)} image(s)"
            + (":" if self.no_cell else ""),
        ]
        lines += [f"  {rel}" for rel in self.no_cell]
        lines += [f"unreadable {rel}: {why}" for rel, why in self.unreadable]
        if self.preview:
            lines.append(f"preview: {self.preview}")
        return "\n".join(lines)


def survey(
    root: str | os.PathLike[str],
    preview: str | os.PathLike[str] | None = None,
    n_preview: int = 24,
    limit: int | None = None,
    seed: int = 0,
    params: DetectorParams = DetectorParams(),
    progress: bool = False,
) -> Survey:
    """Run the detector over every image under `root` (or a seeded sample of `limit`), list
    the images without a cell, and optionally tile `n_preview` of them with their detections
    drawn into the PNG `preview` (for a person to check; it shows dataset pixels, so keep it
    out of version control)."""
    from featsvm.data.dataset import ImageError, iter_image_files, load_rgb

    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder")
    files = list(iter_image_files(root))
    if not files:
        raise UsageError(f"no image file under {root}")
    rng = random.Random(seed)
    if limit is not None and limit < len(files):
        files = sorted(rng.sample(files, limit))
    show = set(rng.sample(range(len(files)), min(n_preview, len(files)))) if preview else set()
    counts: dict[str, int] = {}
    no_cell: list[str] = []
    unreadable: list[tuple[str, str]] = []
    tiles: list[Image.Image] = []
    n_single = 0
    it = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, unit="img", desc="cells")
    for i, path in enumerate(it):
        rel = path.relative_to(root).as_posix()
        try:
            img = load_rgb(path)
        except ImageError as exc:
            unreadable.append((rel, str(exc)))
            continue
        det = detect(img, params)
        counts[rel] = len(det.cells)
        n_single += det.single
        if not det.cells:
            no_cell.append(rel)
        if i in show:
            tile = draw_detections(img, det, f"{len(det.cells)} cell(s) {path.name}"[:40])
            tiles.append(tile.resize((224, 224)) if tile.size != (224, 224) else tile)
    out = None
    if preview and tiles:
        cols = min(6, len(tiles))
        rows = (len(tiles) + cols - 1) // cols
        sheet = Image.new("RGB", (224 * cols, 224 * rows))
        for k, t in enumerate(tiles):
            sheet.paste(t, (224 * (k % cols), 224 * (k // cols)))
        out = Path(preview)
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(out)
    return Survey(root, len(counts), n_single, counts, no_cell, unreadable, out)
