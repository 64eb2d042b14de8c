rule predict:
    """Cross-validated expression and mutation predictors from patient (or slide) features; FTX vs IMGNET."""
    input:
        features=lambda wildcards: aggregate_feature_files(wildcards.cohort),
        slides="results/aggregate/{cohort}/slides.tsv",
        targets=cohort_target_files,
        provenance="results/aggregate/{cohort}/provenance.json",  # its warnings head every output
    output:
        report(
            directory("results/predict/{cohort}"),
            patterns=["{name}.png", "{name}.html"],
            caption="../report/predict.rst",
            category="Molecular prediction",
            subcategory="{cohort}",
        ),
    log:
        "logs/predict/{cohort}.log",
    conda:
        "../../environment.yml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    params:
        models=list(CONFIG["models"]["backbones"]),
        cohort_targets=lambda wildcards: CONFIG["targets"]["cohorts"][wildcards.cohort],
        targets={k: v for k, v in CONFIG["targets"].items() if k != "cohorts"},
        settings=CONFIG["predict"],
        seed=CONFIG["seed"],
        sites=cohort_sites,
    script:
        "../scripts/predict.py"


rule heatmaps:
    """Every used slide's tiles scored by the out-of-fold predictors: tables, QuPath GeoJSON, pictures."""
    input:
        predict="results/predict/{cohort}",
        features=lambda wildcards: aggregate_feature_files(wildcards.cohort),
        provenance="results/aggregate/{cohort}/provenance.json",
        stores=cohort_stores,
        tiles=cohort_tile_records,
    output:
        report(
            directory("results/heatmaps/{cohort}"),
            patterns=["{model}/{target}/{slide}.png"],
            caption="../report/heatmaps.rst",
            category="Heatmaps: {cohort}",
            subcategory="{target}",
            labels={"slide": "{slide}", "target": "{target}", "model": "{model}"},
        ),
    log:
        "logs/heatmaps/{cohort}.log",
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        slides=lambda wildcards: [entry["slide_id"] for entry in cohort_entries(wildcards)],
        expression_transform=CONFIG["targets"]["expression_transform"],
    script:
        "../scripts/heatmaps.py"
