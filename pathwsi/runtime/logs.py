"""Logging for workflow jobs: everything to the job's log file, warnings and errors also to stderr (the run's
log), except warnings that hold for the whole run (untrained weights, no GPU), which the run's start says once;
progress a person waits for (a fine-tuning epoch) goes to stderr too; a job that fails leaves its error and
traceback in its own log (`logs/{rule}/{slide}.log`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RUN_WIDE = {"run_wide": True}  # `extra=` of a warning that every job of the run would repeat
TERMINAL = {"terminal": True}  # `extra=` of an INFO record that stderr (the terminal of the run) shows too


class _OnlyThisJobs(logging.Filter):
    """A job's stderr: warnings and errors but the run-wide ones (and Python's own warnings, which say the
    same), and the records marked TERMINAL."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "terminal", False):
            return True
        return (
            record.levelno >= logging.WARNING
            and not getattr(record, "run_wide", False)
            and record.name != "py.warnings"
        )


def log_to_file(path: str | Path) -> logging.Handler:
    """Send INFO and above (Python's warnings too) to `path`, WARNING and above but the run-wide ones, and the
    TERMINAL records, to stderr too; returns the file's handler."""
    to_file = logging.FileHandler(path, mode="w")
    to_file.setFormatter(logging.Formatter(FORMAT))
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(logging.Formatter(FORMAT))
    to_stderr.addFilter(_OnlyThisJobs())
    logging.basicConfig(level=logging.INFO, handlers=[to_file, to_stderr], force=True)
    logging.captureWarnings(True)
    return to_file


@contextmanager
def job_log(path: str | Path) -> Iterator[None]:
    """`log_to_file(path)` for the body of a job; the exception that ends it goes into the log file too,
    with its traceback (stderr shows it once, as Python prints it), and is raised on."""
    to_file = log_to_file(path)
    try:
        yield
    except BaseException as err:
        if not (isinstance(err, SystemExit) and not err.code):
            to_file.handle(
                logging.LogRecord(
                    "pathwsi.job",
                    logging.ERROR,
                    __file__,
                    0,
                    "the job failed: %s: %s",
                    (type(err).__name__, err),
                    sys.exc_info(),
                )
            )
        raise
