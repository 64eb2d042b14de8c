rule summary:
    """The run summary: per slide status, tiles, stain fit and seconds per stage; per cohort, slides used."""
    input:
        metas=expand("results/tiles/{slide_id}.json", slide_id=sorted(SAMPLES)),
        timings=expand("results/features/{slide_id}.timings.json", slide_id=sorted(SAMPLES)),
        cohorts=expand("results/aggregate/{cohort}/slides.tsv", cohort=cohort_names()),
    output:
        slides=report("results/summary.tsv", caption="../report/summary.rst", category="Run summary"),
        cohorts="results/summary_cohorts.tsv",
        markdown="results/summary.md",
        page=report("results/summary.html", caption="../report/summary.rst", category="Run summary"),
    log:
        "logs/summary.log",
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        samples=[{"cohort": s.cohort, "slide_id": s.slide_id, "patient_id": s.patient_id} for s in SAMPLES.values()],
    script:
        "../scripts/summary.py"
