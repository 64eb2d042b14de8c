"""Config and sample-sheet validation, and the input functions shared by the workflow."""

from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from pathwsi.config import FTX_WEIGHTS, check_cross_references, validate_config
from pathwsi.errors import PathwsiError
from pathwsi.rerun_params import sample_params, settings_params
from pathwsi.samples import load_samples
from pathwsi.stain.macenko import StainSettings, load_target

try:
    CONFIG = validate_config(config)
except PathwsiError as err:
    raise WorkflowError(f"pathwsi: the run cannot start.\n{err}") from None

# Problems of the sheet and of the files the config names stop the run when its jobs are built (`checked`), so
# that parsing alone (--lint) needs neither slides nor weights.
SAMPLES = {}
STARTUP_PROBLEM = None
try:
    SAMPLES = {sample.slide_id: sample for sample in load_samples(CONFIG["samples"])}
    for warning in check_cross_references(CONFIG, list(SAMPLES.values())):
        logger.warning(f"pathwsi: {warning}")
    load_target(StainSettings.from_config(CONFIG))
except PathwsiError as err:
    STARTUP_PROBLEM = f"pathwsi: the run cannot start.\n{err}"


def checked(targets):
    """An input function for a target rule: `targets` (a list, or a function of nothing), or the problem that
    stops the run."""

    def inputs(wildcards):
        stop_on_startup_problem()
        return targets() if callable(targets) else targets

    return inputs


def stop_on_startup_problem():
    if STARTUP_PROBLEM:
        raise WorkflowError(STARTUP_PROBLEM)


def run_targets():
    """What `snakemake` builds by default."""
    return [
        "results/summary.tsv",  # needs every slide's tiles and features
        "results/summary.html",  # every output the report shows is asked for (an older run gets it from its own rule)
        *aggregate_outputs(),
        *predict_outputs(),
        *tissue_experiment_outputs(),
        *(["results/finetune/curves.png"] if FTX_WEIGHTS in model_weight_files() else []),
    ]


def slide_path(wildcards):
    """The slide file of one sample-sheet row (every per-slide job asks: a file asked for by name stops too)."""
    stop_on_startup_problem()
    return SAMPLES[wildcards.slide_id].path


def slide_record(wildcards):
    """The sheet row as params (pathwsi.rerun_params): editing the row reruns that slide's jobs."""
    return sample_params(SAMPLES[wildcards.slide_id])


def tiling_settings():
    """The config sections that shape a slide's tiles (changing one reruns the tiling; pathwsi.rerun_params).

    Not `qc`: picture sizes shape no tile, so the tile job reads them from the config itself."""
    return settings_params(CONFIG, ("seed", "tiling", "tissue", "stain"))


def stain_target_file(wildcards):
    """The stain target image or .json, when the config names one (editing it reruns the tiling)."""
    target = CONFIG["stain"]["target"]
    return [] if target == "default" else [target]


def weights_files(names):
    """The local weight files of these backbones (none for 'untrained' / 'hub'); FTX's comes from rule finetune."""
    weights = [CONFIG["models"]["backbones"][name]["weights"] for name in names]
    return [w for w in weights if w not in ("untrained", "hub")]


def model_weight_files():
    """Local weight files of every configured backbone."""
    return weights_files(CONFIG["models"]["backbones"])


def finetune_inputs(wildcards):
    """The training tiles, the validation tiles when given, and the base model's weights file."""
    section = CONFIG["finetune"]
    inputs = {"train": section["train_dir"], "base": weights_files([section["base"]])}
    if section.get("val_dir"):
        inputs["val"] = section["val_dir"]
    return inputs


def finetune_config():
    """What shapes the FTX weights: the base model's entry, the finetune section, the seed."""
    base = CONFIG["finetune"]["base"]
    models = {
        "allow_network": CONFIG["models"]["allow_network"],
        "backbones": {base: CONFIG["models"]["backbones"][base]},
    }
    return {"models": models, "finetune": CONFIG["finetune"], "seed": CONFIG["seed"]}


def tissue_experiment_inputs(wildcards):
    """The labelled test tiles and the weights file of every compared model (FTX comes from rule finetune)."""
    return {
        "tiles": CONFIG["tissue_experiment"]["test_dir"],
        "weights": weights_files(CONFIG["tissue_experiment"]["models"]),
    }


def tissue_experiment_config():
    """What shapes the experiment: the compared models' entries, the section, the seed."""
    names = CONFIG["tissue_experiment"]["models"]
    models = {
        "allow_network": CONFIG["models"]["allow_network"],
        "backbones": {n: CONFIG["models"]["backbones"][n] for n in names},
    }
    return {"models": models, "tissue_experiment": CONFIG["tissue_experiment"], "seed": CONFIG["seed"]}


def tissue_experiment_outputs():
    """Every output of rule tissue_experiment."""
    tables = ["accuracy.tsv", "comparison.tsv", "repeats.tsv", "summary.json", "tissue_experiment.png", "tables.html"]
    confusion = expand("confusion_{model}.tsv", model=CONFIG["tissue_experiment"]["models"])
    return [f"results/tissue_experiment/{name}" for name in tables + confusion]


def cohort_names():
    """Cohorts of the sample sheet, sorted."""
    return sorted({sample.cohort for sample in SAMPLES.values()})


def cohort_entries(wildcards):
    """The cohort's slides as plain dicts (slide, patient, store); editing the sheet reruns the cohort."""
    return [
        {"slide_id": s.slide_id, "patient_id": s.patient_id, "store": f"results/features/{s.slide_id}.zarr"}
        for s in sorted(SAMPLES.values(), key=lambda s: s.slide_id)
        if s.cohort == wildcards.cohort
    ]


def cohort_stores(wildcards):
    """The feature stores of the cohort's slides."""
    return [entry["store"] for entry in cohort_entries(wildcards)]


def cohort_tile_records(wildcards):
    """The tiling records of the cohort's slides (their files, µm/px and tile size), in cohort_entries order."""
    return [f"results/tiles/{entry['slide_id']}.json" for entry in cohort_entries(wildcards)]


def aggregate_feature_files(cohort):
    """The slide- and patient-level feature tables of every model for `cohort`."""
    return expand(
        "results/aggregate/{cohort}/{model}.{level}.parquet",
        cohort=cohort,
        model=list(CONFIG["models"]["backbones"]),
        level=["slides", "patients"],
    )


def aggregate_outputs():
    """Every cohort's aggregated features and slide/patient tables."""
    return [
        path
        for cohort in cohort_names()
        for path in aggregate_feature_files(cohort)
        + expand(
            "results/aggregate/{cohort}/{name}", cohort=cohort, name=["slides.tsv", "patients.tsv", "provenance.json"]
        )
    ]


def predicted_cohorts():
    """Cohorts of the sheet that the config gives target tables for."""
    return [cohort for cohort in cohort_names() if cohort in CONFIG["targets"]["cohorts"]]


def cohort_target_files(wildcards):
    """The cohort's expression and mutation tables (editing one reruns its predictors)."""
    tables = CONFIG["targets"]["cohorts"][wildcards.cohort]
    return [tables[kind] for kind in ("expression", "mutations") if tables.get(kind)]


def cohort_sites(wildcards):
    """Patient -> tissue source site of the cohort (for site-grouped folds)."""
    return {s.patient_id: s.site for s in SAMPLES.values() if s.cohort == wildcards.cohort and s.site}


def predict_outputs():
    """Every predicted cohort's results and heatmaps folders."""
    return expand("results/{stage}/{cohort}", stage=["predict", "heatmaps"], cohort=predicted_cohorts())
