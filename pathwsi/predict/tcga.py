"""TCGA importers: barcodes, GDC STAR - Counts expression files, GDC MAF files, and a sample sheet
from a folder of TCGA slides. Everything reads local files; nothing is downloaded (docs/targets.md
says how to get the files from the GDC)."""

from __future__ import annotations

import csv
import gzip
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import numpy as np
import pandas as pd

from pathwsi.predict.targets import ID_COLUMN, SHOWN_IDS, TargetError, load_gene_list
from pathwsi.runtime.outputs import write_frame
from pathwsi.samples import COLUMNS, Sample

log = logging.getLogger(__name__)
PRIMARY_TUMOUR = (1,)  # TCGA sample type codes kept by default
BARCODE = re.compile(
    r"TCGA-(?P<site>[A-Z0-9]{2})-(?P<participant>[A-Z0-9]{4})(?:-(?P<sample>\d{2})(?P<vial>[A-Z])?(?:-(?P<portion>\d{2})[A-Z]?(?:-[A-Z0-9]+)*)?)?"
)
STAR_SUFFIX = ".augmented_star_gene_counts.tsv"
STAR_VALUES = (
    "unstranded",
    "stranded_first",
    "stranded_second",
    "tpm_unstranded",
    "fpkm_unstranded",
    "fpkm_uq_unstranded",
)
STAR_SUMMARY_ROWS = ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous")
# maftools' default non-synonymous classes (read.maf, vc_nonSyn = NULL): protein-altering or splice-site variants.
NON_SILENT = (
    "Frame_Shift_Del",
    "Frame_Shift_Ins",
    "Splice_Site",
    "Translation_Start_Site",
    "Nonsense_Mutation",
    "Nonstop_Mutation",
    "In_Frame_Del",
    "In_Frame_Ins",
    "Missense_Mutation",
)
MAF_COLUMNS = ("Hugo_Symbol", "Variant_Classification", "Tumor_Sample_Barcode")
COHORT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Barcode:
    """The fields of a TCGA barcode; those after the patient are None where the barcode stops earlier."""

    barcode: str
    site: str  # tissue source site, e.g. "05"
    participant: str
    sample_type: int | None  # 1 primary tumour, 11 solid tissue normal, ...
    vial: str | None
    portion: int | None

    @property
    def patient(self) -> str:
        return f"TCGA-{self.site}-{self.participant}"


def parse_barcode(text: str) -> Barcode:
    """Parse a TCGA barcode, or a file name that starts with one (`TCGA-05-4244-01Z-00-DX1.<uuid>.svs`)."""
    barcode = text.strip().split(".")[0]
    found = BARCODE.fullmatch(barcode)
    if not found:
        raise TargetError(
            f"'{text}' is not a TCGA barcode; expected e.g. TCGA-05-4244-01A-01R-1107-07, or a slide file named TCGA-05-4244-01Z-00-DX1.<uuid>.svs"
        )
    sample, portion = found["sample"], found["portion"]
    return Barcode(
        barcode,
        found["site"],
        found["participant"],
        int(sample) if sample else None,
        found["vial"],
        int(portion) if portion else None,
    )


def _codes(sample_types: Iterable[int]) -> str:
    return ", ".join(f"{t:02d}" for t in sample_types)


def _open_text(path: Path) -> IO[str]:
    """Open a plain or gzip-compressed text file (told apart by its first bytes)."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt") if gzipped else path.open()


def _read_commented_tsv(path: Path, columns: Sequence[str], kind: str) -> pd.DataFrame:
    """The named columns (as strings) of a tab-separated file, plain or gzipped, after its `#` lines."""
    try:
        with _open_text(path) as handle:
            line = handle.readline()
            while line.startswith("#"):
                line = handle.readline()
            header = line.rstrip("\r\n").split("\t")
            missing = [c for c in columns if c not in header]
            if missing:
                raise TargetError(
                    f"{path}: no column {', '.join(repr(c) for c in missing)} (its header starts {', '.join(header[:6])}); is it a {kind}?"
                )
            return pd.read_csv(
                handle,
                sep="\t",
                header=None,
                names=header,
                usecols=list(columns),
                dtype=str,
                keep_default_na=False,
                quoting=csv.QUOTE_NONE,
            )
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise TargetError(f"{path}: cannot read it as a {kind}: {err}; download it again") from err


def read_star_counts(path: Path, value: str = "tpm_unstranded") -> pd.Series:
    """One GDC STAR - Counts file: `value` per gene symbol, genes sharing a symbol summed, the STAR
    summary rows (N_unmapped, ...) left out."""
    if value not in STAR_VALUES:
        raise TargetError(f"STAR - Counts value column '{value}' is unknown; use one of {', '.join(STAR_VALUES)}")
    table = _read_commented_tsv(path, ("gene_id", "gene_name", value), "GDC STAR - Counts file")
    genes = table[~table["gene_id"].isin(STAR_SUMMARY_ROWS)]
    values = pd.to_numeric(genes[value], errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy() | (values.to_numpy() < 0))
    if len(bad):
        row = genes.iloc[bad[0]]
        raise TargetError(
            f"{path}: column '{value}', gene {row['gene_id']}: '{row[value]}' is not a non-negative number; the file may be damaged, download it again"
        )
    symbols = genes["gene_name"].where(genes["gene_name"] != "", genes["gene_id"])
    return values.groupby(symbols.to_numpy(), sort=False).sum()


def import_gdc_expression(
    sample_sheet: Path, files_dir: Path, value: str = "tpm_unstranded", sample_types: Sequence[int] = PRIMARY_TUMOUR
) -> pd.DataFrame:
    """Patients × genes expression from GDC STAR - Counts files found under `files_dir`, matched to
    samples by the GDC sample sheet; samples of other types are skipped, a patient's samples averaged."""
    sheet = _read_gdc_sheet(Path(sample_sheet))
    files = _files_by_name(Path(files_dir), STAR_SUFFIX)
    star = sheet[sheet["File Name"].str.endswith(STAR_SUFFIX)]
    if len(star) < len(sheet):
        log.info(
            "%s: %d row(s) are not STAR - Counts files (*%s); ignored",
            sample_sheet,
            len(sheet) - len(star),
            STAR_SUFFIX,
        )
    samples, other_types, missing = [], 0, []
    for line, row in star.iterrows():
        try:
            barcode = parse_barcode(row["Sample ID"])
        except TargetError as err:
            # the sheet's default index: its data row number
            raise TargetError(f"{sample_sheet}: line {cast(int, line) + 2}, column 'Sample ID': {err}") from None
        if barcode.sample_type not in sample_types:
            other_types += 1
        elif row["File Name"] not in files:
            missing.append(row["File Name"])
        else:
            samples.append((barcode.patient, files[row["File Name"]]))
    log.info(
        "%d STAR - Counts file(s) of sample types %s; %d of other types skipped",
        len(samples),
        _codes(sample_types),
        other_types,
    )
    if missing:
        log.warning(
            "%d file(s) of the sample sheet are not under %s, skipped: %s",
            len(missing),
            files_dir,
            ", ".join(missing[:SHOWN_IDS]),
        )
    unlisted = len(files) - len(set(star["File Name"]) & set(files))
    if unlisted:
        log.warning("%d STAR - Counts file(s) under %s are not in the sample sheet; ignored", unlisted, files_dir)
    if not samples:
        raise TargetError(
            f"{sample_sheet}: no STAR - Counts file of sample types {_codes(sample_types)} found under {files_dir}; check the folder, the sheet and --sample-types"
        )
    return _average_patients(samples, value)


def _read_gdc_sheet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise TargetError(
            f"{path}: GDC sample sheet not found; download it from the GDC portal cart (the 'Sample Sheet' button)"
        )
    try:
        sheet = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise TargetError(f"{path}: cannot read it as a GDC sample sheet (tab-separated): {err}") from err
    missing = [c for c in ("File Name", "Sample ID") if c not in sheet.columns]
    if missing:
        raise TargetError(
            f"{path}: no column {', '.join(repr(c) for c in missing)} (it has {', '.join(sheet.columns[:8])}); give the sample sheet the GDC portal exports for the files"
        )
    return sheet


def _files_by_name(folder: Path, suffix: str) -> dict[str, Path]:
    """Files under `folder` (recursively) whose name ends with `suffix`, by name; a name found twice is an error."""
    if not folder.is_dir():
        raise TargetError(f"{folder}: folder not found; give the folder the GDC files were downloaded to")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob(f"*{suffix}")):
        if path.name in found:
            raise TargetError(f"{path} and {found[path.name]}: the same file twice; delete one")
        found[path.name] = path
    return found


def _average_patients(samples: list[tuple[str, Path]], value: str) -> pd.DataFrame:
    """Read each sample's file and average the samples of each patient (raw values, before any transform)."""
    rows, genes, first = [], None, None
    for _, path in samples:
        series = read_star_counts(path, value)
        if genes is None:
            genes, first = series.index, path
        elif not series.index.equals(genes):
            raise TargetError(
                f"{path}: its genes differ from those of {first}; use files of one GDC release and gene model"
            )
        rows.append(series.to_numpy())
    patients = pd.Index([p for p, _ in samples], name=ID_COLUMN)
    table = pd.DataFrame(np.vstack(rows), index=patients, columns=genes).groupby(level=0).mean()
    several = patients.value_counts()
    several = several[several > 1]
    if len(several):
        log.info(
            "averaged the samples of %d patient(s) with several: %s", len(several), ", ".join(several.index[:SHOWN_IDS])
        )
    return table


def maf_files(paths: Iterable[Path]) -> list[Path]:
    """The given MAF files, and the *.maf / *.maf.gz files under given folders (recursively)."""
    paths = [Path(p) for p in paths]
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith((".maf", ".maf.gz")))
        elif path.is_file():
            files.append(path)
        else:
            raise TargetError(f"{path}: MAF file or folder not found")
    if not files:
        raise TargetError(
            f"no *.maf or *.maf.gz file under {', '.join(map(str, paths))}; download the Masked Somatic Mutation files from the GDC"
        )
    return files


def import_maf(
    paths: Iterable[Path],
    genes: Sequence[str] | None = None,
    top: int = 9,
    sample_types: Sequence[int] = PRIMARY_TUMOUR,
    classes: Sequence[str] = NON_SILENT,
) -> pd.DataFrame:
    """Binary patients × genes table (int8) from MAF files: 1 where the patient's tumour sample has a
    variant of `classes` in the gene. Every patient with a row of the right sample type is listed.
    Genes: `genes`, else the `top` genes mutated in most patients (ties: alphabetical)."""
    if genes is None and top < 1:
        raise TargetError(f"--top must be at least 1 (got {top})")
    variants = pd.concat([_read_maf(path, sample_types) for path in maf_files(paths)], ignore_index=True)
    patients = sorted(variants["patient"].unique())
    if not patients:
        raise TargetError(
            f"no variant of a sample of type {_codes(sample_types)} in the MAF file(s); check --sample-types"
        )
    pairs = variants.loc[variants["Variant_Classification"].isin(classes), ["patient", "Hugo_Symbol"]].drop_duplicates()
    counts = pairs["Hugo_Symbol"].value_counts()
    ranked = sorted(counts.index, key=lambda gene: (-counts[gene], gene))
    selected = load_gene_list(genes) if genes is not None else _top_genes(ranked, counts, top)
    absent = [g for g in selected if g not in counts.index]
    if absent:
        log.warning(
            "%d requested gene(s) have no qualifying variant in any patient (all 0): %s",
            len(absent),
            ", ".join(absent[:SHOWN_IDS]),
        )
    table = pd.DataFrame(0, index=pd.Index(patients, name=ID_COLUMN), columns=selected, dtype="int8")
    for gene, hits in pairs[pairs["Hugo_Symbol"].isin(selected)].groupby("Hugo_Symbol"):
        table.loc[hits["patient"], gene] = 1
    log.info(
        "%d patients; mutated patients per gene: %s",
        len(patients),
        ", ".join(f"{g} {int(table[g].sum())}" for g in selected),
    )
    return table


def _read_maf(path: Path, sample_types: Sequence[int]) -> pd.DataFrame:
    """The MAF's variants of tumour samples of `sample_types`, with their patient."""
    variants = _read_commented_tsv(path, MAF_COLUMNS, "MAF file")
    barcodes = {}
    for text in variants["Tumor_Sample_Barcode"].unique():
        try:
            barcodes[text] = parse_barcode(text)
        except TargetError as err:
            raise TargetError(f"{path}: column 'Tumor_Sample_Barcode': {err}") from None
    kept = variants["Tumor_Sample_Barcode"].map(lambda text: barcodes[text].sample_type in sample_types)
    other = sorted(t for t, b in barcodes.items() if b.sample_type not in sample_types)
    if other:
        log.info(
            "%s: %d tumour sample(s) of other sample types skipped: %s", path, len(other), ", ".join(other[:SHOWN_IDS])
        )
    variants = variants[kept.astype(bool)]
    return variants.assign(patient=variants["Tumor_Sample_Barcode"].map(lambda text: barcodes[text].patient))


def _top_genes(ranked: list[str], counts: pd.Series, top: int) -> list[str]:
    selected = ranked[:top]
    if len(ranked) > top and counts[ranked[top]] == counts[ranked[top - 1]]:
        tied = [g for g in ranked if counts[g] == counts[ranked[top - 1]]]
        log.warning(
            "genes %s are mutated in %d patients each; kept the alphabetically first to make %d genes; pass --genes to choose",
            ", ".join(tied),
            counts[ranked[top - 1]],
            top,
        )
    return selected


def sheet_from_tcga(
    slide_dir: Path, cohort: str, sample_types: Sequence[int] = PRIMARY_TUMOUR
) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Sample-sheet rows for the TCGA slides (*.svs, recursively) under `slide_dir` of `sample_types`,
    and the slides skipped with the reason. slide_id is the barcode (the file name before its first
    dot); a barcode found twice gets `_2`, `_3`, ... in path order."""
    slide_dir = Path(slide_dir)
    if not slide_dir.is_dir():
        raise TargetError(f"{slide_dir}: slide folder not found")
    if not COHORT.fullmatch(cohort):
        raise TargetError(
            f"cohort '{cohort}': use only letters, digits, '.', '_' and '-', not starting with '.' or '-'"
        )
    samples: list[Sample] = []
    skipped: list[tuple[Path, str]] = []
    seen: dict[str, list[Path]] = {}
    for path in sorted(p for p in slide_dir.rglob("*") if p.is_file() and p.suffix.lower() == ".svs"):
        try:
            barcode = parse_barcode(path.name)
        except TargetError:
            skipped.append((path, "the file name does not start with a TCGA barcode"))
            continue
        if barcode.sample_type not in sample_types:
            kind = "none" if barcode.sample_type is None else f"{barcode.sample_type:02d}"
            skipped.append((path, f"sample type {kind}, not {_codes(sample_types)}"))
            continue
        same = seen.setdefault(barcode.barcode, [])
        same.append(path)
        slide_id = barcode.barcode if len(same) == 1 else f"{barcode.barcode}_{len(same)}"
        samples.append(Sample(cohort, slide_id, barcode.patient, path.as_posix(), None, barcode.site))
    for code, paths in seen.items():
        if len(paths) > 1:
            log.warning(
                "barcode %s names %d slides; their slide_ids get _2, _3, ... in path order: %s",
                code,
                len(paths),
                ", ".join(map(str, paths)),
            )
    for path, reason in skipped:
        log.info("skipped %s: %s", path, reason)
    if not samples:
        raise TargetError(
            f"{slide_dir}: no TCGA slide (*.svs) of sample type {_codes(sample_types)}; {len(skipped)} skipped"
        )
    return samples, skipped


def write_sample_sheet(samples: Sequence[Sample], path: Path) -> None:
    """Write the tab-separated sample sheet atomically (columns in pathwsi.samples.COLUMNS order)."""
    rows = [[getattr(sample, column) for column in COLUMNS] for sample in samples]
    write_frame(pd.DataFrame(rows, columns=list(COLUMNS)), path, sep="\t")
