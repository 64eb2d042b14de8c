"""Snakemake entry point of rule `predict`: one cohort's patient features + targets -> predictors."""

import json
from pathlib import Path

from pathwsi.predict.evaluate import EvaluationSettings
from pathwsi.predict.predict_job import CohortTargets, TargetSettings, run_predict_job
from pathwsi.runtime.logs import job_log

shaping = {"targets": snakemake.params.targets, "predict": snakemake.params.settings, "seed": snakemake.params.seed}
with job_log(snakemake.log[0]):
    run_predict_job(
        dict(zip(snakemake.params.models, map(Path, snakemake.input.features))),
        CohortTargets(**snakemake.params.cohort_targets),
        TargetSettings.from_config(shaping),
        EvaluationSettings.from_config(shaping),
        snakemake.params.sites,
        Path(snakemake.output[0]),
        warnings=json.loads(Path(snakemake.input.provenance).read_text())["warnings"],
    )
