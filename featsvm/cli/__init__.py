"""The `featsvm` command line: thin click commands over the library.

Each command lives in its own module in this package and only parses arguments, calls the
library and prints; all logic is importable from `featsvm.*` without the CLI.
"""

from __future__ import annotations

import click

from featsvm import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="featsvm")
def main() -> None:
    """Pretrained CNN features + SVM / logistic-regression heads for ALL cell images."""


def _register() -> None:
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        command = getattr(module, "command", None)
        if isinstance(command, click.Command):
            main.add_command(command)


_register()
