"""Snakemake entry point of rule `tile`: one slide -> tile table, metadata, QC pictures (pathwsi.slides.tile_job)."""

import sys
from pathlib import Path

from pathwsi.config import validate_config
from pathwsi.runtime.forkserver import call
from pathwsi.samples import Sample
from pathwsi.slides.tile_request import TileRequest, TilingOutputs

config = validate_config(snakemake.config)
request = TileRequest(
    sample=Sample(**snakemake.params.sample),
    # the params hold the sections that shape the tiles, less settings at their earlier defaults (rerun_params); qc
    # (picture sizes) says how the pictures look, not what the tiles are: changing it reruns nothing
    config={key: config[key] for key in ("seed", "tiling", "tissue", "stain", "qc")},
    outputs=TilingOutputs(*(Path(snakemake.output[key]) for key in ("tiles", "meta", "qc", "stain_qc"))),
    log=Path(snakemake.log[0]),
)
sys.exit(call(request, use_server=config["fork_server"]))
