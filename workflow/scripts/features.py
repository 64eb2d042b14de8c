"""Snakemake entry point of rule `features`: one slide's tiles -> Zarr feature store (pathwsi.features.feature_job)."""

import sys
from pathlib import Path

from pathwsi.config import validate_config
from pathwsi.features.feature_request import FeatureRequest
from pathwsi.runtime.forkserver import call
from pathwsi.samples import Sample

config = validate_config(snakemake.config)
request = FeatureRequest(
    sample=Sample(**snakemake.params.sample),
    **{key: Path(snakemake.input[key]) for key in ("tiles", "meta")},
    **{key: Path(snakemake.output[key]) for key in ("store", "timings")},
    config={
        "models": {"allow_network": config["models"]["allow_network"], "backbones": snakemake.params.backbones},
        # dtype and reader change results (params); the other keys say how, not what: changing them reruns nothing
        "features": {**config["features"], "dtype": snakemake.params.dtype, "reader": snakemake.params.reader},
        "gpus": config["gpus"],  # how the job claims its GPU (pathwsi.runtime.gpu_claim)
    },
    threads=snakemake.threads,
    log=Path(snakemake.log[0]),
)
sys.exit(call(request, use_server=config["fork_server"]))
