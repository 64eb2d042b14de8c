"""The `pathwsi` command: demo cohort, config checks, single-slide tiling, stain normalization of
image folders, ImageNet weights and Keras weight conversion, fine-tuning, the tissue experiment, feature-store inspection,
and the TCGA importers (expression, mutations, sample sheet)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pathwsi import __version__
from pathwsi.config import FTX_WEIGHTS
from pathwsi.errors import ConfigError, PathwsiError

CONFIG_FILES: dict[str, Any] = {
    "type": Path,
    "nargs": "+",
    "default": [Path("config/config.yaml")],
    "help": "config file(s), each overlaid on the ones before it as snakemake's --configfile does "
    "(default: config/config.yaml; the demo: config/config.yaml demo/config.yaml)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pathwsi", description="H&E whole-slide images to tile features and molecular predictions."
    )
    parser.add_argument("--version", action="version", version=f"pathwsi {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="write the synthetic demo cohort (slides + sample sheet)")
    demo.add_argument("--out", type=Path, default=Path("demo"), help="folder for the demo cohort (default: demo)")
    demo.add_argument("--jobs", type=int, default=2, help="slides written in parallel (default: 2)")
    demo.add_argument("--force", action="store_true", help="rewrite slides that already exist")
    demo.set_defaults(run=_demo)

    check = commands.add_parser("check", help="validate a config file and its sample sheet, listing every problem")
    check.add_argument("--config", **CONFIG_FILES)
    check.set_defaults(run=_check)

    tile = commands.add_parser("tile", help="tile one slide (what the Snakemake rule runs), without Snakemake")
    tile.add_argument("slide", type=Path, help="slide file (any OpenSlide format)")
    tile.add_argument("--slide-id", help="output name (default: the file name without extension)")
    tile.add_argument("--mpp", type=float, help="level-0 µm/px, overriding the file's value")
    tile.add_argument("--config", **CONFIG_FILES)
    tile.add_argument("--results", type=Path, default=Path("results"))
    tile.set_defaults(run=_tile)

    weights = commands.add_parser(
        "weights",
        help="write real ImageNet Xception weights (IMGNET-2048) to a local .safetensors, from Keras's published file or timm (docs/keras_convert.md)",
    )
    sources = weights.add_subparsers(dest="source", required=True)
    keras_source = sources.add_parser(
        "keras",
        help="convert Keras's published xception_weights_tf_dim_ordering_tf_kernels_notop.h5 (MD5-checked): the paper's weights",
    )
    keras_source.add_argument("src", type=Path, help="the .h5 you downloaded")
    keras_source.add_argument("dst", type=Path, help="output .safetensors (give it as models.backbones.imgnet.weights)")
    timm_source = sources.add_parser(
        "timm",
        help="timm's legacy_xception.tf_in1k (ported from Keras), fetched into torch's hub cache unless --offline",
    )
    timm_source.add_argument("dst", type=Path, help="output .safetensors (give it as models.backbones.imgnet.weights)")
    timm_source.add_argument(
        "--offline", action="store_true", help="only take the file from torch's hub cache; never download"
    )
    weights.set_defaults(run=_weights)

    convert = commands.add_parser(
        "convert-keras",
        help="convert a Keras Xception .h5/.keras weight file (e.g. a fine-tuned model) to safetensors for keras_xception",
    )
    convert.add_argument(
        "src", type=Path, help="Keras file: official ImageNet notop .h5, a full-model .h5, or a .keras archive"
    )
    convert.add_argument("dst", type=Path, help="output .safetensors (give it as models.backbones.<name>.weights)")
    convert.set_defaults(run=_convert_keras)

    normalize = commands.add_parser(
        "normalize",
        help="stain-normalize images or folders of tiles (class sub-folders are kept) like the slides (stain.method)",
    )
    normalize.add_argument(
        "inputs", type=Path, nargs="+", help="image files or folders (.tif .png .jpg, searched recursively)"
    )
    normalize.add_argument("--out", type=Path, required=True, help="output folder; the input tree is mirrored under it")
    normalize.add_argument(
        "--config", **{**CONFIG_FILES, "help": "its `stain` section gives the method, settings and target"}
    )
    normalize.add_argument(
        "--fit",
        choices=("per-image", "shared"),
        default="per-image",
        help="one fit per image, or one shared fit from a seeded sample",
    )
    normalize.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    normalize.add_argument("--batch-size", type=int, default=64)
    normalize.set_defaults(run=_normalize)

    finetune = commands.add_parser(
        "finetune",
        help="two-step fine-tuning of the config's finetune.base model on labelled tiles (writes the FTX weights)",
    )
    finetune.add_argument("--config", **CONFIG_FILES)
    finetune.add_argument("--train-dir", type=Path, help="class sub-folders of tiles (default: finetune.train_dir)")
    finetune.add_argument(
        "--val-dir", type=Path, help="validation tiles (default: finetune.val_dir, else a seeded split)"
    )
    finetune.add_argument("--out", type=Path, default=Path(FTX_WEIGHTS), help="the FTX weights file")
    finetune.add_argument(
        "--workdir",
        type=Path,
        default=Path("results/finetune"),
        help="checkpoint, metrics and summary; a rerun resumes from its checkpoint",
    )
    finetune.add_argument("--device", default="auto")
    finetune.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    finetune.set_defaults(run=_finetune)

    experiment = commands.add_parser(
        "tissue-experiment", help="paper experiment 1: repeated CV tissue classification with each model's features"
    )
    experiment.add_argument("--config", **CONFIG_FILES)
    experiment.add_argument("--test-dir", type=Path, help="labelled test tiles (default: tissue_experiment.test_dir)")
    experiment.add_argument("--models", nargs="+", help="models.backbones entries (default: tissue_experiment.models)")
    experiment.add_argument("--out", type=Path, default=Path("results/tissue_experiment"))
    experiment.add_argument("--device", default="auto")
    experiment.add_argument("--jobs", type=int, default=1, help="parallel cross-validation fits")
    experiment.set_defaults(run=_tissue_experiment)

    inspect = commands.add_parser(
        "inspect",
        help="print a feature store's schema, counts, provenance and whether it is complete and valid (--verify: every byte)",
    )
    inspect.add_argument("store", type=Path, help="results/features/<slide_id>.zarr")
    inspect.add_argument(
        "--verify", action="store_true", help="check every byte of the store against its manifest (SHA-256 per file)"
    )
    inspect.add_argument("--json", action="store_true", help="print the full report as JSON")
    inspect.set_defaults(run=_inspect)

    expression = commands.add_parser(
        "import-expression",
        help="GDC STAR - Counts files + their GDC sample sheet -> a patients x genes expression table",
    )
    expression.add_argument(
        "sample_sheet", type=Path, help="the sample sheet the GDC portal exports for the files (gdc_sample_sheet.*.tsv)"
    )
    expression.add_argument("files_dir", type=Path, help="folder the files were downloaded to (searched recursively)")
    expression.add_argument("-o", "--out", type=Path, required=True, help="output table: .tsv, .csv or .parquet")
    expression.add_argument(
        "--value",
        default="tpm_unstranded",
        help="STAR - Counts column to take: tpm_unstranded (default), unstranded (read counts), fpkm_unstranded, ...",
    )
    _add_sample_types(expression)
    expression.set_defaults(run=_import_expression)

    maf = commands.add_parser(
        "import-maf", help="GDC masked somatic MAF file(s) -> a binary patients x genes mutation table"
    )
    maf.add_argument(
        "mafs", type=Path, nargs="+", help="MAF files (.maf, .maf.gz) or folders of them (searched recursively)"
    )
    maf.add_argument("-o", "--out", type=Path, required=True, help="output table: .tsv, .csv or .parquet")
    genes = maf.add_mutually_exclusive_group()
    genes.add_argument(
        "--top", type=int, default=9, help="keep the N genes mutated in most patients (default: 9; ties: alphabetical)"
    )
    genes.add_argument(
        "--genes", nargs="+", help="keep these genes instead: symbols, or one file with one gene per line"
    )
    _add_sample_types(maf)
    maf.set_defaults(run=_import_maf)

    sheet = commands.add_parser(
        "sheet-from-tcga",
        help="write a sample sheet for a folder of TCGA slides (*.svs); patient and site from the barcode",
    )
    sheet.add_argument("slide_dir", type=Path, help="folder of TCGA slide files (searched recursively)")
    sheet.add_argument("--cohort", required=True, help="cohort name for every row, e.g. TCGA-LUAD")
    sheet.add_argument("-o", "--out", type=Path, required=True, help="the sample sheet to write (tab-separated)")
    _add_sample_types(sheet)
    sheet.set_defaults(run=_sheet_from_tcga)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except PathwsiError as err:  # a user-facing problem: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


def _demo(args: argparse.Namespace) -> int:
    from pathwsi.demo.cohort import make_demo

    overlay = make_demo(args.out, args.jobs, args.force)
    print(f"demo cohort written under {args.out}; run it with:  snakemake --cores 2 --configfile {overlay}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from pathwsi.config import check_cross_references, load_config
    from pathwsi.samples import load_samples

    config = load_config(*args.config)
    samples = load_samples(config["samples"])
    for warning in check_cross_references(config, samples):
        print(f"warning: {warning}", file=sys.stderr)
    cohorts = sorted({s.cohort for s in samples})
    print(
        f"{' + '.join(map(str, args.config))}: valid; {len(samples)} slides in {len(cohorts)} cohort(s): {', '.join(cohorts)}"
    )
    return 0


def _tile(args: argparse.Namespace) -> int:
    from pathwsi.config import load_config
    from pathwsi.samples import Sample, sample_problems
    from pathwsi.slides.tile_job import TilingJobSettings, TilingOutputs, tile_slide

    config = load_config(*args.config)
    slide_id = args.slide_id or args.slide.stem
    record = {"cohort": "cli", "slide_id": slide_id, "patient_id": slide_id, "path": str(args.slide), "mpp": args.mpp}
    flags = {"slide_id": "--slide-id", "mpp": "--mpp", "path": "the slide argument"}
    problems = sample_problems({k: v for k, v in record.items() if v is not None}, f"slide '{slide_id}'", called=flags)
    if problems:
        raise ConfigError("pathwsi tile", problems)
    sample = Sample(**record)
    outputs = TilingOutputs.under(args.results, slide_id)
    tiled = tile_slide(sample, TilingJobSettings.from_config(config), outputs)
    print(f"{slide_id}: {tiled.status}, {tiled.kept} tiles; outputs in {outputs.tiles.parent} and {outputs.qc.parent}")
    return 0 if tiled.status != "failed" else 1


def _normalize(args: argparse.Namespace) -> int:
    from pathwsi.config import load_config
    from pathwsi.stain.image_folders import normalize_files
    from pathwsi.stain.macenko import StainSettings
    from pathwsi.stain.methods import load_target

    config = load_config(*args.config)
    settings = StainSettings.from_config(config)
    written = normalize_files(
        args.inputs, args.out, load_target(settings), settings, args.fit, args.batch_size, args.device, config["seed"]
    )
    print(f"{written} image(s) written under {args.out}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from pathwsi.config import load_config
    from pathwsi.finetune.train import run_finetune

    summary = run_finetune(
        load_config(*args.config),
        out_path=args.out,
        workdir=args.workdir,
        train_dir=args.train_dir,
        val_dir=args.val_dir,
        device=args.device,
        restart=args.restart,
    )
    print(f"FTX weights: {args.out} (metrics in {args.workdir / 'metrics.tsv'}); best epoch {summary.get('best')}")
    return 0


def _tissue_experiment(args: argparse.Namespace) -> int:
    from pathwsi.config import load_config
    from pathwsi.finetune.tissue_experiment import run_tissue_experiment_from_config, write_experiment_page

    run_tissue_experiment_from_config(
        load_config(*args.config),
        out_dir=args.out,
        test_dir=args.test_dir,
        models=args.models,
        device=args.device,
        jobs=args.jobs,
    )
    write_experiment_page(args.out)
    print(f"tables and figure in {args.out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from pathwsi.features.store import describe

    report = describe(args.store, verify=args.verify)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{report['path']}: {('verified: every file matches its manifest' if report.get('verified') else 'valid and complete') if report['valid'] else 'NOT usable'}"
        )
        for problem in [report.get("problem"), *report.get("problems", [])]:
            if problem:
                print(f"  problem: {problem}")
        if "partial_chunks_done" in report:
            print(
                f"  an unfinished run stored {report['partial_chunks_done']} chunk(s) under .partial; rerun to resume"
            )
        for name, array in report.get("arrays", {}).items():
            print(f"  {name:<24} {str(tuple(array['shape'])):<14} {array['dtype']:<8} chunks {tuple(array['chunks'])}")
        attrs = report.get("attrs", {})
        if attrs:
            print(
                f"  slide {attrs.get('slide_id')} (patient {attrs.get('patient_id')}, cohort {attrs.get('cohort')}); tiling {attrs.get('tiling_status')}"
            )
            print(
                f"  tiles {attrs.get('tile')}; stain {(attrs.get('stain') or {}).get('status')}; pathwsi {attrs.get('pathwsi_version')}; config hash {str(attrs.get('config_hash'))[:12]}"
            )
            for name, model in attrs.get("models", {}).items():
                print(
                    f"  model {name}: {model['arch']} weights {model['weights']} sha256 {model['weights_sha256'][:12]} input {model['input_px']} px {model['precision']}"
                )
            unreadable = attrs.get("unreadable_tiles") or {}
            if unreadable.get("count"):
                first = unreadable["tiles"][0]
                print(
                    f"  {unreadable['count']} tile(s) could not be read (features NaN, left out); first at level-0 ({first['x']}, {first['y']}): {first['reason']}"
                )
            for warning in attrs.get("warnings", []):
                print(f"  WARNING: {warning}")
    return 0 if report["valid"] else 1


def _convert_keras(args: argparse.Namespace) -> int:
    from pathwsi.features.keras_convert import convert_keras

    report = convert_keras(args.src, args.dst)

    print(report.summary())
    return 0


def _weights(args: argparse.Namespace) -> int:
    from pathwsi.features.imagenet_weights import from_keras, from_timm

    written = from_keras(args.src, args.dst) if args.source == "keras" else from_timm(args.dst, offline=args.offline)

    print(written.summary())
    return 0


def _add_sample_types(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sample-types",
        type=int,
        nargs="+",
        default=[1],
        metavar="CODE",
        help="TCGA sample type codes to keep (default: 01, primary tumour; 11 is solid tissue normal)",
    )


def _import_expression(args: argparse.Namespace) -> int:
    from pathwsi.predict.targets import write_target_table
    from pathwsi.predict.tcga import import_gdc_expression

    table = import_gdc_expression(args.sample_sheet, args.files_dir, args.value, args.sample_types)

    write_target_table(table, args.out)
    print(f"{args.out}: {table.shape[0]} patients x {table.shape[1]} genes ({args.value})")
    return 0


def _import_maf(args: argparse.Namespace) -> int:
    from pathwsi.predict.targets import load_gene_list, write_target_table
    from pathwsi.predict.tcga import import_maf

    genes = args.genes
    if genes is not None and len(genes) == 1 and Path(genes[0]).is_file():
        genes = load_gene_list(Path(genes[0]))
    table = import_maf(args.mafs, genes, args.top, args.sample_types)

    write_target_table(table, args.out)
    print(f"{args.out}: {table.shape[0]} patients x {table.shape[1]} genes ({', '.join(table.columns)})")
    return 0


def _sheet_from_tcga(args: argparse.Namespace) -> int:
    from pathwsi.predict.targets import SHOWN_IDS
    from pathwsi.predict.tcga import sheet_from_tcga, write_sample_sheet

    samples, skipped = sheet_from_tcga(args.slide_dir, args.cohort, args.sample_types)

    write_sample_sheet(samples, args.out)
    print(
        f"{args.out}: {len(samples)} slides of {len({s.patient_id for s in samples})} patients; {len(skipped)} skipped"
    )
    for path, reason in skipped[:SHOWN_IDS]:
        print(f"  skipped {path}: {reason}")
    if len(skipped) > SHOWN_IDS:
        print(f"  ... and {len(skipped) - SHOWN_IDS} more (listed in the log)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
