"""The command line stays light: listing commands and their options imports no torch."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

from featsvm.cli import main, options
from featsvm.names import DEVICES, FEATURES, PRECISION_CHOICES


def test_help_imports_neither_torch_nor_sklearn() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from featsvm.cli import main\n"
        "for args in (['--help'], ['extract', '--help'], ['finetune', '--help'],\n"
        "             ['fit', '--help'], ['predict', '--help'], ['run', '--help'],\n"
        "             ['split', '--help'], ['report', '--help'], ['cells', '--help'],\n"
        "             ['cv', '--help'], ['explain', '--help'], ['serve', '--help']):\n"
        "    res = CliRunner().invoke(main, args)\n"
        "    assert res.exit_code == 0, res.output\n"
        "heavy = sorted(m for m in ('torch', 'sklearn') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "HEAVY []" in out, out


@pytest.fixture
def fake_split(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """`featsvm split` with make_split replaced: records the progress flag it was given."""
    from featsvm.data import split as split_mod

    seen: list[bool] = []

    def make_split(*_a, progress: bool = False, **_kw):
        logging.getLogger("featsvm.data.split").info("an info line")
        logging.getLogger("featsvm.data.split").debug("a debug line")
        seen.append(progress)
        return SimpleNamespace()

    monkeypatch.setattr(split_mod, "make_split", make_split)
    monkeypatch.setattr(split_mod, "summary_lines", lambda _res: ["the summary"])
    return seen


@pytest.mark.parametrize(("args", "progress", "level"), [
    ([], True, logging.INFO),
    (["-q"], False, logging.WARNING),
    (["--quiet"], False, logging.WARNING),
    (["-v"], True, logging.DEBUG),
])
def test_group_quiet_and_verbose(fake_split: list[bool], tmp_path: Path, args: list[str],
                                 progress: bool, level: int) -> None:
    res = CliRunner().invoke(main, [*args, "split", str(tmp_path), "--out",
                                    str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    assert fake_split == [progress]
    assert logging.getLogger("featsvm").level == level
    assert "the summary" in res.output  # a command's result is printed even when quiet
    assert ("an info line" in res.output) == (level <= logging.INFO)
    assert ("debug featsvm.data.split: a debug line" in res.output) == (level == logging.DEBUG)


def test_command_quiet_flag_still_works(fake_split: list[bool], tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["split", str(tmp_path), "--out", str(tmp_path / "s.csv"),
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    assert fake_split == [False] and "an info line" not in res.output


def test_quiet_and_verbose_exclude_each_other(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["-q", "-v", "split", str(tmp_path)])
    assert res.exit_code == 2 and "exclude each other" in res.output


SHARED = {"--backbone": FEATURES, "--device": DEVICES, "--precision": PRECISION_CHOICES}


def test_shared_options_are_the_same_everywhere() -> None:
    """--backbone / --device / --precision offer the same choices in every command, and the
    path options have one name and type."""
    ctx = click.Context(main)
    found: dict[str, list[str]] = {}
    for name in main.list_commands(ctx):
        for p in main.get_command(ctx, name).params:
            opt = p.opts[0]
            if opt in SHARED:
                assert isinstance(p.type, click.Choice), (name, opt)
                assert tuple(p.type.choices) == SHARED[opt], (name, opt)
            if opt in ("--weights-dir", "--cache", "--runs"):
                assert p.name == {"--weights-dir": "weights_dir", "--cache": "cache_dir",
                                  "--runs": "runs_dir"}[opt]
                assert isinstance(p.type, click.Path), (name, opt)
            if opt == "--split" and name != "explain":  # explain --split names a split
                assert p.name == "split_path" and isinstance(p.type, click.Path), name
            if opt == "--weights-dir":
                assert p.envvar == "FEATSVM_WEIGHTS_DIR", name
            found.setdefault(opt, []).append(name)
    assert found["--device"] == ["evaluate", "explain", "extract", "finetune", "predict", "serve"]
    assert found["--backbone"] == ["cv", "extract", "fit"]
    assert found["--split"] == ["cv", "explain", "extract", "finetune", "fit"]
    assert "options" not in main.list_commands(ctx)
    assert options.progress.__doc__
