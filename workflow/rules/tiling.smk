rule tile:
    """Tissue mask, tile grid at tiling.tile_mpp, the slide's Macenko fit, QC pictures; CPU only."""
    input:
        slide=slide_path,
        stain_target=stain_target_file,
    output:
        tiles="results/tiles/{slide_id}.parquet",
        meta="results/tiles/{slide_id}.json",
        qc=report(
            "results/qc/{slide_id}.png",
            caption="../report/tiling_qc.rst",
            category="Tiling QC",
            subcategory="{slide_id}",
        ),
        stain_qc=report(
            "results/qc/stain/{slide_id}.png",
            caption="../report/stain_qc.rst",
            category="Stain QC",
            subcategory="{slide_id}",
        ),
    log:
        "logs/tile/{slide_id}.log",
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    params:
        sample=slide_record,
        settings=tiling_settings(),
    script:
        "../scripts/tile.py"
