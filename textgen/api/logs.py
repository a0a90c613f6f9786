"""textgen's log lines on `bentoml serve`'s console.

BentoML configures handlers for its own loggers only; without this, textgen's INFO lines (which model,
from where, which dtype and why, threads, context) would be dropped, in a terminal and in `docker logs`.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s textgen %(levelname)s %(message)s"


def show_textgen_logs(level: int = logging.INFO) -> None:
    """Send the `textgen` loggers' records of `level` and up to stderr, once per process."""
    logger = logging.getLogger("textgen")
    if any(getattr(h, "textgen_console", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S%z"))
    handler.textgen_console = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(min(level, logger.level or level))
    # Records still reach the root logger (pytest's caplog, an embedding app); but not a second console.
    logger.propagate = not any(isinstance(h, logging.StreamHandler) for h in logging.getLogger().handlers)
