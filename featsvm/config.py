"""TOML configuration (stdlib tomllib) -> frozen dataclasses with defaults.

Each module owns the dataclass for its own section (e.g. `heads.HeadConfig` for ``[fit]``);
this module only reads files and builds dataclasses strictly: an unknown key, or a value of
the wrong type (``epochs = "15"``), is an error that names the file, the section and the key,
so a typo never goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from featsvm.errors import ConfigError

T = TypeVar("T")


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
        key = f"{where}.{name}" if where else name
        target = _dataclass_type(hints.get(name))
        if target is not None and isinstance(value, dict):
            value = build(target, value, key)
        else:
            value = _checked(value, hints.get(name, Any), key)
        kwargs[name] = value
    return cls(**kwargs)


def _checked(value: Any, hint: Any, key: str) -> Any:
    """`value` converted to the field type `hint` (lists -> tuples, int -> float), or a
    ConfigError naming the key, the type wanted and the value found."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is None:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _checked(value, option, key)
            except ConfigError:
                continue
        raise _wrong(key, hint, value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _wrong(key, hint, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_checked(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise _wrong(key, hint, value)
        return tuple(_checked(v, a, f"{key}[{i}]")
                     for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong(key, hint, value)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _checked(v, vt, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if origin is None and isinstance(hint, type) and hint not in (int, float, str, bool):
        return value  # another type (a nested structure checked by its owner)
    raise _wrong(key, hint, value)


def _wrong(key: str, hint: Any, value: Any) -> ConfigError:
    wanted = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
    return ConfigError(f"{key}: expected {wanted or hint}, got {type(value).__name__} "
                       f"{value!r}")


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
