"""pathwsi: H&E whole-slide images -> tiles -> Xception features -> molecular predictions.

Run from the repository root:  snakemake --cores N   (see README.md)
"""

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


wildcard_constraints:
    slide_id=r"[A-Za-z0-9_][A-Za-z0-9._-]*",
    cohort=r"[A-Za-z0-9_][A-Za-z0-9._-]*",


include: "workflow/rules/common.smk"
include: "workflow/rules/tiling.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/summary.smk"


rule all:
    default_target: True
    input:
        checked(run_targets),


rule tiles:
    """Only tile the slides (masks, grids, stain fits, QC): `snakemake --cores N tiles`."""
    input:
        checked(expand("results/tiles/{slide_id}.json", slide_id=sorted(SAMPLES))),
