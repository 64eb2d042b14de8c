"""Snakemake entry point of rule `predict`: one cohort's patient features + targets -> predictors."""

from pathlib import Path

from pathwsi.predict.predict_job import CohortTargets, TargetSettings, run_predict_job, settings_from_config
from pathwsi.runtime.logs import job_log

with job_log(snakemake.log[0]):
    run_predict_job(
        dict(zip(snakemake.params.models, map(Path, snakemake.input.features))),
        CohortTargets(**snakemake.params.cohort_targets),
        TargetSettings(**snakemake.params.targets),
        settings_from_config(snakemake.params.settings, snakemake.params.seed),
        snakemake.params.sites,
        Path(snakemake.output[0]),
    )
