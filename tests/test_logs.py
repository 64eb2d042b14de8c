"""A job that fails leaves its error and traceback in its own log file, where users look."""

from __future__ import annotations

import logging

import pytest

from pathwsi.runtime.logs import job_log


def test_the_exception_that_ends_a_job_is_in_its_log(tmp_path, capsys):
    log = tmp_path / "job.log"
    with pytest.raises(ValueError, match="store s.zarr: chunk 3"):
        with job_log(str(log)):
            logging.getLogger("pathwsi.test").info("working on s")
            raise ValueError("store s.zarr: chunk 3 does not decode")
    text = log.read_text()
    assert (
        "working on s" in text
        and "ERROR pathwsi.job: the job failed: ValueError: store s.zarr: chunk 3 does not decode" in text
    )
    assert "Traceback (most recent call last)" in text and 'raise ValueError("store s.zarr' in text
    assert "Traceback" not in capsys.readouterr().err  # the terminal gets it once, from Python, not twice


def test_a_clean_exit_is_not_an_error(tmp_path):
    log = tmp_path / "job.log"
    with pytest.raises(SystemExit):
        with job_log(str(log)):
            raise SystemExit(0)
    assert "failed" not in log.read_text()


def test_run_wide_warnings_stay_in_the_job_log_and_out_of_the_runs(tmp_path, capsys):
    """104 jobs saying 'UNTRAINED' and 'no CUDA' twice each drowned the run's log: the run's start says them once."""
    from pathwsi.runtime.logs import RUN_WIDE

    log = tmp_path / "job.log"
    with job_log(log):
        logging.getLogger("pathwsi.test").warning("model 'x' has UNTRAINED weights", extra=RUN_WIDE)
        logging.getLogger("py.warnings").warning("model 'x' uses UNTRAINED weights")  # Python's, once captured
        logging.getLogger("pathwsi.test").warning("slide s: stain fit not used")
    text, err = log.read_text(), capsys.readouterr().err
    assert "has UNTRAINED weights" in text and "uses UNTRAINED weights" in text and "stain fit not used" in text
    assert "UNTRAINED" not in err and "slide s: stain fit not used" in err
