"""Snakemake entry point of rule `summary`: results/summary.tsv, summary_cohorts.tsv, summary.md, summary.html."""

from pathlib import Path

from pathwsi.runtime.logs import job_log
from pathwsi.summary import write_summary

with job_log(snakemake.log[0]):
    write_summary(
        snakemake.params.samples,
        Path(snakemake.output.slides).parent,
        Path(snakemake.output.slides),
        Path(snakemake.output.cohorts),
        Path(snakemake.output.markdown),
    )
