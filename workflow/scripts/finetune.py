"""Snakemake entry point of rule `finetune`: labelled tiles -> FTX weights, head, metrics, summary."""

from pathlib import Path

import torch

from pathwsi.finetune.train import run_finetune
from pathwsi.runtime.gpu_claim import GpuSettings
from pathwsi.runtime.logs import job_log

with job_log(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    run_finetune(
        snakemake.params.config,
        out_path=Path(snakemake.output.weights),
        workdir=Path(snakemake.output.metrics).parent,
        gpus=GpuSettings.from_config(snakemake.config),  # not in params: how to claim a GPU changes no result
    )
