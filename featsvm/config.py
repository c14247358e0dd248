"""TOML configuration (stdlib tomllib) -> frozen dataclasses with defaults.

Each module owns the dataclass for its own section (e.g. `heads.HeadConfig` for ``[fit]``);
this module only reads files and builds dataclasses strictly: an unknown key is an error
that names the file, the section and the keys allowed, so a typo never goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def build(cls: type[T], values: dict[str, Any] | None, where: str = "") -> T:
    """Instantiate dataclass `cls` from `values`, refusing unknown keys.

    Lists become tuples (frozen dataclasses stay hashable); nested dataclass fields are built
    recursively from sub-tables.
    """
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; allowed: {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        target = _dataclass_type(hints.get(name))
        if target is not None and isinstance(value, dict):
            value = build(target, value, f"{where}.{name}" if where else name)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _dataclass_type(ftype: Any) -> type | None:
    if isinstance(ftype, type) and dataclasses.is_dataclass(ftype):
        return ftype
    return None


def section(cls: type[T], config: dict[str, Any] | None, name: str, source: str = "") -> T:
    """Build `cls` from table `name` of a loaded TOML document (defaults when absent)."""
    table = (config or {}).get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    return build(cls, table, f"{source}[{name}]" if source else f"[{name}]")
