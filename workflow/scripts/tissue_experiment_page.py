"""Snakemake entry point of rule `tissue_experiment_page`: the tissue experiment's tables -> tables.html."""

from pathlib import Path

from pathwsi.finetune.tissue_experiment import write_experiment_page
from pathwsi.runtime.logs import job_log

with job_log(snakemake.log[0]):
    write_experiment_page(Path(snakemake.input.summary).parent)
