rule predict:
    """Cross-validated expression and mutation predictors from patient features; FTX vs IMGNET."""
    input:
        features=expand(
            "results/aggregate/{{cohort}}/{model}.patients.parquet", model=list(CONFIG["models"]["backbones"])
        ),
        targets=cohort_target_files,
        provenance="results/aggregate/{cohort}/provenance.json",  # its warnings head every output
    output:
        report(
            directory("results/predict/{cohort}"),
            patterns=["{name}.png"],
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
