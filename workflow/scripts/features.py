"""Snakemake entry point of rule `features`: one slide's tiles -> Zarr feature store (pathwsi.feature_job)."""

import sys

from pathwsi.config import validate_config
from pathwsi.forkserver import call

config = validate_config(snakemake.config)
job = {
    "log": snakemake.log[0],
    "sample": snakemake.params.sample,
    **{key: snakemake.input[key] for key in ("tiles", "meta")},
    **{key: snakemake.output[key] for key in ("store", "timings")},
    "models": {"allow_network": config["models"]["allow_network"], "backbones": snakemake.params.backbones},
    # dtype and reader change results (params); the other keys say how, not what: changing them reruns nothing
    "settings": {**{k: v for k, v in config["features"].items() if k != "threads"}, "dtype": snakemake.params.dtype, "reader": snakemake.params.reader},
    "threads": snakemake.threads,
}
sys.exit(call("pathwsi.feature_job:run_request", job, use_server=config["fork_server"]))
