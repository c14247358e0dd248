"""Shortcut baselines (colour_stats, annotation_box) and the annotation box itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featsvm.data.annotation import (
    annotation_box,
    crop_annotation,
    mask_annotation,
    median_colour,
)
from featsvm.data.dataset import scan
from featsvm.features.backbones import describe, load_backbone, make_transform
from featsvm.features.cache import read_cache
from featsvm.features.extract import extract
from featsvm.features.handcrafted import (
    COLOUR_STATS_NAMES,
    annotation_box_pixels,
    colour_stats,
)


def _two_tone(width: int = 10, height: int = 10) -> Image.Image:
    """Left half (0, 100, 200), right half (100, 100, 0): every statistic is hand-computable."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (0, 100, 200)
    arr[:, width // 2:] = (100, 100, 0)
    return Image.fromarray(arr, "RGB")


def test_colour_stats_by_hand() -> None:
    f = colour_stats(_two_tone())
    assert f.shape == (27,) and f.dtype == np.float32 and len(COLOUR_STATS_NAMES) == 27
    got = dict(zip(COLOUR_STATS_NAMES, f.tolist(), strict=True))
    # R: 50 pixels at 0, 50 at 100 -> mean 50, std 50; linear percentiles of 100 sorted values
    # (index q/100 * 99): p1 -> index 0.99 -> 0, p25 -> 24.75 -> 0, p50 -> 49.5 -> 50,
    # p75 -> 74.25 -> 100, p99 -> 100.
    assert got["R_mean"] == 50 and got["R_std"] == 50
    assert (got["R_p1"], got["R_p5"], got["R_p25"]) == (0, 0, 0)
    assert got["R_p50"] == pytest.approx(50.0)
    assert (got["R_p75"], got["R_p95"], got["R_p99"]) == (100, 100, 100)
    # G constant 100: std 0, every percentile 100
    assert got["G_mean"] == 100 and got["G_std"] == 0
    assert all(got[f"G_p{p}"] == 100 for p in (1, 5, 25, 50, 75, 95, 99))
    # B: 50 at 200, 50 at 0
    assert got["B_mean"] == 100 and got["B_std"] == 100 and got["B_p50"] == pytest.approx(100)
    assert COLOUR_STATS_NAMES[:3] == ("R_mean", "R_std", "R_p1")


def test_annotation_box_geometry_and_pixels() -> None:
    assert annotation_box(224, 224) == (168, 179, 224, 224)  # 56 x 45, bottom-right
    assert annotation_box(1024, 768) == (768, 614, 1024, 768)
    arr = np.zeros((40, 40, 3), np.uint8)
    x0, y0, _, _ = annotation_box(40, 40)
    arr[y0:, x0:] = (255, 0, 51)  # the box in one colour, everything else black
    img = Image.fromarray(arr, "RGB")
    assert crop_annotation(img).size == (10, 8)
    v = annotation_box_pixels(img)
    assert v.shape == (16 * 12 * 3,) and v.dtype == np.float32
    np.testing.assert_allclose(v.reshape(12, 16, 3), np.broadcast_to([1.0, 0.0, 0.2], (12, 16, 3)),
                               atol=1e-6)


def test_mask_annotation_changes_only_the_box() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    out = np.asarray(mask_annotation(img))
    x0, y0, x1, y1 = annotation_box(60, 45)
    inside = np.zeros((45, 60), bool)
    inside[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(out[~inside], arr[~inside])
    median = np.median(arr.reshape(-1, 3), axis=0).astype(int)
    assert (out[inside] == median).all()
    assert np.asarray(img).tobytes() == arr.tobytes()  # the input is not modified


def test_baselines_need_no_weights_and_embed_like_a_backbone(tmp_path: Path) -> None:
    spec, info, pre = describe("colour_stats", weights_dir=tmp_path / "nowhere")
    assert info.label == "none" and info.sha256 is None
    assert pre.layer == "stats" and pre.dim == 27
    assert pre.features is not None and pre.features["name"] == "colour_stats"
    lb = load_backbone("annotation_box", weights_dir=tmp_path / "nowhere")
    img = _two_tone(40, 40)
    x = make_transform(lb.preprocessing)(img)
    assert tuple(x.shape) == (576, 1, 1)
    emb = lb.embedder(x[None])
    np.testing.assert_allclose(emb.numpy()[0], annotation_box_pixels(img))


def test_extract_baselines_into_their_own_caches(tiny_dataset: Path, tmp_path: Path) -> None:
    records = scan(tiny_dataset).records
    names = set()
    for backbone, dim in (("colour_stats", 27), ("annotation_box", 576)):
        s = extract(tiny_dataset, backbone, weights_dir=tmp_path / "nowhere",
                    cache_dir=tmp_path / "cache", device="cpu", workers=0, progress=False,
                    records=records)
        assert s.n_new == len(records) and s.dim == dim and s.weights_label == "none"
        assert s.cache_path.name.startswith(f"{backbone}-") and "-none-fp32-" in s.cache_path.name
        names.add(s.cache_path.name)
        c = read_cache(s.cache_path)
        if backbone == "colour_stats":
            rec = records[3]
            expected = colour_stats(Image.open(tiny_dataset / rec.relpath).convert("RGB"))
            np.testing.assert_allclose(c.lookup([rec.sha256])[0], expected, rtol=1e-6)
    assert len(names) == 2



def test_mask_annotation_option_masks_before_anything_else(tiny_dataset: Path,
                                                          tmp_path: Path) -> None:
    from featsvm.features.cache import locate_cache
    from featsvm.features.preprocess import ImageOptions, input_name

    masked = ImageOptions(mask_annotation=True)
    assert ImageOptions().to_dict() == {}  # old fingerprints stay
    assert masked.to_dict() == {"mask_annotation": True} and input_name(masked) == "field+masked"
    _, _, pre = describe("alexnet", weights="none", layer="gap", options=masked)
    assert pre.options == masked
    img = _two_tone(224, 224)
    arr = np.asarray(img).copy()
    x0, y0, _, _ = annotation_box(224, 224)
    arr[y0:, x0:] = (255, 255, 0)  # another box, same per-channel medians of the image
    other = Image.fromarray(arr, "RGB")
    assert median_colour(other) == median_colour(img)
    _, _, plain = describe("alexnet", weights="none", layer="gap")
    t_plain, t_mask = plain.image_transform(), pre.image_transform()
    assert not np.allclose(t_plain(img).numpy(), t_plain(other).numpy())
    np.testing.assert_allclose(t_mask(img).numpy(), t_mask(other).numpy())
    # extraction: its own cache file, found again with the same option
    kw = dict(weights="none", layer="gap", cache_dir=tmp_path / "c", device="cpu", workers=0,
              progress=False)
    a = extract(tiny_dataset, "alexnet", **kw)
    b = extract(tiny_dataset, "alexnet", options=masked, **kw)
    assert a.cache_path != b.cache_path
    c = read_cache(b.cache_path)
    assert c.attrs["preprocessing"]["mask_annotation"] is True
    assert "--mask-annotation" in c.attrs["extract_command"]
    assert locate_cache(tmp_path / "c", "alexnet", "none", layer="gap",
                        options=masked) == b.cache_path
