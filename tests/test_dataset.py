"""Dataset reader: layouts, labels, bad files, image modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset, random_cell_image
from PIL import Image

from featsvm.data import dataset
from featsvm.data.dataset import ImageError, load_rgb, scan


def _write(path: Path, seed: int = 0, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    random_cell_image(np.random.default_rng(seed), 48).save(path, format=fmt)


def test_original_layout_and_labels(tiny_dataset: Path) -> None:
    res = scan(tiny_dataset)
    assert res.layout == "original-3256"
    assert res.counts() == {"benign": 6, "early_pre_b": 6, "pre_b": 6, "pro_b": 6}
    assert res.records[0].relpath.startswith("Original/")
    assert all(len(r.sha256) == 64 and r.width == 64 and r.height == 64 for r in res.records)
    assert [r.relpath for r in res.records] == sorted(r.relpath for r in res.records)


def test_parent_with_original_and_segmented_uses_original(tmp_path: Path) -> None:
    make_dataset(tmp_path, per_class=2, wrapper="Original")
    make_dataset(tmp_path, per_class=3, wrapper="Segmented", seed=1)
    assert len(scan(tmp_path).records) == 8
    assert len(scan(tmp_path, subset="Segmented").records) == 12


def test_blood_cells_3242_layout(tmp_path: Path) -> None:
    base = tmp_path / "Blood cell Cancer [ALL]"
    folders = {"Benign": "benign", "[Malignant] early Pre-B": "early_pre_b",
               "[Malignant] Pre-B": "pre_b", "[Malignant] Pro-B": "pro_b"}
    for i, folder in enumerate(folders):
        _write(base / folder / "Snap_001.jpg", seed=i)
        _write(base / folder / "Sap_013 (1).JPG", seed=10 + i)
    res = scan(tmp_path)
    assert res.layout == "blood-cells-3242"
    assert res.counts() == dict.fromkeys(folders.values(), 2)
    labels = {r.relpath.split("/")[1]: r.label for r in res.records}
    assert labels == folders


def test_generic_layout_with_class_map_and_extensions(tmp_path: Path) -> None:
    _write(tmp_path / "hematogones" / "a.png", 1, "PNG")
    _write(tmp_path / "L1" / "b.TIF", 2, "TIFF")
    _write(tmp_path / "L2" / "c.bmp", 3, "BMP")
    _write(tmp_path / "L3" / "d.jpeg", 4)
    (tmp_path / "notes").mkdir()
    res = scan(tmp_path, class_map={"L1": "early_pre_b", "L2": "pre_b", "L3": "pro_b"})
    assert res.layout == "class-folders"
    assert res.counts() == {"benign": 1, "early_pre_b": 1, "pre_b": 1, "pro_b": 1}
    assert "notes" in res.ignored_folders


def test_unknown_layout_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "misc").mkdir()
    with pytest.raises(FileNotFoundError, match="class-map"):
        scan(tmp_path)
    with pytest.raises(FileNotFoundError, match="Kaggle"):
        scan(tmp_path / "absent")


def test_bad_files_are_reported_and_skipped(tiny_dataset: Path) -> None:
    benign = tiny_dataset / "Original" / "Benign"
    (benign / "zero.jpg").write_bytes(b"")
    (benign / "text.jpg").write_text("this is not an image\n")
    good = (benign / "img-Benign-000.jpg").read_bytes()
    (benign / "truncated.jpg").write_bytes(good[: len(good) // 2])
    res = scan(tiny_dataset)
    reasons = dict(res.skipped)
    assert set(reasons) == {f"Original/Benign/{n}" for n in ("zero.jpg", "text.jpg",
                                                              "truncated.jpg")}
    assert "empty" in reasons["Original/Benign/zero.jpg"]
    assert "not a recognised image" in reasons["Original/Benign/text.jpg"]
    assert "decode" in reasons["Original/Benign/truncated.jpg"]
    assert res.counts()["benign"] == 6  # the good ones are all still there


def test_decompression_bomb_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "big.png", fmt="PNG")
    monkeypatch.setattr(dataset, "MAX_PIXELS", 1000)  # 48x48 = 2304 px is "too big" now
    with pytest.raises(ImageError, match="decompression bomb"):
        load_rgb(tmp_path / "big.png")


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_modes_convert_to_rgb(tmp_path: Path, mode: str) -> None:
    base = random_cell_image(np.random.default_rng(0), 32)
    if mode == "I;16":
        arr = (np.asarray(base.convert("L"), dtype=np.uint16) * 200).astype(np.uint16)
        im = Image.fromarray(arr)
        assert im.mode.startswith("I;16")
        path = tmp_path / "x.png"
    else:
        im = base.convert(mode)
        path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    im.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (32, 32)
    if mode == "I;16":  # scaled by its own range, not clipped to white
        assert 0 < np.asarray(out).mean() < 255 and np.asarray(out).std() > 10


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert np.asarray(load_rgb(tmp_path / "t.png")).min() == 255
