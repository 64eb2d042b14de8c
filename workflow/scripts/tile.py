"""Snakemake entry point of rule `tile`: one slide -> tile table, metadata, QC pictures (pathwsi.tile_slide)."""

import sys

from pathwsi.config import validate_config
from pathwsi.forkserver import call

config = validate_config(snakemake.config)
job = {
    "log": snakemake.log[0],
    "sample": snakemake.params.sample,
    # qc (picture sizes) says how the pictures look, not what the tiles are: changing it reruns nothing
    "settings": {**snakemake.params.settings, "qc": config["qc"]},
    "outputs": [snakemake.output[key] for key in ("tiles", "meta", "qc", "stain_qc")],
}
sys.exit(call("pathwsi.tile_slide:run_request", job, use_server=config["fork_server"]))
