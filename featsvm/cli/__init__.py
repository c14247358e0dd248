"""The `featsvm` command line: thin click commands over the library.

Each command lives in its own module in this package and only parses arguments, calls the
library and prints; all logic is importable from `featsvm.*` without the CLI.
"""

from __future__ import annotations

import click

from featsvm import __version__


class _LazyGroup(click.Group):
    """Imports a command's module only when that command runs (or help lists it). Command
    modules import only `featsvm.names` at the top (the library inside the command), so
    `featsvm --help` and `featsvm split` do not pay for importing torch (tests/test_cli.py)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        import pkgutil

        return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "options")

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        import importlib

        if cmd_name not in self.list_commands(ctx):
            return None
        command = getattr(importlib.import_module(f"{__name__}.{cmd_name}"), "command", None)
        return command if isinstance(command, click.Command) else None

    def invoke(self, ctx: click.Context) -> object:
        """The one place where a user-facing error becomes a one-line message and exit 1."""
        from featsvm.errors import FeatsvmError
        from featsvm.fileio import is_no_space, no_space_message

        try:
            return super().invoke(ctx)
        except FeatsvmError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a full disk anywhere is the user's to fix, not a bug
            if not is_no_space(exc):
                raise
            raise click.ClickException(no_space_message(exc.filename)) from None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="featsvm")
@click.option("-q", "--quiet", is_flag=True,
              help="Only warnings and errors (and each command's result); no progress bars.")
@click.option("-v", "--verbose", is_flag=True,
              help="Debug messages too (e.g. the traceback of a failed study step).")
@click.pass_context
def main(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """Pretrained CNN features + SVM / logistic-regression heads for ALL cell images."""
    from featsvm import logs
    from featsvm.cli.options import QUIET_KEY

    if quiet and verbose:
        raise click.UsageError("-q/--quiet and -v/--verbose exclude each other")
    ctx.meta[QUIET_KEY] = quiet
    # the one place logging is configured (a command's own --quiet may lower it later)
    logs.configure(logs.QUIET if quiet else logs.VERBOSE if verbose else logs.NORMAL)
