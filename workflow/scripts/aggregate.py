"""Snakemake entry point of rule `aggregate`: one cohort's stores -> slide and patient features."""

from pathlib import Path

from pathwsi.config import validate_config
from pathwsi.predict.aggregate import AggregateOutputs, SlideEntry, aggregate_cohort, write_cohort
from pathwsi.runtime.dask_scheduler import DaskScheduler
from pathwsi.runtime.logs import job_log

with job_log(snakemake.log[0]):
    entries = [SlideEntry(e["slide_id"], e["patient_id"], Path(e["store"])) for e in snakemake.params.entries]
    # the scheduler says how, not what: changing it reruns nothing
    scheduler = DaskScheduler.from_config(validate_config(snakemake.config), workers=snakemake.threads)
    result = aggregate_cohort(entries, snakemake.params.models, snakemake.params.statistics, scheduler)
    write_cohort(result, AggregateOutputs(Path(snakemake.output.slides).parent))
