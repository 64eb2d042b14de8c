"""Snakemake entry point of rule `predict`: one cohort's aggregated features + targets -> predictors."""

from pathlib import Path

from pathwsi.predict.aggregate import AggregateOutputs
from pathwsi.predict.evaluate import EvaluationSettings
from pathwsi.predict.predict_job import CohortTargets, TargetSettings, run_predict_job
from pathwsi.predict.tile_models import HeatmapSettings
from pathwsi.runtime.logs import job_log

shaping = {"targets": snakemake.params.targets, "predict": snakemake.params.settings, "seed": snakemake.params.seed}
with job_log(snakemake.log[0]):
    run_predict_job(
        AggregateOutputs(Path(snakemake.input.provenance).parent),
        snakemake.params.models,
        CohortTargets(**snakemake.params.cohort_targets),
        TargetSettings.from_config(shaping),
        EvaluationSettings.from_config(shaping),
        snakemake.params.sites,
        Path(snakemake.output[0]),
        HeatmapSettings.from_config(shaping),
    )
