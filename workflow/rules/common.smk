"""Config and sample-sheet validation, and the input functions shared by the workflow."""

from dataclasses import asdict
from pathlib import Path

from snakemake.exceptions import WorkflowError

import pathwsi.config as pathwsi_config
from pathwsi.stain import StainSettings, load_target

SCHEMAS = Path(workflow.basedir) / "workflow" / "schemas"
try:
    CONFIG = pathwsi_config.validate_config(config, pathwsi_config.load_schema("config", SCHEMAS))
    SAMPLES = {
        sample.slide_id: sample
        for sample in pathwsi_config.load_samples(CONFIG["samples"], schema=pathwsi_config.load_schema("samples", SCHEMAS))
    }
    load_target(StainSettings.from_config(CONFIG["stain"]))
except pathwsi_config.ConfigError as err:
    raise WorkflowError(f"pathwsi: the run cannot start.\n{err}") from None
except ValueError as err:
    raise WorkflowError(f"pathwsi: the run cannot start.\n  - key 'stain.target': {err}") from None


def slide_path(wildcards):
    """The slide file of one sample-sheet row."""
    return SAMPLES[wildcards.slide_id].path


def sample_record(wildcards):
    """The sample-sheet row as a plain dict; as params, editing the row reruns that slide."""
    return asdict(SAMPLES[wildcards.slide_id])


def tiling_settings():
    """The config sections that shape a slide's tiles (changing one reruns the tiling)."""
    return {key: CONFIG[key] for key in ("seed", "tiling", "tissue", "stain", "qc")}


def stain_target_file(wildcards):
    """The stain target image or .json, when the config names one (editing it reruns the tiling)."""
    target = CONFIG["stain"]["target"]
    return [] if target == "default" else [target]


def tiling_outputs():
    """Every slide's tile table, tile metadata and QC picture."""
    return expand(
        [
            "results/tiles/{slide_id}.parquet",
            "results/tiles/{slide_id}.json",
            "results/qc/{slide_id}.png",
            "results/qc/stain/{slide_id}.png",
        ],
        slide_id=sorted(SAMPLES),
    )
