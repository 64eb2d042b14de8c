"""Snakemake entry point of rule `tissue_experiment`: labelled test tiles -> accuracy tables and figure."""

from pathlib import Path

import torch

from pathwsi.finetune.tissue_experiment import run_tissue_experiment_from_config
from pathwsi.runtime.gpu_claim import GpuSettings
from pathwsi.runtime.logs import job_log

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    run_tissue_experiment_from_config(
        snakemake.params.config,
        out_dir=Path(snakemake.output.accuracy).parent,
        jobs=snakemake.threads,
        gpus=GpuSettings.from_config(snakemake.config),  # not in params: how to claim a GPU changes no result
    )
