"""Identity of weights and of a set of embeddings.

* `WeightsId` — which weights a model started from: a human label and the file's sha256
  (None for the seeded random init and for networks trained from scratch). Serialises to the
  ``{"label", "sha256"}`` object that run records and fine-tuning fingerprints hold.
* `FeatureKey` — everything that changes an embedding: backbone, weights, precision and the
  `Preprocessing` (which holds the embedding layer). Its `fingerprint` and `file_name` name
  the cache file; cache, extract, fit, the study and predict all build or read one of these
  instead of assembling dicts. Two keys are equal when they give the same embeddings: the
  weights *label* is description only and is left out of the comparison (the sha256 counts).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from featsvm.errors import RunRecordError
from featsvm.features.preprocessing import Preprocessing

# (this module imports no torch: the study and the CLI use it before any model is needed)
RANDOM_LABEL = "random"  # label of the seeded random initialisation (features.weights)
RANDOM_SEED = 0
CACHE_FORMAT_VERSION = 1  # part of every cache fingerprint
NO_WEIGHTS_LABEL = "none"  # no weights at all: hand-crafted features, basic-cnn


class LoadedWeights(Protocol):
    """What `WeightsId.from_info` reads (a `features.weights.WeightsInfo`)."""

    @property
    def label(self) -> str: ...
    @property
    def sha256(self) -> str | None: ...


@dataclass(frozen=True)
class WeightsId:
    label: str
    sha256: str | None  # None: seeded random init (label "random") or none at all

    @classmethod
    def from_info(cls, info: LoadedWeights) -> WeightsId:
        return cls(info.label, info.sha256 or None)

    @classmethod
    def none(cls) -> WeightsId:
        """No pretrained weights at all (a network trained from scratch)."""
        return cls(NO_WEIGHTS_LABEL, None)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> WeightsId:
        data = data or {}
        return cls(str(data.get("label") or ""), data.get("sha256") or None)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "sha256": self.sha256}

    @property
    def is_random(self) -> bool:
        return self.label == RANDOM_LABEL or self.sha256 is None

    @property
    def cache_key(self) -> str:
        """What the cache fingerprint hashes: the sha256, or the random-init seed."""
        return self.sha256 or f"{RANDOM_LABEL}-seed{RANDOM_SEED}"

    @property
    def tag(self) -> str:
        """Short form for file names: 8 hex digits of the sha256, or ``random``."""
        return self.sha256[:8] if self.sha256 else RANDOM_LABEL


@dataclass(frozen=True)
class FeatureKey:
    backbone: str
    weights: WeightsId = field(compare=False)
    precision: str
    preprocessing: Preprocessing
    # what the comparison uses instead of the label-carrying WeightsId
    weights_key: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights_key", self.weights.cache_key)

    @property
    def layer(self) -> str:
        return str(self.preprocessing.layer)

    @property
    def dim(self) -> int:
        return int(self.preprocessing.dim or 0)

    @property
    def fingerprint(self) -> str:
        payload = {
            "format": CACHE_FORMAT_VERSION,
            "backbone": self.backbone,
            "weights": self.weights.cache_key,
            "preprocessing": self.preprocessing.to_json(),
            "precision": self.precision,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def file_name(self) -> str:
        """``<backbone>-<layer>-<weights8>-<precision>-<fingerprint12>.h5``"""
        # hand-crafted features (features.handcrafted) have no weights at all: "none"
        tag = (NO_WEIGHTS_LABEL if self.preprocessing.kind == "handcrafted"
               and not self.weights.sha256 else self.weights.tag)
        return f"{self.backbone}-{self.layer}-{tag}-{self.precision}-{self.fingerprint[:12]}.h5"

    def describe(self) -> str:
        return f"{self.backbone} ({self.weights.label}, layer {self.layer}, {self.precision})"

    # ---------------------------------------------------------------- cache attributes

    def cache_attrs(self) -> dict[str, Any]:
        """The identity attributes of a cache file (JSON-able; the preprocessing as a dict)."""
        return {
            "backbone": self.backbone,
            "layer": self.layer,
            "dim": self.dim,
            "weights_label": self.weights.label,
            "weights_sha256": self.weights.sha256 or "",
            "preprocessing": self.preprocessing.to_json(),
            "precision": self.precision,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_cache_attrs(cls, attrs: Mapping[str, Any]) -> FeatureKey:
        """The key a cache file's attributes describe (KeyError if one is absent)."""
        pre = attrs["preprocessing"]
        if isinstance(pre, str):
            pre = json.loads(pre)
        return cls(
            str(attrs["backbone"]),
            WeightsId(str(attrs.get("weights_label") or ""), attrs.get("weights_sha256") or None),
            str(attrs["precision"]),
            Preprocessing.from_json(pre),
        )

    # ---------------------------------------------------------------- run records

    @classmethod
    def from_record(cls, config: Mapping[str, Any], where: str | os.PathLike[str] = "") -> (
            FeatureKey):
        """The key of the embeddings a head run was fitted on (its ``config.json``)."""
        try:
            return cls(
                str(config["backbone"]),
                WeightsId.from_json(config.get("weights")),
                str((config.get("cache") or {}).get("precision") or "fp32"),
                Preprocessing.from_json(config["preprocessing"]),
            )
        except KeyError as exc:
            raise RunRecordError(f"{where or 'run'}/config.json lacks {exc}; it is not a "
                                 "head run record") from None
