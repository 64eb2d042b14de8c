"""Snakemake entry point of rule `finetune_curves`: metrics.tsv and summary.json -> curves.png."""

from pathlib import Path

from pathwsi.finetune.curves import plot_run_curves
from pathwsi.runtime.logs import job_log

with job_log(snakemake.log[0]):
    plot_run_curves(*(Path(snakemake.input[key]) for key in ("metrics", "summary")), Path(snakemake.output.curves))
