"""View / stain / colour options: in the fingerprint, through extract -> fit -> predict (+ OOD)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset
from test_report import make_split

from featsvm.errors import UsageError
from featsvm.features.backbones import describe
from featsvm.features.cache import fingerprint
from featsvm.features.preprocess import ImageOptions, pool, resolve_options


def test_defaults_leave_the_fingerprint_unchanged_and_options_change_it():
    _, info, plain = describe("alexnet", "none")
    _, _, default = describe("alexnet", "none", options=ImageOptions())
    assert default == plain and "view" not in plain.to_json()
    _, _, cells = describe("alexnet", "none", options=ImageOptions(view="cells"))
    _, _, grey = describe("alexnet", "none", options=ImageOptions(colour="grey"))
    assert cells.to_json()["view"] == "cells" and grey.to_json()["colour"] == "grey"
    prints = {fingerprint("alexnet", None, p, "fp32") for p in (plain, cells, grey)}
    assert len(prints) == 3


def test_the_detector_version_is_recorded_and_old_records_keep_the_first():
    from featsvm.features.cells import DETECTOR_VERSION

    new = ImageOptions(view="cells").to_dict()
    assert new["detector"] == DETECTOR_VERSION == 2
    old = {"view": "cells", "cell_size": 112, "max_cells": 3}  # written before versions
    assert ImageOptions.from_preprocessing(old).detector == 1
    assert ImageOptions.from_preprocessing(old).to_dict() == old  # same fingerprint as before
    assert ImageOptions.from_preprocessing(new).to_dict() == new
    assert "detector" not in ImageOptions().to_dict()  # the field view has no detector
    with pytest.raises(UsageError, match="detector version"):
        ImageOptions(view="cells", detector=9)


def test_option_values_are_checked():
    with pytest.raises(UsageError):
        ImageOptions(view="tiles")
    with pytest.raises(UsageError):
        ImageOptions(stain="reinhard")  # no reference
    with pytest.raises(UsageError):
        resolve_options(stain="reinhard")  # no split to take a reference from


def test_cell_view_transform_gives_one_tensor_per_cell_and_pool_averages():
    from test_cells import field

    _, _, pre = describe("alexnet", "none", options=ImageOptions(view="cells"))
    x = pre.image_transform()(field([(60, 60, 14), (150, 150, 12)]))
    assert tuple(x.shape) == (2, 3, 112, 112)
    _, _, pre_f = describe("alexnet", "none")
    assert tuple(pre_f.image_transform()(field([])).shape) == (1, 3, 224, 224)
    e = np.arange(12, dtype=float).reshape(6, 2)
    np.testing.assert_allclose(pool(e, [2, 1, 3]), [[1, 2], [4, 5], [8, 9]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("views")
    data = make_dataset(root / "data", per_class=6, size=64, seed=5)
    split = make_split(data, root / "split.csv")
    return {"root": root, "data": data, "split": split}


def test_cells_and_reinhard_through_extract_fit_predict(tiny: dict[str, Path]) -> None:
    from click.testing import CliRunner

    from featsvm.cli import main
    from featsvm.features.extract import extract
    from featsvm.models.fit import fit
    from featsvm.models.heads import HeadConfig
    from featsvm.predict import predict
    from featsvm.runs import read_run

    cache = tiny["root"] / "cache"
    opts = resolve_options("cells", "reinhard", "rgb", tiny["split"], tiny["data"])
    assert Path(str(tiny["split"]) + ".reinhard-cells.json").is_file()
    s = extract(tiny["data"], "alexnet", weights="none", cache_dir=cache, batch_size=4,
                workers=0, progress=False, options=opts)
    assert s.n_new == 24
    plain = extract(tiny["data"], "alexnet", weights="none", cache_dir=cache, batch_size=4,
                    workers=0, progress=False)
    assert plain.cache_path != s.cache_path
    cfg = HeadConfig(cv_folds=2, logreg_C=(1.0,), class_weight=("none",), n_boot=10, n_jobs=1)
    # the same options, resolved again from the split (reference read back): same cache
    again = resolve_options("cells", "reinhard", "rgb", tiny["split"])
    rec = fit("alexnet", "logreg", tiny["split"], cache_dir=cache, weights="none",
              runs_dir=tiny["root"] / "runs", config=cfg, progress=False, options=again)
    pre = rec.config["preprocessing"]
    assert pre["view"] == "cells" and pre["stain"] == "reinhard"
    assert len(pre["stain_reference"]) == 6
    assert rec.config["ood"]["threshold"] > 0 and rec.config["ood"]["threshold_from"] == "val"
    own = read_run(rec.path).predictions()
    rels = own.relpath[:6]
    res = predict(rec.path, [tiny["data"] / r for r in rels], data_root=tiny["data"],
                  progress=False, batch_size=4)
    got = {p.file: p for p in res.predictions}
    for i, rel in enumerate(rels):
        np.testing.assert_allclose(got[rel].proba, own.proba[i], atol=1e-4)
        assert got[rel].ood in (True, False)
    out = tiny["root"] / "pred.csv"
    r = CliRunner().invoke(main, ["predict", "--run", str(rec.path),
                                  *(str(tiny["data"] / x) for x in rels[:2]),
                                  "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "ood:" in r.output
    rows = list(csv.DictReader(out.open()))
    assert {row["ood"] for row in rows} <= {"0", "1"}
    assert "<cells+reinhard>" in rec.config["model"]

    from featsvm.models.cv import cross_validate

    cvrec = cross_validate("alexnet", "logreg", tiny["split"], cache_dir=cache, weights="none",
                           runs_dir=tiny["root"] / "runs-cv", config=cfg, folds=2,
                           progress=False, options=again)
    assert cvrec.config["model"] == "alexnet<cells+reinhard> + logreg"
    assert cvrec.config["preprocessing"]["view"] == "cells"


def test_study_inputs_are_checked_on_load(tmp_path: Path) -> None:
    from featsvm.config import ConfigError
    from featsvm.features.preprocess import input_name, parse_input
    from featsvm.study import load_study

    assert parse_input("cells+reinhard+grey") == ("cells", "reinhard", "grey", 0)
    assert input_name(ImageOptions(view="cells", colour="grey")) == "cells+grey"
    good = tmp_path / "good.toml"
    good.write_text('[study]\ninputs = ["field", "cells+reinhard"]\n')
    assert load_study(good).study.inputs == ("field", "cells+reinhard")
    bad = tmp_path / "bad.toml"
    bad.write_text('[study]\ninputs = ["cells+sepia"]\n')
    with pytest.raises(ConfigError, match="sepia"):
        load_study(bad)


def test_transfer_config_loads() -> None:
    from featsvm.study import load_study

    s = load_study(Path(__file__).resolve().parents[1] / "configs" / "transfer.toml")
    assert {"field", "cells", "cells+lowres", "cells+lowres+reinhard"} <= set(s.study.inputs)
    assert s.study.cv_folds == 10 and [e.name for e in s.external] == ["cnmc-2019-sample"]


def test_colour_stats_of_the_cell_view_are_the_cell_pixels_statistics(tmp_path: Path) -> None:
    """colour_stats --view cells: per crop, the 27 statistics of its non-black pixels, averaged
    over the field's cells (the shortcut baseline of the cell view); annotation_box refuses."""
    from test_cells import field

    from featsvm.features.cells import cell_crops
    from featsvm.features.handcrafted import colour_stats

    img = field([(60, 60, 14), (150, 150, 12)])
    opts = ImageOptions(view="cells")
    _, _, pre = describe("colour_stats", "none", options=opts)
    assert pre.to_json()["view"] == "cells"
    x = pre.image_transform()(img)
    assert tuple(x.shape) == (2, 27, 1, 1)
    crops = cell_crops(img, size=112, max_cells=12)
    want = np.stack([colour_stats(c, foreground=True) for c in crops])
    np.testing.assert_allclose(x[:, :, 0, 0].numpy(), want, rtol=1e-6)
    # the cell's own colour: the purple of the planted cells, not the black around them
    assert want[:, 0].min() > 60 and want[:, 2].min() > 15  # R mean, R p1 above black
    plain = np.asarray(crops[0], dtype=float).reshape(-1, 3)
    assert plain[:, 0].mean() < want[0, 0]  # the plain statistics include the black
    with pytest.raises(UsageError, match="hand-crafted baseline"):
        describe("annotation_box", "none", options=opts)
    with pytest.raises(UsageError, match="hand-crafted baseline"):
        describe("colour_stats", "none", options=ImageOptions(colour="grey"))
