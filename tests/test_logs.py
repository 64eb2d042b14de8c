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
