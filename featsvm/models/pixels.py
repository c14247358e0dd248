"""Decoded images held in memory for end-to-end training, and their augmentation.

Every train/val/test image is decoded **once** (sha256 checked against the split manifest)
into uint8 at the model's input geometry; `Normaliser` recovers the transform's mean/std so
that batches are normalised after augmentation, exactly as `predict` normalises.

An image may give several inputs: with the cell view (`featsvm.features.preprocess`) the
transform returns one crop per white cell, ``[k, 3, H, W]``. Each input then carries its
image's label for training, and an image's probabilities are the mean of its inputs'
(`ImageSet.pool`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from featsvm.data.dataset import ImageError, _decode, read_image_bytes, to_rgb
from featsvm.data.manifest import ManifestRow
from featsvm.fileio import sha256_bytes
from featsvm.labels import LABELS


def batches(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most `size` covering range(n)."""
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@dataclass
class ImageSet:
    """Decoded images of one split: uint8 inputs [M, 3, H, W] with their integer targets, and
    `owner` (the image row of every input) when an image gives several inputs (cells)."""

    rows: list[ManifestRow]
    pixels: torch.Tensor
    targets: torch.Tensor  # per input
    owner: torch.Tensor | None = None  # [M] image index of each input; None: one per image

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_inputs(self) -> int:
        return len(self.pixels)

    @property
    def image_targets(self) -> torch.Tensor:
        """One target per image (row)."""
        return torch.tensor([LABELS.index(r.label) for r in self.rows], dtype=torch.int64)

    def pool(self, proba: np.ndarray) -> np.ndarray:
        """Per-input probabilities [M, C] -> per-image [N, C]: the mean over each image's
        inputs (identity with one input per image)."""
        return pool_rows(proba, self.owner, len(self.rows))


def pool_rows(values: np.ndarray, owner: torch.Tensor | np.ndarray | None, n: int
              ) -> np.ndarray:
    """Mean of the rows of `values` that share an `owner` index (0..n-1); `owner` None: as is."""
    if owner is None:
        return values
    idx = np.asarray(owner, dtype=np.int64)
    sums = np.zeros((n, values.shape[1]), dtype=np.float64)
    np.add.at(sums, idx, values)
    counts = np.bincount(idx, minlength=n).astype(np.float64)
    return sums / np.maximum(counts, 1.0)[:, None]


@dataclass(frozen=True)
class Normaliser:
    """The affine normalisation of a transform, recovered so that pixels can be kept as
    uint8 (1/4 of the memory) and normalised per batch after augmentation."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def probe(cls, transform: Callable[[Image.Image], torch.Tensor], size: int = 32) -> Normaliser:
        """Read mean/std off `transform` by feeding it a black and a white image: a normalising
        transform maps 0 to -mean/std and 1 to (1-mean)/std. Works whatever the preprocessing
        dict calls its keys, and guarantees training normalises exactly as predict does."""
        black = transform(Image.new("RGB", (size, size), (0, 0, 0))).float()
        white = transform(Image.new("RGB", (size, size), (255, 255, 255))).float()
        if black.dim() == 4:  # a transform giving [k, 3, H, W] (views with several inputs)
            black, white = black[0], white[0]
        lo = black.mean(dim=(1, 2))
        hi = white.mean(dim=(1, 2))
        std = 1.0 / (hi - lo)
        mean = -lo * std
        return cls(tuple(float(v) for v in mean), tuple(float(v) for v in std))  # type: ignore[arg-type]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [B, 3, H, W] in [0, 1] -> normalised."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of __call__ for one image [3, H, W] (or its inputs [k, 3, H, W]), rounded
        back to uint8."""
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x.float() * std + mean).mul(255.0).round().clamp(0, 255).to(torch.uint8)


def preload(
    data_dir: Path,
    rows: Sequence[ManifestRow],
    transform: Callable[[Image.Image], torch.Tensor],
    normaliser: Normaliser,
    workers: int = 2,
    progress: bool = True,
    desc: str = "decode",
) -> tuple[ImageSet, list[tuple[str, str]]]:
    """Decode, check (sha256 against the manifest) and transform `rows` once. A transform
    may return [3, H, W] (one input per image) or [k, 3, H, W] (k inputs, e.g. cells).

    Returns the image set and the skipped files as (relpath, reason).
    """

    def load(row: ManifestRow) -> torch.Tensor | str:
        path = Path(data_dir) / row.relpath
        try:
            data = read_image_bytes(path)
        except ImageError as exc:
            return str(exc)
        if sha256_bytes(data) != row.sha256:
            return "sha256 differs from the split manifest (file changed since `featsvm split`)"
        try:
            img = to_rgb(_decode(data, str(path)))
        except ImageError as exc:
            return str(exc)
        return normaliser.to_uint8(transform(img))

    kept: list[ManifestRow] = []
    tensors: list[torch.Tensor] = []
    skipped: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = pool.map(load, rows)
        for row, out in tqdm(zip(rows, outcomes, strict=True), total=len(rows), desc=desc,
                             disable=not progress, unit="img", leave=False):
            if isinstance(out, str):
                skipped.append((row.relpath, out))
            else:
                kept.append(row)
                tensors.append(out)
    empty = torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
    several = any(t.dim() == 4 for t in tensors)
    stacks = [t if t.dim() == 4 else t.unsqueeze(0) for t in tensors]
    pixels = torch.cat(stacks) if tensors else empty
    owner = torch.cat([torch.full((len(t),), i, dtype=torch.int64)
                       for i, t in enumerate(stacks)]) if tensors else None
    targets = torch.tensor([LABELS.index(r.label) for r in kept], dtype=torch.int64)
    if several and owner is not None:
        return ImageSet(kept, pixels, targets[owner], owner), skipped
    return ImageSet(kept, pixels, targets), skipped


# ---------------------------------------------------------------- augmentation


def augment(x: torch.Tensor, gen: torch.Generator, jitter: float) -> torch.Tensor:
    """Random flips, 90-degree rotations and mild colour jitter, per image.

    x: float [B, 3, H, W] in [0, 1] (square images for the rotations). Smear images have no
    canonical orientation, so the 8 dihedral transforms are label-preserving; colour jitter
    stays mild because stain colour carries class information.
    """
    b = x.shape[0]
    flip_h = torch.rand(b, generator=gen) < 0.5
    flip_v = torch.rand(b, generator=gen) < 0.5
    rot = torch.randint(0, 4, (b,), generator=gen)
    x = torch.where(flip_h.view(b, 1, 1, 1), x.flip(3), x)
    x = torch.where(flip_v.view(b, 1, 1, 1), x.flip(2), x)
    if x.shape[2] == x.shape[3]:
        out = x.clone()
        for k in (1, 2, 3):
            sel = rot == k
            if sel.any():
                out[sel] = torch.rot90(x[sel], k, dims=(2, 3))
        x = out
    if jitter > 0:
        def factor() -> torch.Tensor:
            return (1.0 + (torch.rand(b, generator=gen) * 2 - 1) * jitter).view(b, 1, 1, 1)

        bright, contrast, sat = factor(), factor(), factor()
        x = x * bright
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray.mean(dim=(2, 3), keepdim=True)) * contrast + gray.mean(
            dim=(2, 3), keepdim=True)
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray) * sat + gray
        x = x.clamp(0.0, 1.0)
    return x


def hed_jitter(x: torch.Tensor, gen: torch.Generator, sigma: float) -> torch.Tensor:
    """Stain augmentation in HED space (Tellez et al. 2019), per image: optical density is
    deconvolved into hematoxylin / eosin / DAB with scikit-image's stain matrices
    (``skimage.color.hed_from_rgb``), each stain scaled by ``1 + U(-sigma, sigma)`` and shifted
    by ``U(-sigma, sigma)`` x 0.05, and recombined. Black (segmented background) stays black.

    x: float [B, 3, H, W] in [0, 1].
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    b = x.shape[0]
    to_hed = torch.as_tensor(hed_from_rgb, dtype=x.dtype)
    to_rgb = torch.as_tensor(rgb_from_hed, dtype=x.dtype)
    od = -torch.log(x.clamp(min=1e-3, max=1.0))  # optical density, [B, 3, H, W]
    hed = torch.einsum("bchw,cd->bdhw", od, to_hed)
    alpha = 1.0 + (torch.rand(b, 3, generator=gen) * 2 - 1) * sigma
    beta = (torch.rand(b, 3, generator=gen) * 2 - 1) * sigma * 0.05
    hed = hed * alpha.view(b, 3, 1, 1).to(x.dtype) + beta.view(b, 3, 1, 1).to(x.dtype)
    out = torch.exp(-torch.einsum("bdhw,dc->bchw", hed, to_rgb)).clamp(0.0, 1.0)
    black = (x.amax(dim=1, keepdim=True) < 0.06)
    return torch.where(black, x, out)


def dihedral(x: torch.Tensor, d: int) -> torch.Tensor:
    """The d-th (0..7) of the 8 flips/rotations of images [..., H, W] (0 = identity)."""
    x = torch.rot90(x, d % 4, dims=(-2, -1))
    return x.flip(-1) if d >= 4 else x
