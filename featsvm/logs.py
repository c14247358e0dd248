"""One output path for the library: the standard `logging` module (a logger per module,
``logging.getLogger(__name__)``) and tqdm progress bars switched by a ``progress: bool``.

The command line calls `configure` once (``featsvm -q`` / ``-v``); a program that uses featsvm
as a library configures logging as it likes (nothing is printed below WARNING until it does).
Messages go to stderr through ``tqdm.write`` so that they do not tear a progress bar.
"""

from __future__ import annotations

import logging
import sys

ROOT = "featsvm"

QUIET, NORMAL, VERBOSE = -1, 0, 1  # verbosity: warnings only / info / debug


class _TqdmStderrHandler(logging.Handler):
    """Writes each record with ``tqdm.write`` to the current ``sys.stderr`` (looked up at emit
    time, so a redirected stderr, e.g. click's test runner, receives it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    """Plain text for info; ``warning:`` / ``error:`` / ``debug <module>:`` prefixes else."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno == logging.INFO:
            return text
        if record.levelno == logging.DEBUG:
            return f"debug {record.name}: {text}"
        return f"{record.levelname.lower()}: {text}"


def configure(verbosity: int = NORMAL) -> None:
    """Send featsvm's messages to stderr: QUIET = warnings and errors only, NORMAL = progress
    messages too, VERBOSE = debug detail. Calling it again replaces the previous setting."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if isinstance(h, _TqdmStderrHandler):
            logger.removeHandler(h)
    handler = _TqdmStderrHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if verbosity <= QUIET
                    else logging.INFO if verbosity == NORMAL else logging.DEBUG)
