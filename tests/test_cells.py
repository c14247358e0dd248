"""Cell detector, crop scale, stain normaliser and OOD flag on synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featsvm.evaluation.ood import OODFlag
from featsvm.features import stain
from featsvm.features.cells import cell_crops, crop_cell, detect

PURPLE = (120, 40, 160)
RED_CELL = (215, 170, 180)  # pale pink red cell
BACKGROUND = (235, 225, 230)


def field(blobs, size=224, seed=0, red_cells=20):
    """A smear-like field: pale background, pink red cells, purple 'white cells' at blobs
    (cy, cx, r)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.full((size, size, 3), BACKGROUND, dtype=np.float64)
    for _ in range(red_cells):
        cy, cx = rng.uniform(0, size, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 8 ** 2] = RED_CELL
    for cy, cx, r in blobs:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = PURPLE
    img += rng.normal(0, 3, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def test_detector_finds_planted_cells():
    blobs = [(50, 60, 14), (150, 140, 12), (100, 190, 13)]
    det = detect(field(blobs))
    assert not det.single
    assert len(det.cells) == 3
    found = sorted((round(c.centroid[0]), round(c.centroid[1])) for c in det.cells)
    for (cy, cx, _), (fy, fx) in zip(sorted(blobs), found, strict=True):
        assert abs(cy - fy) <= 2 and abs(cx - fx) <= 2
    assert 20 <= det.cells[0].diameter <= 32


def test_dark_blue_violet_lymphoid_cells_are_found():
    """Small dark blue-violet nuclei (R low: the hematogones of benign fields) next to a pale
    pink-violet cell: detector version 2 (B - G) finds all of them; version 1 (min(R, B) - G)
    missed the dark ones, which is why it was replaced."""
    from featsvm.features.cells import DETECTOR_VERSIONS

    dark = [(50, 50, 6), (50, 170, 6), (170, 60, 7), (170, 170, 6)]
    img = np.asarray(field(dark + [(110, 110, 14)], red_cells=12)).copy()
    yy, xx = np.mgrid[0:224, 0:224]
    for cy, cx, r in dark:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = (60, 35, 170)
    big = (yy - 110) ** 2 + (xx - 110) ** 2 < 14 ** 2
    img[big] = (190, 120, 200)
    found = {(round(c.centroid[0] / 10), round(c.centroid[1] / 10))
             for c in detect(Image.fromarray(img)).cells}
    assert found == {(5, 5), (5, 17), (17, 6), (17, 17), (11, 11)}
    old = detect(Image.fromarray(img), DETECTOR_VERSIONS[1]).cells
    assert len(old) < 5


def test_size_filter_drops_specks_and_smudges():
    det = detect(field([(60, 60, 14), (150, 60, 3), (150, 160, 60)]))
    assert [(round(c.centroid[0]), round(c.centroid[1])) for c in det.cells] == [(60, 60)]


def test_touching_cells_are_split():
    det = detect(field([(100, 88, 14), (100, 114, 14)]))
    assert len(det.cells) == 2


def test_field_without_white_cell_has_none():
    det = detect(field([]))
    assert det.cells == []
    assert cell_crops(field([])) == []


def test_segmented_single_cell_is_one_cell():
    img = np.zeros((300, 300, 3), np.uint8)
    yy, xx = np.mgrid[0:300, 0:300]
    img[(yy - 150) ** 2 + (xx - 140) ** 2 < 80 ** 2] = (90, 50, 110)
    det = detect(Image.fromarray(img))
    assert det.single and len(det.cells) == 1
    assert det.cells[0].diameter == pytest.approx(160, abs=3)


def test_crop_scale_is_normalised():
    """A small and a big cell both span `fill` of the crop."""
    for r in (10, 25):
        img = field([(112, 112, r)], red_cells=0)
        det = detect(img)
        crop = np.asarray(crop_cell(img, det.cells[0], size=100, fill=0.8))
        purple = (crop[..., 2].astype(int) - crop[..., 1]) > 60
        cols = np.flatnonzero(purple.any(axis=0))
        assert crop.shape == (100, 100, 3)
        assert cols[-1] - cols[0] + 1 == pytest.approx(80, abs=4)


def test_crop_suppresses_background():
    img = field([(112, 112, 15)])
    det = detect(img)
    crop = np.asarray(crop_cell(img, det.cells[0], size=64, suppress_background=True))
    assert (crop[0, 0] == 0).all() and (crop[32, 32] > 0).any()
    kept = np.asarray(crop_cell(img, det.cells[0], size=64, suppress_background=False))
    assert kept[0, 0].min() > 150


def test_reinhard_moves_a_tinted_image_to_the_reference():
    rng = np.random.default_rng(0)
    ref_img = np.clip(rng.normal((150, 80, 170), 20, (64, 64, 3)), 0, 255).astype(np.uint8)
    ref = stain.reference_from_images([ref_img])
    tinted = np.clip(rng.normal((200, 150, 110), 10, (64, 64, 3)), 0, 255).astype(np.uint8)
    tinted[:8] = 0  # black background stays black and out of the statistics
    out = np.asarray(stain.reinhard(tinted, ref))
    assert (out[:8] == 0).all()
    before = np.abs(np.array(stain.lab_stats(tinted).mean) - ref.mean).sum()
    after = np.abs(np.array(stain.lab_stats(out).mean) - ref.mean).sum()
    assert after < 0.1 * before
    assert stain.LabStats.from_list(ref.to_list()).mean == pytest.approx(ref.mean, abs=1e-3)


def test_hed_jitter_and_colour_free():
    rng = np.random.default_rng(0)
    img = field([(112, 112, 15)])
    a, b = stain.hed_jitter(img, rng), stain.hed_jitter(img, rng)
    assert a.size == img.size and np.asarray(a).tobytes() != np.asarray(b).tobytes()
    for colour in ("grey", "hematoxylin"):
        g = np.asarray(stain.colour_free(img, colour))
        assert g.shape == (224, 224, 3) and (g[..., 0] == g[..., 2]).all()
    h = np.asarray(stain.colour_free(img, "hematoxylin"))
    assert h[112, 112, 0] < h[5, 5, 0]  # nucleus dark, background light
    with pytest.raises(ValueError):
        stain.colour_free(img, "sepia")


def test_ood_flag_separates_planted_distributions():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(20, 50))
    train = rng.normal(size=(400, 20)) @ mix
    val = rng.normal(size=(200, 20)) @ mix
    test_in = rng.normal(size=(200, 20)) @ mix
    shifted = rng.normal(size=(200, 20)) @ mix + rng.normal(3, 1, size=(200, 50))
    flag = OODFlag(n_components=20).fit(train).calibrate(val)
    assert flag.flag(test_in).mean() <= 0.12
    assert flag.flag(shifted).mean() >= 0.95


def test_cells_command_lists_fields_without_cells(tmp_path):
    from click.testing import CliRunner

    from featsvm.cli import main

    d = tmp_path / "fields"
    d.mkdir()
    field([(60, 60, 14), (150, 150, 12)]).save(d / "two.png")
    field([]).save(d / "empty.png")
    res = CliRunner().invoke(main, ["cells", str(d), "--preview", str(tmp_path / "p.png"),
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    assert "2 image(s)" in res.output and "2 cell(s)" in res.output
    assert "no cell found in 1 image(s):\n  empty.png" in res.output
    assert (tmp_path / "p.png").is_file()


def test_hed_jitter_batch_for_fine_tuning():
    import torch

    from featsvm.models.pixels import hed_jitter

    x = torch.rand(4, 3, 16, 16) * 0.5 + 0.3
    x[:, :, :4] = 0.0  # black background
    a = hed_jitter(x, torch.Generator().manual_seed(0), 0.2)
    b = hed_jitter(x, torch.Generator().manual_seed(0), 0.2)
    assert torch.equal(a, b) and a.shape == x.shape
    assert (a[:, :, :4] == 0).all()
    assert (a - x).abs().mean() > 1e-3
    assert (hed_jitter(x, torch.Generator().manual_seed(0), 0.0) - x).abs().max() < 1e-3


@pytest.mark.parametrize("radius", [1, 2, 5, 13])
def test_dilate_disk_equals_binary_dilation_with_a_disk(radius: int) -> None:
    """The distance-transform dilation behind crop_cell marks exactly the pixels of
    scipy's binary_dilation with skimage's disk (so cached cell crops stay the same)."""
    from scipy import ndimage as ndi
    from skimage import morphology

    from featsvm.features.cells import dilate_disk

    rng = np.random.default_rng(radius)
    for shape in ((40, 40), (31, 57)):
        mask = rng.random(shape) > 0.97
        mask[0, 5] = mask[-1, -1] = True  # touching the border
        want = ndi.binary_dilation(mask, morphology.disk(radius))
        np.testing.assert_array_equal(dilate_disk(mask, radius), want)
    empty = np.zeros((9, 9), bool)
    assert not dilate_disk(empty, 3).any()
