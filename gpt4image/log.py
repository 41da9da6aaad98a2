"""The package's logger: INFO on the main rank, warnings elsewhere."""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("gpt4image")


def setup_logging(is_main: bool, log_file: str | None = None) -> logging.Logger:
    """INFO to stdout on the main rank, warnings only elsewhere; optionally also to ``log_file``."""
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    if log_file and is_main:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(fh)
    return logger

