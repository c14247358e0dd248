"""Typed contracts: Preprocessing JSON compatibility, FeatureKey names, WeightsId.

The cache file names below are literals on purpose: they were computed with the untyped
preprocessing dicts (main at 8d5a4cc, before `Preprocessing`/`FeatureKey`), and the real-data
caches of the study carry the first ones. A change that alters any of them would silently
orphan every existing cache (and every run record's cache fingerprint).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from featsvm.errors import PreprocessingError, UsageError
from featsvm.features.backbones import NO_WEIGHTS, get_spec, preprocessing_for
from featsvm.features.cache import cache_path, check_consistent
from featsvm.features.key import FeatureKey, WeightsId
from featsvm.features.preprocess import ImageOptions
from featsvm.features.preprocessing import Preprocessing
from featsvm.features.weights import WeightsInfo
from featsvm.models.basic_cnn import BasicCNNSpec, basic_cnn_preprocessing

VGG_KERAS = "df6e537f398449ff23af884434315cb34620402f41054e825eab382a3fcc6602"
ALEX_LPIPS = "c18dbe1d75652006c256d6b0cb4d073222d22d73c1e5cdc0756ba911b3ebc45b"
NSFW_INCEPTION = "9705e7702949faae59bcbd61e11f337c245804e85ea8839d0e3139db680184f3"
LITE0 = "0e570cb8311025cc1bc390e913ec2181d2e492bca0166994070fe187e9b45bbb"
VGG_MISSING = tuple(f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias"))
ALEX_MISSING = tuple(f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias"))
REF = (60.1235, 10.0, -3.0, 20.0, 5.0, 4.0)

# (backbone, weights sha256, keys missing from the file, layer, precision, image options, name)
GOLDEN = [
    ("vgg16", VGG_KERAS, VGG_MISSING, None, "fp32", {},
     "vgg16-gap-df6e537f-fp32-c76d37964e62.h5"),
    ("alexnet", ALEX_LPIPS, ALEX_MISSING, None, "fp32", {},
     "alexnet-gap-c18dbe1d-fp32-4a79bc94f84f.h5"),
    ("efficientnet_lite0", LITE0, (), None, "fp32", {},
     "efficientnet_lite0-pre_logits-0e570cb8-fp32-7f5179d264d8.h5"),
    ("inception_v3", NSFW_INCEPTION, ("fc.weight", "fc.bias"), "mixed_6c", "fp32", {},
     "inception_v3-mixed_6c-9705e770-fp32-1168e511c376.h5"),
    ("colour_stats", None, (), None, "fp32", {}, "colour_stats-stats-none-fp32-fe53e49c7ec9.h5"),
    ("annotation_box", None, (), None, "fp32", {},
     "annotation_box-pixels-none-fp32-ee2f7795ed3a.h5"),  # 16x12 box (was 7ec7a32996e4 at 32x24)
    ("colour_stats", None, (), None, "fp32", {"mask_annotation": True},
     "colour_stats-stats-none-fp32-83ed61e7eb72.h5"),
    # cell-view caches of the first cell detector (no detector key in their records)
    ("alexnet", ALEX_LPIPS, ALEX_MISSING, None, "fp32",
     {"view": "cells", "detector": 1, "max_cells": 3},
     "alexnet-gap-c18dbe1d-fp32-be46e3421d3b.h5"),
    ("alexnet", ALEX_LPIPS, ALEX_MISSING, None, "fp32",
     {"view": "cells", "stain": "reinhard", "stain_reference": REF, "detector": 1,
      "max_cells": 3},
     "alexnet-gap-c18dbe1d-fp32-a4457e7732f7.h5"),
    # ... and of detector version 2 with 12 cells per field (its own fingerprint)
    ("alexnet", ALEX_LPIPS, ALEX_MISSING, None, "fp32", {"view": "cells"},
     "alexnet-gap-c18dbe1d-fp32-36af21e7d23f.h5"),
    # ... resolution-normalised (cells+lowres; "cell_resolution" only when on)
    ("alexnet", ALEX_LPIPS, ALEX_MISSING, None, "fp32", {"view": "cells", "cell_resolution": 32},
     "alexnet-gap-c18dbe1d-fp32-e23192294094.h5"),
    ("alexnet", ALEX_LPIPS, ALEX_MISSING, None, "fp32", {"colour": "grey"},
     "alexnet-gap-c18dbe1d-fp32-325766c0fea7.h5"),
    ("alexnet", ALEX_LPIPS, ALEX_MISSING, None, "fp32", {"mask_annotation": True},
     "alexnet-gap-c18dbe1d-fp32-0c26228e32f3.h5"),
    ("vgg16", VGG_KERAS, VGG_MISSING, None, "fp32",
     {"view": "cells", "colour": "hematoxylin", "mask_annotation": True, "detector": 1,
      "max_cells": 3},
     "vgg16-gap-df6e537f-fp32-36ac626bc502.h5"),
    ("alexnet", None, (), "gap", "bf16", {}, "alexnet-gap-random-bf16-fd0e7140b25c.h5"),
    ("alexnet", None, (), None, "fp32", {}, "alexnet-fc7-random-fp32-a38a89c2935e.h5"),
]

# JSON that records hold (config.json "preprocessing", cache attrs), verbatim
OLD_INCEPTION = {"backbone": "inception_v3", "input_size": 299, "resize": 342,
                 "interpolation": "bilinear", "crop": 299, "mean": [0.485, 0.456, 0.406],
                 "std": [0.229, 0.224, 0.225], "layer": "mixed_6c", "dim": 768,
                 "hooks": ["keras_avgpool"], "not_imagenet_from": "Mixed_6d"}
OLD_BASIC_CNN = {"input_size": 128, "resize": 128, "crop": 128, "interpolation": "bilinear",
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                 "architecture": {"channels": [32, 64, 128, 128], "dense": 128, "dropout": 0.5}}
OLD_COLOUR_STATS = {"backbone": "colour_stats",
                    "features": {"name": "colour_stats", "version": 1,
                                 "percentiles": [1, 5, 25, 50, 75, 95, 99], "scale": "0-255",
                                 "std_ddof": 0},
                    "layer": "stats", "dim": 27, "hooks": [], "not_imagenet_from": None}
OLD_CELLS_REINHARD = {"view": "cells", "cell_size": 112, "max_cells": 3, "stain": "reinhard",
                      "stain_reference": list(REF), "backbone": "alexnet", "input_size": 224,
                      "resize": 256, "interpolation": "bilinear", "crop": 224,
                      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                      "layer": "gap", "dim": 256, "hooks": [], "not_imagenet_from": None}
# the attributes of /work/cache/colour_stats-stats-none-fp32-422ece0ea486.h5, written by the
# baselines' branch before it landed (image fields with placeholder values): still readable
PRELANDING_COLOUR_STATS = {**OLD_COLOUR_STATS, "crop": 0, "input_size": 0,
                           "interpolation": "bilinear", "mean": [0.0, 0.0, 0.0], "resize": 0,
                           "std": [1.0, 1.0, 1.0]}


def _info(backbone: str, sha: str | None, missing: tuple[str, ...]) -> WeightsInfo:
    if get_spec(backbone).image_features is not None:
        return NO_WEIGHTS
    return WeightsInfo("random" if sha is None else "some label", sha, "test", missing)


@pytest.mark.parametrize(("backbone", "sha", "missing", "layer", "precision", "opts", "name"),
                         GOLDEN)
def test_cache_file_names_are_unchanged(backbone, sha, missing, layer, precision, opts, name,
                                        tmp_path) -> None:
    info = _info(backbone, sha, missing)
    options = ImageOptions(**opts)
    assert cache_path(tmp_path, backbone, info, precision, layer, options).name == name
    pre = preprocessing_for(get_spec(backbone), info, layer, options)
    key = FeatureKey(backbone, WeightsId.from_info(info), precision, pre)
    assert key.file_name == name
    # through the attributes a cache file stores (JSON string, as h5py gives it back)
    attrs = {**key.cache_attrs(), "preprocessing": json.dumps(pre.to_json(), sort_keys=True)}
    assert FeatureKey.from_cache_attrs(attrs) == key
    assert FeatureKey.from_cache_attrs(attrs).fingerprint == key.fingerprint
    assert Preprocessing.from_json(pre.to_json()) == pre


@pytest.mark.parametrize("old", [OLD_INCEPTION, OLD_BASIC_CNN, OLD_COLOUR_STATS,
                                 OLD_CELLS_REINHARD, PRELANDING_COLOUR_STATS])
def test_old_json_round_trips(old) -> None:
    pre = Preprocessing.from_json(old)
    assert pre.to_json() == old
    assert list(pre.to_json()) == list(old) or old is PRELANDING_COLOUR_STATS  # key order too
    assert Preprocessing.from_json(json.loads(json.dumps(pre.to_json()))) == pre
    hash(pre)  # frozen and hashable (a dict key, a set member)


def test_builders_give_the_old_json() -> None:
    info = _info("inception_v3", NSFW_INCEPTION, ("fc.weight", "fc.bias"))
    assert preprocessing_for(get_spec("inception_v3"), info, "mixed_6c").to_json() == OLD_INCEPTION
    assert basic_cnn_preprocessing(BasicCNNSpec()).to_json() == OLD_BASIC_CNN
    assert preprocessing_for(get_spec("colour_stats"), NO_WEIGHTS).to_json() == OLD_COLOUR_STATS
    alex = _info("alexnet", ALEX_LPIPS, ALEX_MISSING)
    cells = ImageOptions(view="cells", stain="reinhard", stain_reference=REF, detector=1,
                         max_cells=3)
    assert (preprocessing_for(get_spec("alexnet"), alex, None, cells).to_json()
            == OLD_CELLS_REINHARD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        basic_cnn_preprocessing(BasicCNNSpec()).resize = 3  # type: ignore[misc]


def test_the_prelanding_baseline_cache_still_reads() -> None:
    """The real colour_stats cache of the study was written before the baselines landed:
    its attributes still give its own file name (so read_cache accepts it), though today's
    code names a colour_stats cache differently (fe53e49c7ec9, see GOLDEN)."""
    from pathlib import Path

    attrs = {"backbone": "colour_stats", "weights_label": "none", "weights_sha256": "",
             "precision": "fp32", "preprocessing": json.dumps(PRELANDING_COLOUR_STATS)}
    key = check_consistent(Path("colour_stats-stats-none-fp32-422ece0ea486.h5"), attrs)
    assert key.preprocessing.kind == "handcrafted"
    assert key.preprocessing.base().to_json() == PRELANDING_COLOUR_STATS


def test_bad_records_are_refused() -> None:
    with pytest.raises(PreprocessingError, match="newer featsvm"):
        Preprocessing.from_json({**OLD_INCEPTION, "sharpen": 2})
    with pytest.raises(PreprocessingError, match="lacks 'layer'"):
        Preprocessing.from_json({k: v for k, v in OLD_INCEPTION.items() if k != "layer"})
    with pytest.raises(PreprocessingError, match="interpolation"):
        Preprocessing.from_json({**OLD_INCEPTION, "interpolation": "lanczos9"})
    with pytest.raises(PreprocessingError, match="not a JSON object"):
        Preprocessing.from_json(["backbone"])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="hand-crafted baseline"):
        preprocessing_for(get_spec("annotation_box"), NO_WEIGHTS, None,
                          ImageOptions(view="cells"))
    with pytest.raises(UsageError, match="hand-crafted baseline"):
        preprocessing_for(get_spec("colour_stats"), NO_WEIGHTS, None, ImageOptions(colour="grey"))


def test_image_options_keep_their_json_and_base_drops_them() -> None:
    pre = Preprocessing.from_json(OLD_CELLS_REINHARD)
    assert pre.options == ImageOptions(view="cells", stain="reinhard", stain_reference=REF,
                                       detector=1, max_cells=3)
    assert pre.options == ImageOptions.from_preprocessing(OLD_CELLS_REINHARD)
    base = pre.base()
    assert "view" not in base.to_json() and base.options == ImageOptions()
    assert base.with_options(pre.options) == pre
    masked = Preprocessing.from_json(OLD_COLOUR_STATS).with_options(
        ImageOptions(mask_annotation=True))
    assert masked.to_json() == {"mask_annotation": True, **OLD_COLOUR_STATS}
    assert masked.same_as(Preprocessing.from_json(masked.to_json()))


def test_feature_key_identity_ignores_the_label() -> None:
    pre = Preprocessing.from_json(OLD_INCEPTION)
    a = FeatureKey("inception_v3", WeightsId("a label", NSFW_INCEPTION), "fp32", pre)
    b = FeatureKey("inception_v3", WeightsId("renamed in weights.toml", NSFW_INCEPTION), "fp32",
                   pre)
    assert a == b and hash(a) == hash(b)
    assert a != FeatureKey("inception_v3", WeightsId("a label", NSFW_INCEPTION), "bf16", pre)
    assert a != FeatureKey("inception_v3", WeightsId("random", None), "fp32", pre)


def test_feature_key_from_a_head_run_record() -> None:
    config = {"kind": "head", "backbone": "inception_v3",
              "weights": {"label": "x", "sha256": NSFW_INCEPTION, "source": "/w/x.pth"},
              "preprocessing": OLD_INCEPTION, "cache": {"precision": "fp32"}}
    key = FeatureKey.from_record(config)
    assert key.file_name == "inception_v3-mixed_6c-9705e770-fp32-1168e511c376.h5"
    assert key.weights.to_json() == {"label": "x", "sha256": NSFW_INCEPTION}


def test_weights_id_json() -> None:
    assert WeightsId.none().to_json() == {"label": "none", "sha256": None}
    assert WeightsId.from_json({"label": "random", "sha256": None}).is_random
    assert WeightsId.from_info(WeightsInfo("l", "ab" * 32, "s")) == WeightsId("l", "ab" * 32)


def test_transform_and_hooks() -> None:
    from PIL import Image

    pre = Preprocessing.from_json(OLD_BASIC_CNN)
    image = Image.new("RGB", (200, 150), (124, 116, 104))
    assert tuple(pre.transform()(image).shape) == (3, 128, 128)
    assert tuple(pre.image_transform()(image).shape) == (1, 3, 128, 128)
    stats = Preprocessing.from_json(OLD_COLOUR_STATS)
    assert tuple(stats.transform()(image).shape) == (27, 1, 1)
    with pytest.raises(PreprocessingError, match="unknown model hook"):
        dataclasses.replace(pre, hooks=("nope",)).apply_hooks(object())
