"""Snakemake entry point of rule `tile`: one slide -> tile table, metadata, QC picture."""

from pathlib import Path

from pathwsi.config import Sample, validate_config
from pathwsi.logs import log_to_file
from pathwsi.tile_slide import TilingJobSettings, TilingOutputs, tile_slide

log_to_file(snakemake.log[0])
tile_slide(
    Sample(**snakemake.params.sample),
    # qc (picture sizes) says how the pictures look, not what the tiles are: changing it reruns nothing
    TilingJobSettings.from_config({**snakemake.params.settings, "qc": validate_config(snakemake.config)["qc"]}),
    TilingOutputs(*(Path(snakemake.output[key]) for key in ("tiles", "meta", "qc", "stain_qc"))),
)
