"""Where the runtime's "shardsync" log lines go when a shardsync command runs.

The runtime only logs (one line per endpoint at connect: the method and why); a
library user routes that logger as they like. The CLI and the ranks it starts print
it to stderr, so a user sees which method each rank's channels use.
"""

from __future__ import annotations

import logging
import sys


def show() -> None:
    logger = logging.getLogger("shardsync")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("shardsync: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
