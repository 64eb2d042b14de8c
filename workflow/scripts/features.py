"""Snakemake entry point of rule `features`: one slide's tiles -> Zarr feature store."""

from pathlib import Path

from pathwsi.config import Sample
from pathwsi.extract import ExtractSettings
from pathwsi.feature_job import run_feature_job
from pathwsi.logs import log_to_file

log_to_file(snakemake.log[0])
run_feature_job(
    Sample(**snakemake.params.sample),
    Path(snakemake.input.tiles),
    Path(snakemake.input.meta),
    Path(snakemake.output.store),
    Path(snakemake.output.timings),
    snakemake.params.models,
    ExtractSettings(**snakemake.params.settings),
    threads=snakemake.threads,
)
