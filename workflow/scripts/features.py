"""Snakemake entry point of rule `features`: one slide's tiles -> Zarr feature store."""

from pathlib import Path

from pathwsi.config import Sample, validate_config
from pathwsi.extract import ExtractSettings
from pathwsi.feature_job import run_feature_job
from pathwsi.logs import log_to_file

log_to_file(snakemake.log[0])
config = validate_config(snakemake.config)
run_settings = {k: v for k, v in config["features"].items() if k != "threads"}  # how, not what: changing them reruns nothing
models = {"allow_network": config["models"]["allow_network"], "backbones": snakemake.params.backbones}
run_feature_job(
    Sample(**snakemake.params.sample),
    Path(snakemake.input.tiles),
    Path(snakemake.input.meta),
    Path(snakemake.output.store),
    Path(snakemake.output.timings),
    models,
    ExtractSettings(**{**run_settings, "dtype": snakemake.params.dtype, "reader": snakemake.params.reader}),
    threads=snakemake.threads,
)
