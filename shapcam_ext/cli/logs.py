"""The command's diagnostics on stderr: ``error:``/``warning:`` lines through ``logging``, warnings included."""
from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

LOGGER = "shapcam_ext"


class _OneLine(logging.Formatter):
    """``error: ...`` / ``warning: ...``; notes (INFO) plain; a traceback only when one is attached (-v)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = prefix + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Stands in for warnings.showwarning: one line per warning, from the library that raised it."""
    text = " ".join(str(message).split())
    logging.getLogger(f"{LOGGER}.warnings").warning("%s (%s)", text, category.__name__)


@contextmanager
def command_logging(level: int) -> Iterator[None]:
    """Route the package's log records and every Python warning to stderr for one command.

    Args:
        level: the least severe level shown (logging.DEBUG with -v, WARNING with -q, else INFO).

    Everything is restored on exit, so calling the command in-process (tests) leaves no trace.
    """
    logger = logging.getLogger(LOGGER)
    handler = logging.StreamHandler(sys.stderr)  # the stderr of this call, which tests may redirect
    handler.setFormatter(_OneLine())
    saved_level, saved_propagate, saved_showwarning = logger.level, logger.propagate, warnings.showwarning
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # a host that configured the root logger would print each line twice
    warnings.showwarning = _log_warning
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate, warnings.showwarning = saved_propagate, saved_showwarning
