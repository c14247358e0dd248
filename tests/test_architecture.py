"""The package's shape: import layers without cycles, and one base for user-facing errors."""

from __future__ import annotations

import ast
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from featsvm import errors

REPO = Path(__file__).resolve().parents[1]


def test_import_layers_and_no_cycles() -> None:
    """`lint-imports` checks the contracts in pyproject.toml ([tool.importlinter])."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    out = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


def test_every_exception_class_lives_in_errors_and_derives_from_featsvm_error() -> None:
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, Exception) and cls.__module__ == errors.__name__:
            assert issubclass(cls, errors.FeatsvmError), name
    elsewhere = []
    for path in (REPO / "featsvm").rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception"))
                for b in node.bases
            ):
                elsewhere.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not elsewhere, f"define exception classes in featsvm/errors.py: {elsewhere}"


# Functions longer than MAX_FUNCTION_LINES are split into named steps. Only data tables may be
# longer; each one is listed here with the reason ("path::qualified name": why).
MAX_FUNCTION_LINES = 80
LONG_FUNCTION_ALLOWLIST: dict[str, str] = {
    # (none today: add data tables only, e.g. a long literal dict of settings)
}


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield f"{prefix}{node.name}", node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")


def test_no_function_is_longer_than_80_lines() -> None:
    too_long = []
    for path in sorted((REPO / "featsvm").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for name, node in _functions(ast.parse(path.read_text(encoding="utf-8"))):
            lines = node.end_lineno - node.lineno + 1  # decorators not counted
            if lines > MAX_FUNCTION_LINES and f"{rel}::{name}" not in LONG_FUNCTION_ALLOWLIST:
                too_long.append(f"{rel}:{node.lineno} {name} ({lines} lines)")
    assert not too_long, f"split these into named steps (or list a data table): {too_long}"


def test_library_output_goes_through_logging() -> None:
    """Outside featsvm/cli/, messages go through `logging` (and tqdm bars), never print,
    click.echo or tqdm.write (featsvm/logs.py is the one place that writes them)."""
    found = []
    for path in sorted((REPO / "featsvm").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("featsvm/cli/") or rel == "featsvm/logs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = (f.id if isinstance(f, ast.Name)
                    else f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute)
                    else "")
            if name in ("print", "click.echo", "tqdm.write"):
                found.append(f"{rel}:{node.lineno} {name}")
    assert not found, found
