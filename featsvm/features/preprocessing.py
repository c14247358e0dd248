"""`Preprocessing`: everything between an RGB image file and the tensor a network sees.

One frozen value travels between backbones, the feature cache, extract, fit, fine-tuning and
predict. Like torchvision's ``Weights.transforms`` it owns its transforms (`transform()`: the
backbone's resize, centre crop, to tensor, normalise; `image_transform()`: that plus the image
options, view / stain / colour / annotation mask) and the model hooks its weights need
(`apply_hooks`). It is stored as JSON in cache attributes (part of the cache fingerprint,
hence of the cache file name) and in every run record (``config.json`` "preprocessing", and
the end-to-end checkpoint).

JSON compatibility rule: `to_json` gives exactly the dict that caches and run records have
held so far, so every existing cache file name and run record stays valid. A record has one
of three *kinds*, each with its fixed keys (always written):

* ``backbone``: a pretrained CNN (``_BACKBONE_KEYS``);
* ``handcrafted``: a hand-crafted shortcut baseline (``features`` holds its description;
  ``_HANDCRAFTED_KEYS``);
* ``scratch``: a network trained from scratch, basic-cnn (``backbone`` absent,
  ``_SCRATCH_KEYS``);

plus the image options (`featsvm.features.preprocess.ImageOptions`), written only where they
differ from their defaults (`ImageOptions.to_dict`), so a plain ``field / none / rgb`` record
has none. `from_json` refuses unknown keys (a record made by a newer featsvm) and records
lacking a key of their kind.

Adding an option: add a field with its default to `ImageOptions` (omitted from `to_dict` at
its default, and its key to ``OPTION_KEYS``) and apply it in `image_transform`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from featsvm.errors import PreprocessingError, UsageError
from featsvm.features.preprocess import OPTION_KEYS, ImageOptions

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")

# The keys every record of a kind holds (the order in which they have always been written).
_BACKBONE_KEYS = ("backbone", "input_size", "resize", "interpolation", "crop", "mean", "std",
                  "layer", "dim", "hooks", "not_imagenet_from")
_HANDCRAFTED_KEYS = ("backbone", "features", "layer", "dim", "hooks", "not_imagenet_from")
_SCRATCH_KEYS = ("input_size", "resize", "crop", "interpolation", "mean", "std", "architecture")
# Image keys a hand-crafted record may also hold: caches written before the baselines landed
# on main (e.g. colour_stats-stats-none-fp32-422ece0ea486.h5) recorded placeholder values
# (size 0, mean 0, std 1). Read and written back as they are; no current code makes them.
_IMAGE_KEYS = ("input_size", "resize", "interpolation", "crop", "mean", "std")
_KEYS = {"backbone": _BACKBONE_KEYS, "handcrafted": _HANDCRAFTED_KEYS, "scratch": _SCRATCH_KEYS}
# image options the colour_stats baseline takes besides the annotation mask: the cell view
# (the 27 statistics of each cell crop's non-black pixels, averaged over the field's cells)
CELL_VIEW_KEYS = {"view", "cell_size", "max_cells", "detector", "cell_resolution"}


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the input of a network (see the module docstring)."""

    input_size: int | None = None
    resize: int | None = None  # shorter side after resizing
    interpolation: str | None = None  # one of INTERPOLATIONS
    crop: int | None = None  # centre crop side
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    backbone: str | None = None  # None: a network trained from scratch (basic-cnn)
    layer: str | None = None  # embedding layer (backbones and baselines)
    dim: int | None = None  # embedding width (backbones and baselines)
    hooks: tuple[str, ...] = ()  # model hooks the weights file needs (features.hooks.HOOKS)
    not_imagenet_from: str | None = None  # first module whose weights are not ImageNet's
    # hand-crafted baselines: the embedder's description (features.handcrafted.ImageFeatures
    # .record); JSON-able, excluded from hashing, never mutate it
    features: dict[str, Any] | None = field(default=None, hash=False)
    # basic-cnn's layer sizes (JSON-able; excluded from hashing, never mutate it)
    architecture: dict[str, Any] | None = field(default=None, hash=False)
    options: ImageOptions = ImageOptions()  # view, stain, colour, annotation mask

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("input_size", "resize", "crop", "dim"):
            value = getattr(self, name)
            if value is not None:
                put(name, int(value))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                put(name, tuple(float(v) for v in value))
        put("hooks", tuple(str(h) for h in self.hooks))
        self._check()

    @property
    def kind(self) -> str:
        """``backbone``, ``handcrafted`` or ``scratch`` (module doc)."""
        if self.backbone is None:
            return "scratch"
        return "handcrafted" if self.features is not None else "backbone"

    def _check(self) -> None:
        kind = self.kind
        image = kind != "handcrafted" or self.mean is not None
        if kind != "handcrafted" and self.interpolation not in INTERPOLATIONS:
            raise PreprocessingError(
                f"preprocessing interpolation {self.interpolation!r} is not one of "
                f"{', '.join(INTERPOLATIONS)}"
            )
        if image and (self.mean is None or self.std is None or len(self.mean) != len(self.std)
                      or not self.mean):
            raise PreprocessingError(f"preprocessing mean {self.mean} and std {self.std} must "
                                     "have the same, non-zero length")
        if kind != "scratch" and (self.layer is None or self.dim is None):
            raise PreprocessingError(f"preprocessing for backbone {self.backbone} needs its "
                                     "embedding layer and dim")
        if kind == "handcrafted":
            cells = self.backbone == "colour_stats"  # the statistics of the cell pixels
            allowed = {"mask_annotation"} | (CELL_VIEW_KEYS if cells else set())
            other = sorted(set(self.options.to_dict()) - allowed)
            if other:
                raise UsageError(
                    f"{self.backbone} is a hand-crafted baseline: it takes no "
                    f"{', '.join(other)} option (only --mask-annotation"
                    + (", and --view cells: the statistics of the cell pixels)" if cells
                       else ")"))

    # ---------------------------------------------------------------- JSON

    def to_json(self) -> dict[str, Any]:
        """The JSON-able dict stored in caches and run records (module doc: exactly what they
        have always held)."""
        keys: tuple[str, ...] = _KEYS[self.kind]
        if self.kind == "handcrafted" and self.mean is not None:
            keys = (*keys, *_IMAGE_KEYS)
        return self.options.to_dict() | {k: _json_value(getattr(self, k)) for k in keys}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Read a dict written by `to_json` (or by any earlier featsvm version)."""
        if isinstance(data, Preprocessing):
            return data
        if not isinstance(data, Mapping):
            raise PreprocessingError(f"preprocessing record is not a JSON object: {data!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"options"}
        unknown = sorted(set(data) - names - set(OPTION_KEYS))
        if unknown:
            raise PreprocessingError(
                f"preprocessing record has unknown key(s) {unknown}: it was written by a newer "
                "featsvm; use that version, or re-create the cache / run with this one"
            )
        if data.get("backbone") is None:
            kind = "scratch"
        else:
            kind = "handcrafted" if data.get("features") is not None else "backbone"
        missing = [k for k in _KEYS[kind] if k not in data]
        if missing:
            raise PreprocessingError(
                f"preprocessing record lacks {', '.join(map(repr, missing))}: {dict(data)}; it "
                "is damaged or not a featsvm record"
            )
        values = {k: copy.deepcopy(v) for k, v in data.items() if k in names}
        try:
            return cls(**values, options=ImageOptions.from_preprocessing(dict(data)))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, PreprocessingError):
                raise
            raise PreprocessingError(f"bad preprocessing record {dict(data)}: {exc}") from exc

    def with_options(self, options: ImageOptions | None) -> Preprocessing:
        """A copy with these image options (None: the defaults)."""
        return dataclasses.replace(self, options=options or ImageOptions())

    def base(self) -> Preprocessing:
        """This preprocessing without image options (what a backbone spec and its weights
        give on their own)."""
        return self.with_options(None)

    def same_as(self, other: Preprocessing) -> bool:
        """Equal as records (what a cache or run compares): the JSON dicts match."""
        return _canonical(self.to_json()) == _canonical(other.to_json())

    # ---------------------------------------------------------------- what it does

    def transform(self) -> Callable[[Any], Any]:
        """PIL RGB image -> normalised float tensor [C, crop, crop]: the backbone's own
        transform (for a hand-crafted baseline: its feature vector as [dim, 1, 1]). The image
        options are applied on top by `image_transform`."""
        from torchvision import transforms as T

        if self.kind == "handcrafted":
            from featsvm.features.handcrafted import FeatureTensor

            return T.Compose([FeatureTensor(str(self.backbone))])
        modes = {"bilinear": T.InterpolationMode.BILINEAR,
                 "bicubic": T.InterpolationMode.BICUBIC,
                 "nearest": T.InterpolationMode.NEAREST}
        return T.Compose([
            T.Resize(int(self.resize or 0), interpolation=modes[str(self.interpolation)],
                     antialias=True),
            T.CenterCrop(int(self.crop or 0)),
            T.ToTensor(),
            T.Normalize(list(self.mean or ()), list(self.std or ())),
        ])

    def image_transform(self) -> Callable[[Any], Any]:
        """PIL RGB image -> float tensor [k, C, H, W] (k = 1 for the field view, the number of
        cells for the cells view) with the image options applied (see
        `featsvm.features.preprocess`)."""
        from torchvision import transforms as T

        from featsvm.features.preprocess import image_transform

        crop_tf = None
        if self.kind != "handcrafted":
            crop_tf = T.Compose([T.ToTensor(), T.Normalize(list(self.mean or ()),
                                                           list(self.std or ()))])
        elif self.options.view == "cells":  # colour_stats of each crop's cell pixels
            from featsvm.features.handcrafted import FeatureTensor

            crop_tf = T.Compose([FeatureTensor(str(self.backbone), foreground=True)])
        return image_transform(self.options, self.transform(), crop_tf)

    def apply_hooks(self, model: Any, skip: tuple[str, ...] = ()) -> Any:
        """Apply the model hooks this preprocessing names (except those in `skip`, already
        applied) to `model`, in place; returns it."""
        from featsvm.features.hooks import HOOKS

        for name in self.hooks:
            if name in skip:
                continue
            if name not in HOOKS:
                raise PreprocessingError(f"unknown model hook {name!r}; this featsvm knows "
                                         f"{', '.join(HOOKS)}")
            HOOKS[name](model)
        return model


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return copy.deepcopy(value)
    return value


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True)
