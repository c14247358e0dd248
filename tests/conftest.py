"""Shared fixtures: tiny generated datasets and the optional ../shared folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data" / "all-taleqani"
SHARED_WEIGHTS = SHARED / "weights"

CLASS_FOLDERS = {"benign": "Benign", "early_pre_b": "Early", "pre_b": "Pre", "pro_b": "Pro"}


def random_cell_image(
    rng: np.random.Generator, size: int = 64, label_index: int = 0
) -> Image.Image:
    """A textured RGB image with blob 'cells'; the class tints the blobs so that a model can
    learn something, and every image differs."""
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.full((size, size, 3), 200.0) + rng.normal(0, 12, (size, size, 3))
    tint = np.array([[150, 60, 160], [90, 40, 170], [170, 50, 90], [60, 110, 160]][label_index % 4])
    for _ in range(int(rng.integers(3, 7))):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(size / 12, size / 5)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[mask] = tint + rng.normal(0, 15, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_labelled_cells(root: Path, per_class: int, size: int, seed: int) -> Path:
    """Another lab's labelled set in C-NMC's layout: root/all (blast-tinted) and root/hem
    (benign-tinted) with `per_class` PNGs each."""
    rng = np.random.default_rng(seed)
    for folder, idx in (("all", 2), ("hem", 0)):
        (root / folder).mkdir(parents=True)
        for j in range(per_class):
            random_cell_image(rng, size, idx).save(root / folder / f"c{j}.png")
    return root


def make_dataset(root: Path, per_class: int = 6, size: int = 64, seed: int = 0,
                 wrapper: str | None = "Original") -> Path:
    """Write a tiny dataset in the 3,256-release layout (root/Original/<Class>/*.jpg)."""
    rng = np.random.default_rng(seed)
    base = root / wrapper if wrapper else root
    for i, (_label, folder) in enumerate(CLASS_FOLDERS.items()):
        d = base / folder
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            random_cell_image(rng, size, i).save(d / f"img-{folder}-{j:03d}.jpg", quality=95)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """4 classes x 6 distinct 64x64 JPEGs in the Original/<Class>/ layout."""
    return make_dataset(tmp_path / "data")


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "Original").is_dir():
        pytest.skip(f"real dataset not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def shared_weights() -> Path:
    if not (SHARED_WEIGHTS / "weights.toml").is_file():
        pytest.skip(f"offline weights not present at {SHARED_WEIGHTS}")
    return SHARED_WEIGHTS
