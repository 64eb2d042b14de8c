"""Logging for workflow jobs: everything to the job's log file, warnings and errors also to stderr."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_file(path: str) -> None:
    """Send INFO and above to `path`, WARNING and above to stderr too."""
    to_file = logging.FileHandler(path, mode="w")
    to_file.setFormatter(logging.Formatter(FORMAT))
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    to_stderr.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[to_file, to_stderr], force=True)
