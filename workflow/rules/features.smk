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
    log:
        "logs/features/{slide_id}.log",
    conda:
        "../../environment.yml"
    threads: CONFIG["features"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    params:
        sample=slide_record,
        backbones=CONFIG["models"]["backbones"],  # models.allow_network says how, not what: read from the config
        dtype=CONFIG["features"]["dtype"],  # dtype and reader change results; the other features keys come from the config
        reader=CONFIG["features"]["reader"],
        store_schema="pathwsi.features/2",  # pathwsi.features.store.SCHEMA: a new store layout re-extracts stores of an older one
    script:
        "../scripts/features.py"
