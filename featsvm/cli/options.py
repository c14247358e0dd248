"""Options shared by several commands, defined once so their names, types, defaults and help
agree everywhere. Each is a function returning a click decorator; keyword arguments override
the shared attributes for one command (e.g. ``@options.device(default=None)`` where a config
file supplies the default).

Folders handed on to the library as recorded text (``--cache``, ``--weights-dir``) stay
strings, exactly as typed; ``--runs`` and ``--split`` are `Path`s.

Like every command module, this imports only `featsvm.names` at the top, so that
``featsvm --help`` imports neither torch nor scikit-learn (tests/test_cli.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from featsvm.names import (
    BACKENDS,
    COLOURS,
    DEVICES,
    ENGINES,
    FEATURES,
    PRECISION_CHOICES,
    STAINS,
    VIEWS,
)

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
QUIET_KEY = "featsvm.quiet"  # click's ctx.meta: quiet was asked for (group or command)


def _shared(*decls: str, **attrs: Any) -> Callable[..., Decorator]:
    def option(**overrides: Any) -> Decorator:
        return click.option(*decls, **{**attrs, **overrides})

    option.__doc__ = f"The shared {decls[0]} option."
    return option


backbone = _shared(
    "--backbone", required=True, type=click.Choice(FEATURES),
    help="Pretrained CNN (or hand-crafted baseline) whose features to use.")
weights = _shared(
    "--weights", default=None, metavar="PATH|none|default",
    help="Backbone weights: a local state_dict file, 'none' (random init, labelled 'random') "
    "or 'default' (library ImageNet download). Default: --weights-dir if given, else the "
    "library download.")
weights_dir = _shared(
    "--weights-dir", default=None, type=click.Path(file_okay=False),
    envvar="FEATSVM_WEIGHTS_DIR", show_envvar=True,
    help="Offline weights folder with a weights.toml index (sha256-checked).")
device = _shared(
    "--device", default="auto", show_default=True, type=click.Choice(DEVICES),
    help="Where to run the network.")
precision = _shared(
    "--precision", default="fp32", show_default=True, type=click.Choice(PRECISION_CHOICES),
    help="Numerical precision of the network: auto = bf16 where the CPU has native bf16 "
    "(probed once, recorded), else fp32; fp16 is refused on the CPU; int8 (static, calibrated "
    "on train images) needs --engine onnxruntime or openvino.")
# One --engine for every command that runs a backbone; its choices are names.ENGINES (add a
# new engine's name there and its runner to featsvm.features.engines).
engine = _shared(
    "--engine", default="torch", show_default=True, type=click.Choice(ENGINES),
    help="What runs the backbone: torch = this process; ray = a pool of Ray actors (pip "
    "install 'featsvm[ray]'; docs/scale-out.md); onnxruntime / openvino = the exported graph "
    "(pip install 'featsvm[onnx]'; docs/engines.md; part of the cache fingerprint).")
cache = _shared(
    "--cache", "cache_dir", default="cache", show_default=True,
    type=click.Path(file_okay=False),
    help="Folder of the HDF5 feature caches.")
runs = _shared(
    "--runs", "runs_dir", default=Path("runs"), show_default=True,
    type=click.Path(file_okay=False, path_type=Path), help="Folder of run records.")
backend = _shared(
    "--backend", default=None, type=click.Choice(BACKENDS),
    help="Where grid-search candidates and CV folds run: local processes or joblib's Ray "
    "backend (RAY_ADDRESS picks the cluster). Default: [fit] backend of --config, else local.")
cell_resolution = _shared(
    "--cell-resolution", default=0, show_default=True, type=click.IntRange(0), metavar="N",
    help="With --view cells: resolution normalisation, each cell's crop window reduced to at "
    "most N x N native pixels (area averaging) before the resize to the crop size, so that "
    "no cell carries more detail than a Taleqani cell; 0 = off. The study input token "
    "cells+lowres uses the measured Taleqani median (featsvm.features.cells.NATIVE_CELL_PX, "
    "32). Part of the cache fingerprint.")
split = _shared(
    "--split", "split_path", default=Path("split.csv"), show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Split manifest CSV written by `featsvm split`.")


def _set_quiet(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        from featsvm import logs

        ctx.meta[QUIET_KEY] = True
        logs.configure(logs.QUIET)


def quiet() -> Decorator:
    """``--quiet`` after a command name: the same as ``featsvm -q CMD`` (kept so that older
    command lines keep working)."""
    return click.option("--quiet", is_flag=True, expose_value=False, is_eager=True,
                        callback=_set_quiet, hidden=True, help="Same as featsvm -q.")


def progress() -> bool:
    """Whether the running command shows progress bars (not with -q / --quiet)."""
    return not click.get_current_context().meta.get(QUIET_KEY, False)


def image_options(made: str = "", help_by_option: dict[str, str] | None = None) -> Decorator:
    """``--view``, ``--stain``, ``--colour``, ``--mask-annotation`` and ``--cell-resolution``:
    how images become features (part of every cache fingerprint). `made` = "the cache was
    extracted with" for commands that read a cache; `help_by_option` replaces a help text."""
    texts = {
        "view": f"Input view{made} (field | cells).",
        "stain": f"Stain handling{made}.",
        "colour": f"Colour handling{made}.",
        "mask": "Fill the burnt-in scale-annotation box (bottom-right 25 % x 20 %) with the "
                "image's median colour first (part of the cache fingerprint).",
        **(help_by_option or {}),
    }

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for deco in reversed((
            click.option("--view", default="field", show_default=True,
                         type=click.Choice(VIEWS), help=texts["view"]),
            click.option("--stain", default="none", show_default=True,
                         type=click.Choice(STAINS), help=texts["stain"]),
            click.option("--colour", default="rgb", show_default=True,
                         type=click.Choice(COLOURS), help=texts["colour"]),
            click.option("--mask-annotation", is_flag=True, help=texts["mask"]),
            cell_resolution(),
        )):
            f = deco(f)
        return f

    return decorate
