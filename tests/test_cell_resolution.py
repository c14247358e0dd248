"""Resolution normalisation of the cell view (``cells+lowres``, ``--cell-resolution N``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cells import field

from featsvm.errors import UsageError
from featsvm.features.cells import NATIVE_CELL_PX, cell_crops, crop_cell, detect
from featsvm.features.preprocess import ImageOptions, input_name, parse_input


def textured_cell(side: int = 320, seed: int = 0) -> Image.Image:
    """One sharp cell on black (a segmented single-cell image): a purple disc with a
    pixel-fine texture (chromatin), i.e. detail at the native pixel scale."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    img = np.zeros((side, side, 3))
    disc = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (0.4 * side) ** 2
    img[disc] = np.array([120, 60, 170]) + rng.normal(0, 40, (int(disc.sum()), 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def sharpness(crop: Image.Image) -> float:
    """Variance of the Laplacian inside the cell (the centre of the crop, away from the black
    edge): the crop's high-frequency content."""
    from scipy import ndimage as ndi

    grey = np.asarray(crop.convert("L"), dtype=float)
    n = grey.shape[0]
    inner = slice(int(0.3 * n), int(0.7 * n))
    return float(ndi.laplace(grey)[inner, inner].var())


def test_a_big_sharp_cell_gets_the_detail_of_a_small_one() -> None:
    big = textured_cell(320)
    # the same cell seen by a camera with 10x coarser pixels (area-averaged): ~26 px across
    small = big.resize((32, 32), Image.Resampling.BOX)
    crop = {}
    for name, img, res in (("big", big, 0), ("big-lowres", big, 32), ("small", small, 0),
                           ("small-lowres", small, 32)):
        det = detect(img)
        assert det.single and len(det.cells) == 1
        crop[name] = crop_cell(img, det.cells[0], size=112, resolution=res)
        assert crop[name].size == (112, 112)
    s = {k: sharpness(v) for k, v in crop.items()}
    assert s["big"] > 10 * s["small"]  # without it: a resolution shift
    assert s["big-lowres"] == pytest.approx(s["small"], rel=0.25)  # with it: about the same
    # a window already at or below the resolution passes unchanged (never enlarged)
    assert crop["small-lowres"].tobytes() == crop["small"].tobytes()


def test_the_window_is_area_averaged_to_the_resolution() -> None:
    from featsvm.features.cells import limit_resolution

    win = Image.fromarray(np.tile(np.array([[0, 255]], np.uint8), (64, 32)))  # 64 x 64 stripes
    out = limit_resolution(win.convert("RGB"), 32)
    assert out.size == (32, 32)
    assert np.asarray(out).std() < 1.0  # 1-px stripes averaged out, no aliasing
    tall = limit_resolution(Image.new("RGB", (20, 50)), 32)
    assert tall.size == (20, 32)  # per side, never enlarged
    with pytest.raises(UsageError):
        limit_resolution(win, 0)


def test_off_gives_byte_identical_crops() -> None:
    """The digest of the crops main's crop_cell made before the option existed."""
    img = field([(60, 60, 14), (150, 150, 9), (100, 190, 12)], seed=3)
    for crops in (cell_crops(img, size=112), cell_crops(img, size=112, resolution=0)):
        h = hashlib.sha256()
        for c in crops:
            h.update(c.tobytes())
        assert h.hexdigest() == ("522d659f304e1a33f502315a2598e6965ed274a6"
                                 "b7ae9e0b1c8c5a36805f36c8")


def test_options_record_fingerprint_and_round_trip(tmp_path: Path) -> None:
    from featsvm.features.backbones import NO_WEIGHTS, get_spec, preprocessing_for
    from featsvm.features.cache import cache_path
    from featsvm.features.preprocessing import Preprocessing

    off = ImageOptions(view="cells")
    on = ImageOptions(view="cells", cell_resolution=NATIVE_CELL_PX)
    assert "cell_resolution" not in off.to_dict()
    assert on.to_dict() == {**off.to_dict(), "cell_resolution": NATIVE_CELL_PX}
    assert ImageOptions.from_preprocessing(on.to_dict()) == on
    assert ImageOptions.from_preprocessing(off.to_dict()) == off
    assert f"resolution-normalised to {NATIVE_CELL_PX} px" in on.describe()
    names = {cache_path(tmp_path, "alexnet", NO_WEIGHTS, "fp32", None, o).name
             for o in (off, on, ImageOptions(view="cells", cell_resolution=0))}
    assert len(names) == 2  # off = the plain cell view's cache; on = its own
    pre = preprocessing_for(get_spec("alexnet"), NO_WEIGHTS, None, on)
    assert Preprocessing.from_json(pre.to_json()) == pre
    assert Preprocessing.from_json(pre.to_json()).options.cell_resolution == NATIVE_CELL_PX
    # the colour_stats baseline of the same view takes it too
    cs = preprocessing_for(get_spec("colour_stats"), NO_WEIGHTS, None, on)
    assert cs.to_json()["cell_resolution"] == NATIVE_CELL_PX
    for bad in (dict(view="cells", cell_resolution=4), dict(cell_resolution=32)):
        with pytest.raises(UsageError, match="cell resolution"):
            ImageOptions(**bad)


def test_input_token() -> None:
    assert parse_input("cells+lowres") == ("cells", "none", "rgb", NATIVE_CELL_PX)
    assert parse_input("cells+lowres+reinhard") == ("cells", "reinhard", "rgb", NATIVE_CELL_PX)
    assert parse_input("cells+grey+lowres48").cell_resolution == 48
    assert parse_input("cells+reinhard") == ("cells", "reinhard", "rgb", 0)
    for bad in ("field+lowres", "cells+lowres4", "cells+lowresx"):
        with pytest.raises(UsageError):
            parse_input(bad)
    for spec in ("cells+lowres", "cells+lowres48+grey"):
        assert input_name(ImageOptions(view="cells", cell_resolution=parse_input(
            spec).cell_resolution, colour=parse_input(spec).colour)) == spec


def test_study_and_finetune_accept_the_token(tmp_path: Path) -> None:
    from featsvm.config import ConfigError
    from featsvm.models.finetune import FinetuneConfig
    from featsvm.study import load_study

    cfg = tmp_path / "s.toml"
    cfg.write_text('[study]\ninputs = ["cells", "cells+lowres+reinhard"]\n')
    assert load_study(cfg).study.inputs == ("cells", "cells+lowres+reinhard")
    assert FinetuneConfig(input="cells+lowres").validate().input == "cells+lowres"
    from featsvm.models.finetune import image_options

    opts = image_options(FinetuneConfig(input="cells+lowres"), tmp_path / "split.csv", None)
    assert opts == ImageOptions(view="cells", cell_resolution=NATIVE_CELL_PX)
    with pytest.raises(ConfigError, match="lowres"):
        FinetuneConfig(input="field+lowres").validate()


def test_cli_extract_fit_predict_a_single_cell_on_black(tmp_path: Path) -> None:
    """`extract --view cells --cell-resolution 32`, a fit that finds that cache through the
    ``cells+lowres`` token, and predict (which rebuilds the transform from the run record) on
    a high-resolution single-cell-on-black image."""
    from click.testing import CliRunner
    from conftest import make_dataset
    from test_report import make_split

    from featsvm.cli import main
    from featsvm.features.preprocess import input_options
    from featsvm.features.preprocessing import Preprocessing
    from featsvm.models.fit import fit
    from featsvm.models.heads import HeadConfig
    from featsvm.predict import predict

    data = make_dataset(tmp_path / "data", per_class=6, size=64, seed=7)
    split = make_split(data, tmp_path / "split.csv")
    cache = tmp_path / "cache"
    r = CliRunner().invoke(main, ["extract", str(data), "--backbone", "alexnet", "--weights",
                                  "none", "--cache", str(cache), "--batch-size", "8",
                                  "--workers", "0", "--view", "cells", "--cell-resolution",
                                  str(NATIVE_CELL_PX), "--quiet"])
    assert r.exit_code == 0, r.output
    assert f"resolution-normalised to {NATIVE_CELL_PX} px" in r.output
    bad = CliRunner().invoke(main, ["extract", str(data), "--backbone", "alexnet", "--weights",
                                    "none", "--cache", str(cache), "--cell-resolution", "32"])
    assert bad.exit_code == 1 and "cell view only" in bad.output
    cfg = HeadConfig(cv_folds=2, logreg_C=(1.0,), class_weight=("none",), n_boot=10, n_jobs=1)
    rec = fit("alexnet", "logreg", split, cache_dir=cache, weights="none",
              runs_dir=tmp_path / "runs", config=cfg, progress=False,
              options=input_options("cells+lowres", split))
    assert rec.config["preprocessing"]["cell_resolution"] == NATIVE_CELL_PX
    assert "<cells+lowres>" in rec.config["model"]

    cell = tmp_path / "single" / "cell.png"
    cell.parent.mkdir()
    textured_cell(300, seed=1).save(cell)
    res = predict(rec.path, [cell], progress=False, batch_size=2)
    assert len(res.predictions) == 1
    assert np.isfinite(res.predictions[0].proba).all()
    # what predict embeds: the record's transform = the resolution-normalised crop
    pre = Preprocessing.from_json(rec.config["preprocessing"])
    img = Image.open(cell).convert("RGB")
    x = pre.image_transform()(img)
    want = crop_cell(img, detect(img).cells[0], size=pre.options.cell_size,
                     resolution=NATIVE_CELL_PX)
    sharp = crop_cell(img, detect(img).cells[0], size=pre.options.cell_size)
    back = pre.with_options(ImageOptions(view="cells")).image_transform()(img)
    assert x.shape == back.shape == (1, 3, pre.options.cell_size, pre.options.cell_size)
    from torchvision import transforms as T

    tf = T.Compose([T.ToTensor(), T.Normalize(list(pre.mean or ()), list(pre.std or ()))])
    assert np.allclose(x[0].numpy(), tf(want).numpy())
    assert not np.allclose(x[0].numpy(), tf(sharp).numpy())
