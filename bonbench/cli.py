"""What every command shares: its logging set-up, and how it ends on bad input.

A command's ``main(argv)`` configures logging with ``setup_logging(cfg.log_level)`` once its
options are parsed, and its entry point calls ``run_command(main)``. A ``UserError`` then ends
the command with ``error: <sentence>`` on stderr and exit status 2 (as argparse does for a bad
option); with ``--log-level debug`` the exception propagates with its full traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

from bonbench.errors import UserError

LOG_LEVELS = ("debug", "info", "warning", "error")
USAGE_ERROR = 2


def log_level_option():
    """The ``--log-level`` option every command's config declares (``log_level: str = log_level_option()``)."""
    from bonbench.config import option

    return option("info", f"{', '.join(LOG_LEVELS)}; debug also shows the traceback of a bad option")


def setup_logging(level: str) -> None:
    """Root logging for a command, at one of ``LOG_LEVELS``."""
    if level not in LOG_LEVELS:
        raise UserError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}.")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_command(main: Callable[[list[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; a ``UserError`` becomes one line on stderr and exit status 2, unless the
    root logger is at DEBUG, where it is re-raised with its traceback."""
    try:
        main(None if argv is None else list(argv))
    except UserError as exc:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
