# Fine-tuning (FTX weights) and paper experiment 1 (tissue classification). See docs/finetune.md.


rule finetune:
    """Two-step fine-tuning of finetune.base on finetune.train_dir (docs/finetune.md); resumes from results/finetune/checkpoint.pt."""
    input:
        unpack(finetune_inputs),
    output:
        weights=FTX_WEIGHTS,
        head="results/finetune/head.safetensors",
        metrics=report("results/finetune/metrics.tsv", caption="../report/finetune.rst", category="Fine-tuning"),
        summary="results/finetune/summary.json",
    log:
        "logs/finetune.log",
    conda:
        "../../environment.yml"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=1,
    params:
        config=finetune_config(),
    script:
        "../scripts/finetune.py"


rule finetune_curves:
    """The fine-tuning curves for the report, from metrics.tsv. The job draws them after every epoch too; this rule
    gives a run made before that its figure without training again (a new FTX would rebuild every store)."""
    input:
        metrics="results/finetune/metrics.tsv",
        summary="results/finetune/summary.json",
    output:
        curves=report("results/finetune/curves.png", caption="../report/finetune_curves.rst", category="Fine-tuning"),
    log:
        "logs/finetune_curves.log",
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/finetune_curves.py"


rule tissue_experiment:
    """Paper experiment 1: features of the labelled test tiles with each model, repeated cross-validation, tables, figure."""
    input:
        unpack(tissue_experiment_inputs),
    output:
        accuracy="results/tissue_experiment/accuracy.tsv",
        comparison="results/tissue_experiment/comparison.tsv",
        repeats="results/tissue_experiment/repeats.tsv",
        summary="results/tissue_experiment/summary.json",
        confusion=expand("results/tissue_experiment/confusion_{model}.tsv", model=CONFIG["tissue_experiment"]["models"]),
        figure=report(
            "results/tissue_experiment/tissue_experiment.png",
            caption="../report/tissue_experiment.rst",
            category="Tissue classification",
        ),
    log:
        "logs/tissue_experiment.log",
    conda:
        "../../environment.yml"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=1,
    params:
        config=tissue_experiment_config(),
    script:
        "../scripts/tissue_experiment.py"


rule tissue_experiment_page:
    """The tissue experiment's tables as one page for the report (its own rule: a run made before the page existed keeps its experiment)."""
    input:
        summary="results/tissue_experiment/summary.json",
        accuracy="results/tissue_experiment/accuracy.tsv",
        comparison="results/tissue_experiment/comparison.tsv",
        confusion=expand("results/tissue_experiment/confusion_{model}.tsv", model=CONFIG["tissue_experiment"]["models"]),
    output:
        page=report(
            "results/tissue_experiment/tables.html",
            caption="../report/tissue_experiment.rst",
            category="Tissue classification",
        ),
    log:
        "logs/tissue_experiment_page.log",
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/tissue_experiment_page.py"
