"""Resolve and safely load backbone weights: the library's own ImageNet download, a local
state_dict file, an offline weights directory (``weights.toml``), or explicit random init.

Order of resolution for ``weights`` / ``weights_dir``:

1. ``weights="none"`` -> random initialisation (seeded, labelled ``random`` downstream);
2. ``weights=PATH`` -> that local state_dict (``torch.load(weights_only=True)``);
3. ``weights_dir`` (or the ``FEATSVM_WEIGHTS_DIR`` environment variable) -> the file that the
   folder's ``weights.toml`` names for the backbone, after checking its sha256;
4. otherwise (or ``weights="default"``) the torchvision/timm ImageNet file, downloaded once into
   the torch hub cache. Offline this is a clear error naming options 1-3, never a silent
   fallback to random weights.

Every loaded file is checked against the model: mismatched shapes and files that fill no
layer are refused; missing and unexpected keys are listed in `WeightsInfo`.
"""

from __future__ import annotations

import os
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from featsvm.errors import WeightsError
from featsvm.features.key import RANDOM_LABEL, RANDOM_SEED
from featsvm.fileio import sha256_file


class KnownWeights(Protocol):
    label: str


class BackboneSpec(Protocol):
    """What weight resolution needs of a `features.backbones.BackboneSpec` (kept as a
    protocol so this module does not import the backbone table, which imports it)."""

    name: str
    default_url: str
    default_weights: str
    ignore_key_prefixes: tuple[str, ...]

    build: Callable[[], torch.nn.Module]

    def known_file(self, sha256: str) -> KnownWeights | None: ...

ENV_WEIGHTS_DIR = "FEATSVM_WEIGHTS_DIR"
INDEX_FILE = "weights.toml"

OPTIONS_HINT = (
    "use --weights PATH (a local state_dict .pth file), --weights-dir DIR or the environment "
    f"variable {ENV_WEIGHTS_DIR}=DIR (a folder with a {INDEX_FILE} index), or --weights none "
    "(random initialisation, labelled 'random')"
)


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from, before anything is loaded."""

    kind: str  # "none" | "file" | "default"
    label: str
    source: str  # path, URL or a description
    path: Path | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class WeightsInfo:
    """What was loaded: goes into every artefact (cache attrs, run records)."""

    label: str
    sha256: str | None
    source: str
    missing_keys: tuple[str, ...] = field(default=())
    unexpected_keys: tuple[str, ...] = field(default=())

    @property
    def is_random(self) -> bool:
        return self.label == RANDOM_LABEL

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "sha256": self.sha256,
            "source": self.source,
            "missing_keys": list(self.missing_keys),
            "unexpected_keys": list(self.unexpected_keys),
        }


# ------------------------------------------------------------------------------ resolution


def weights_dir_from_env(weights_dir: str | os.PathLike[str] | None) -> Path | None:
    if weights_dir:
        return Path(weights_dir)
    env = os.environ.get(ENV_WEIGHTS_DIR)
    return Path(env) if env else None


def read_index(weights_dir: Path) -> dict[str, dict[str, Any]]:
    index = weights_dir / INDEX_FILE
    if not index.is_file():
        raise WeightsError(f"weights folder {weights_dir} has no {INDEX_FILE}; {OPTIONS_HINT}")
    try:
        with open(index, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise WeightsError(f"{index}: invalid TOML: {exc}") from exc
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def _from_index(backbone: str, weights_dir: Path) -> WeightsSource:
    index = read_index(weights_dir)
    entry = index.get(backbone)
    if entry is None:
        raise WeightsError(
            f"{weights_dir / INDEX_FILE} has no entry for {backbone!r} (entries: "
            f"{', '.join(sorted(index)) or 'none'}); {OPTIONS_HINT}, or drop --weights-dir / "
            f"{ENV_WEIGHTS_DIR} to use the library's ImageNet download"
        )
    if "file" not in entry or "sha256" not in entry:
        raise WeightsError(f"{weights_dir / INDEX_FILE} [{backbone}] needs 'file' and 'sha256'")
    path = weights_dir / entry["file"]
    if not path.is_file():
        raise WeightsError(
            f"{weights_dir / INDEX_FILE} [{backbone}] names {path}, which is missing"
        )
    actual = sha256_file(path)
    expected = str(entry["sha256"]).lower()
    if actual != expected:
        raise WeightsError(
            f"{path} does not match the sha256 in {weights_dir / INDEX_FILE} (expected "
            f"{expected[:16]}…, got {actual[:16]}…): the file is corrupt or was replaced; "
            "refusing to use it"
        )
    label = str(entry.get("label") or path.name)
    return WeightsSource("file", label, str(path), path, actual)


def _fetch_url(url: str) -> Path:
    """Download `url` into the torch hub checkpoint cache (once) and return the local path.

    Kept as a separate function so tests can simulate an offline machine."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    path = hub / os.path.basename(url)
    if not path.is_file():
        hub.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=True)
    return path


def _default(spec: BackboneSpec) -> WeightsSource:
    try:
        path = _fetch_url(spec.default_url)
    except Exception as exc:  # noqa: BLE001 - any network/IO failure gets the same clear advice
        raise WeightsError(
            f"cannot get the default ImageNet weights for {spec.name} ({spec.default_weights}) "
            f"from {spec.default_url}: {type(exc).__name__}: {exc}. This machine may be offline: "
            f"{OPTIONS_HINT}"
        ) from exc
    return WeightsSource("file", f"imagenet:{spec.default_weights}", spec.default_url, path,
                         sha256_file(path))


def resolve_source(
    spec: BackboneSpec,
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
) -> WeightsSource:
    """Decide where the weights come from (see the module doc for the order)."""
    if weights is not None and str(weights).strip().lower() == "none":
        return WeightsSource(
            "none", RANDOM_LABEL, f"random initialisation (torch.manual_seed({RANDOM_SEED}))"
        )
    if weights is not None and str(weights).strip().lower() == "default":
        return _default(spec)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file {path} not found; {OPTIONS_HINT}")
        known = spec.known_file(sha := sha256_file(path))
        label = known.label if known else f"file:{path.name}"
        return WeightsSource("file", label, str(path), path, sha)
    folder = weights_dir_from_env(weights_dir)
    if folder is not None:
        return _from_index(spec.name, folder)
    return _default(spec)


# ------------------------------------------------------------------------------ loading


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a plain tensor state_dict safely (no pickled code), memory-mapped when possible."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - retry without mmap (old zip format), then explain
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(
                f"cannot load {path} as a state_dict with torch.load(weights_only=True): {exc}"
            ) from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state_dict (a dict of tensors)")
    return obj


def check_state_dict(
    spec: BackboneSpec,
    model_shapes: dict[str, torch.Size],
    state: dict[str, torch.Tensor],
    where: str,
) -> tuple[dict[str, torch.Tensor], tuple[str, ...], tuple[str, ...]]:
    """Validate `state` against the model's parameter/buffer shapes.

    Returns (state to load, missing keys, unexpected keys). Raises WeightsError when a shape
    differs or when no key of the file fills a layer of the model."""
    state = {k: v for k, v in state.items() if not k.startswith(spec.ignore_key_prefixes)}
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(model_shapes[k])}"
        for k, v in state.items()
        if k in model_shapes and tuple(v.shape) != tuple(model_shapes[k])
    ]
    if mismatched:
        raise WeightsError(
            f"{where} does not fit {spec.name}: {len(mismatched)} tensor(s) have other shapes "
            f"({'; '.join(mismatched[:5])}{' …' if len(mismatched) > 5 else ''}); is it the "
            "weights of another architecture?"
        )
    filled = [k for k in state if k in model_shapes]
    if not filled:
        raise WeightsError(
            f"{where} fills no layer of {spec.name}: none of its {len(state)} keys "
            f"({', '.join(list(state)[:3])} …) is a parameter of the model "
            f"(e.g. {', '.join(list(model_shapes)[:3])} …)"
        )
    missing = tuple(k for k in model_shapes if k not in state)
    unexpected = tuple(k for k in state if k not in model_shapes)
    return state, missing, unexpected


def _meta_shapes(spec: BackboneSpec) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = spec.build()
    return {k: v.shape for k, v in model.state_dict().items()}


def inspect_weights(
    spec: BackboneSpec,
    weights: str | os.PathLike[str] | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    model_shapes: dict[str, torch.Size] | None = None,
) -> tuple[WeightsInfo, dict[str, torch.Tensor] | None]:
    """Resolve, verify and check the weights without building the real model.

    Returns the `WeightsInfo` and the state_dict to load (None for random init). Cheap: the
    model's shapes come from a build on the ``meta`` device and the file is memory-mapped."""
    src = resolve_source(spec, weights, weights_dir)
    if src.kind == "none":
        return WeightsInfo(RANDOM_LABEL, None, src.source), None
    assert src.path is not None
    state = read_state_dict(src.path)
    shapes = model_shapes if model_shapes is not None else _meta_shapes(spec)
    state, missing, unexpected = check_state_dict(spec, shapes, state, str(src.path))
    known = spec.known_file(src.sha256 or "")
    if known is not None and (
        set(missing) != set(known.expected_missing)
        or set(unexpected) != set(known.expected_unexpected)
    ):
        warnings.warn(
            f"{src.path}: missing/unexpected keys differ from those recorded for this file "
            f"(missing {list(missing)[:6]}, unexpected {list(unexpected)[:6]})",
            stacklevel=2,
        )
    info = WeightsInfo(src.label, src.sha256, src.source, missing, unexpected)
    return info, state
