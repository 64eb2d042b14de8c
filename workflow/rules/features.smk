rule features:
    """Read each kept tile once, Macenko-normalize it once, run every configured model; Zarr store."""
    input:
        tiles="results/tiles/{slide_id}.parquet",
        meta="results/tiles/{slide_id}.json",
        slide=slide_path,
        weights=model_weight_files(),
    output:
        store=directory("results/features/{slide_id}.zarr"),
        timings="results/features/{slide_id}.timings.json",
    params:
        sample=slide_record,
        backbones=CONFIG["models"]["backbones"],  # models.allow_network says how, not what: read from the config
        dtype=CONFIG["features"]["dtype"],  # the only features key that changes results; the rest come from the config
    log:
        "logs/features/{slide_id}.log",
    conda:
        "../../environment.yml"
    threads: CONFIG["features"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    script:
        "../scripts/features.py"
