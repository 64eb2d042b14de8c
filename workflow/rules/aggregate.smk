rule aggregate:
    """Slide- and patient-level features of every model from the cohort's complete stores (dask)."""
    input:
        stores=cohort_stores,
    output:
        features=aggregate_feature_files("{cohort}"),
        slides="results/aggregate/{cohort}/slides.tsv",
        patients="results/aggregate/{cohort}/patients.tsv",
        provenance="results/aggregate/{cohort}/provenance.json",
    log:
        "logs/aggregate/{cohort}.log",
    conda:
        "../../environment.yml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        entries=cohort_entries,
        models=list(CONFIG["models"]["backbones"]),
        statistics=CONFIG["aggregate"]["statistics"],  # aggregate.scheduler says how, not what: read from the config
    script:
        "../scripts/aggregate.py"
