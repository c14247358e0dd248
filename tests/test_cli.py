"""The command line stays light: listing commands and their options imports no torch."""

from __future__ import annotations

import subprocess
import sys


def test_help_imports_neither_torch_nor_sklearn() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from featsvm.cli import main\n"
        "for args in (['--help'], ['extract', '--help'], ['finetune', '--help'],\n"
        "             ['fit', '--help']):\n"
        "    res = CliRunner().invoke(main, args)\n"
        "    assert res.exit_code == 0, res.output\n"
        "heavy = sorted(m for m in ('torch', 'sklearn') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "HEAVY []" in out, out
