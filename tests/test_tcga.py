"""TCGA importers on small synthetic GDC files, and their command-line front ends."""

from __future__ import annotations

import gzip
import logging

import numpy as np
import pandas as pd
import pytest

from pathwsi.cli import main
from pathwsi.predict.targets import TargetError, read_expression, read_mutations
from pathwsi.predict.tcga import (
    import_gdc_expression,
    import_maf,
    parse_barcode,
    read_star_counts,
    sheet_from_tcga,
    write_sample_sheet,
)
from pathwsi.samples import load_samples


@pytest.mark.parametrize(
    "text, patient, site, sample_type, vial, portion",
    [
        ("TCGA-05-4244-01Z-00-DX1.1c5fe3a2-9ab0-4a1f-9d2b-5d4c7a5a0b0e.svs", "TCGA-05-4244", "05", 1, "Z", 0),
        ("TCGA-05-4244-01A-01R-1107-07", "TCGA-05-4244", "05", 1, "A", 1),
        ("TCGA-2Z-A9JE-11A-21D", "TCGA-2Z-A9JE", "2Z", 11, "A", 21),
        ("TCGA-86-8076-10A", "TCGA-86-8076", "86", 10, "A", None),
        ("TCGA-86-8076", "TCGA-86-8076", "86", None, None, None),
    ],
)
def test_parse_barcode(text, patient, site, sample_type, vial, portion):
    barcode = parse_barcode(text)
    assert (barcode.patient, barcode.site, barcode.sample_type, barcode.vial, barcode.portion) == (
        patient,
        site,
        sample_type,
        vial,
        portion,
    )
    assert barcode.barcode == text.split(".")[0]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "TCGA-05",
        "tcga-05-4244-01A",
        "TARGET-20-PAEFGT-03A",
        "TCGA-05-4244-1A",
        "TCGA-05-4244-01A extra",
        "slide_001.svs",
    ],
)
def test_bad_barcodes(text):
    with pytest.raises(TargetError, match="is not a TCGA barcode"):
        parse_barcode(text)


# --- GDC STAR - Counts ---------------------------------------------------------------------------

STAR_COLUMNS = "gene_id\tgene_name\tgene_type\tunstranded\tstranded_first\tstranded_second\ttpm_unstranded\tfpkm_unstranded\tfpkm_uq_unstranded"
GENES = [
    ("ENSG00000141510.18", "TP53"),
    ("ENSG00000002586.20", "CD99"),
    ("ENSG00000002586.20_PAR_Y", "CD99"),
    ("ENSG00000133703.12", "KRAS"),
]


def star_file(path, counts, tpm):
    """A GDC augmented STAR gene counts file with the four summary rows first."""
    lines = ["# gene-model: GENCODE v36", STAR_COLUMNS]
    lines += [
        f"{name}\t\t\t{n}\t{n}\t{n}\t\t\t"
        for name, n in zip(("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"), (9, 8, 7, 6))
    ]
    lines += [f"{gid}\t{name}\tprotein_coding\t{c}\t0\t0\t{t}\t0\t0" for (gid, name), c, t in zip(GENES, counts, tpm)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


SHEET_COLUMNS = "File ID\tFile Name\tData Category\tData Type\tProject ID\tCase ID\tSample ID\tSample Type"
# (file uuid, patient, sample id, sample type name, counts, tpm); values of the normal sample are far off
STAR_SAMPLES = [
    ("f1", "TCGA-05-4244", "TCGA-05-4244-01A", "Primary Tumor", (10, 4, 0, 2), (1.0, 3.0, 0.0, 6.0)),
    ("f2", "TCGA-05-4244", "TCGA-05-4244-01B", "Primary Tumor", (30, 8, 0, 4), (3.0, 5.0, 0.0, 10.0)),
    ("f3", "TCGA-05-4244", "TCGA-05-4244-11A", "Solid Tissue Normal", (999, 999, 0, 999), (999.0, 999.0, 0.0, 999.0)),
    ("f4", "TCGA-2Z-A9JE", "TCGA-2Z-A9JE-01A", "Primary Tumor", (5, 1, 1, 0), (7.0, 1.5, 0.5, 0.0)),
]


@pytest.fixture
def gdc_expression(tmp_path):
    """GDC-client layout (<file id>/<file name>) + the portal's sample sheet, with one MAF row too."""
    files = tmp_path / "gdc"
    rows = [SHEET_COLUMNS]
    for uuid, case, sample, kind, counts, tpm in STAR_SAMPLES:
        name = f"{uuid}.rna_seq.augmented_star_gene_counts.tsv"
        star_file(files / uuid / name, counts, tpm)
        rows.append(
            f"{uuid}\t{name}\tTranscriptome Profiling\tGene Expression Quantification\tTCGA-LUAD\t{case}\t{sample}\t{kind}"
        )
    rows.append(
        "m1\tm1.wxs.aliquot_ensemble_masked.maf.gz\tSimple Nucleotide Variation\tMasked Somatic Mutation\tTCGA-LUAD\tTCGA-05-4244, TCGA-05-4244\tTCGA-05-4244-10A, TCGA-05-4244-01A\tBlood Derived Normal, Primary Tumor"
    )
    sheet = tmp_path / "gdc_sample_sheet.tsv"
    sheet.write_text("\n".join(rows) + "\n")
    return sheet, files


def test_star_counts_file_sums_shared_symbols_and_skips_summary_rows(gdc_expression):
    _, files = gdc_expression
    series = read_star_counts(files / "f1" / "f1.rna_seq.augmented_star_gene_counts.tsv", "unstranded")
    assert series.to_dict() == {"TP53": 10.0, "CD99": 4.0, "KRAS": 2.0}
    with pytest.raises(TargetError, match="value column 'tpm' is unknown"):
        read_star_counts(files / "f1" / "f1.rna_seq.augmented_star_gene_counts.tsv", "tpm")


def test_import_expression_tpm_averages_aliquots_and_skips_normals(gdc_expression, caplog):
    sheet, files = gdc_expression
    caplog.set_level(logging.INFO)
    table = import_gdc_expression(sheet, files)
    assert list(table.index) == ["TCGA-05-4244", "TCGA-2Z-A9JE"] and list(table.columns) == ["TP53", "CD99", "KRAS"]
    np.testing.assert_allclose(table.loc["TCGA-05-4244"], [2.0, 4.0, 8.0])  # mean of 01A and 01B; 11A left out
    np.testing.assert_allclose(table.loc["TCGA-2Z-A9JE"], [7.0, 2.0, 0.0])  # CD99 + CD99 PAR_Y
    assert "1 row(s) are not STAR - Counts files" in caplog.text and "1 of other types skipped" in caplog.text
    assert "averaged the samples of 1 patient(s) with several: TCGA-05-4244" in caplog.text


def test_import_expression_counts_and_other_sample_types(gdc_expression):
    sheet, files = gdc_expression
    counts = import_gdc_expression(sheet, files, value="unstranded")
    np.testing.assert_allclose(counts.loc["TCGA-05-4244"], [20.0, 6.0, 3.0])
    normals = import_gdc_expression(sheet, files, sample_types=[11])
    assert list(normals.index) == ["TCGA-05-4244"] and normals.iat[0, 0] == 999.0


def test_import_expression_reports_missing_and_unlisted_files(gdc_expression, caplog):
    sheet, files = gdc_expression
    (files / "f2" / "f2.rna_seq.augmented_star_gene_counts.tsv").rename(
        files / "stray.rna_seq.augmented_star_gene_counts.tsv"
    )
    table = import_gdc_expression(sheet, files)
    np.testing.assert_allclose(table.loc["TCGA-05-4244"], [1.0, 3.0, 6.0])
    assert "1 file(s) of the sample sheet are not under" in caplog.text and "f2.rna_seq" in caplog.text
    assert "1 STAR - Counts file(s) under" in caplog.text and "not in the sample sheet" in caplog.text


def test_import_expression_problems(gdc_expression, tmp_path):
    sheet, files = gdc_expression
    broken = files / "f4" / "f4.rna_seq.augmented_star_gene_counts.tsv"
    broken.write_text(broken.read_text().replace("\t7.0\t", "\tNA\t"))
    with pytest.raises(
        TargetError,
        match=r"f4.rna_seq.augmented_star_gene_counts.tsv: column 'tpm_unstranded', gene ENSG00000141510.18: 'NA'",
    ):
        import_gdc_expression(sheet, files)
    star_file(broken, (1, 2, 3), (1.0, 2.0, 3.0))  # a gene short
    with pytest.raises(TargetError, match="its genes differ from those of"):
        import_gdc_expression(sheet, files)
    with pytest.raises(TargetError, match="no STAR - Counts file of sample types 02"):
        import_gdc_expression(sheet, files, sample_types=[2])
    no_sample = tmp_path / "sheet2.tsv"
    no_sample.write_text("File ID\tFile Name\tCase ID\nf1\tf1.rna_seq.augmented_star_gene_counts.tsv\tTCGA-05-4244\n")
    with pytest.raises(TargetError, match=r"sheet2.tsv: no column 'Sample ID'"):
        import_gdc_expression(no_sample, files)
    bad_id = tmp_path / "sheet3.tsv"
    bad_id.write_text("File Name\tSample ID\nf1.rna_seq.augmented_star_gene_counts.tsv\tsample-1\n")
    with pytest.raises(TargetError, match=r"sheet3.tsv: line 2, column 'Sample ID': 'sample-1' is not a TCGA barcode"):
        import_gdc_expression(bad_id, files)
    not_star = tmp_path / "other" / "x.rna_seq.augmented_star_gene_counts.tsv"
    not_star.parent.mkdir()
    not_star.write_text("# a comment\ngene\tvalue\nA\t1\n")
    other_sheet = tmp_path / "sheet4.tsv"
    other_sheet.write_text(f"File Name\tSample ID\n{not_star.name}\tTCGA-05-4244-01A\n")
    with pytest.raises(
        TargetError,
        match=r"x.rna_seq.augmented_star_gene_counts.tsv: no column 'gene_id', 'gene_name', 'tpm_unstranded'",
    ):
        import_gdc_expression(other_sheet, not_star.parent)


def test_cli_import_expression_then_read_expression(gdc_expression, tmp_path, capsys):
    sheet, files = gdc_expression
    out = tmp_path / "expression.tsv"
    assert main(["import-expression", str(sheet), str(files), "-o", str(out)]) == 0
    assert "2 patients x 3 genes (tpm_unstranded)" in capsys.readouterr().out
    table = read_expression(out, genes=["KRAS", "TP53"])
    np.testing.assert_allclose(table.loc["TCGA-05-4244"], np.log2([3.0, 9.0]))
    assert main(["import-expression", str(sheet), str(files), "-o", str(out), "--value", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: STAR - Counts value column 'nope' is unknown") and "Traceback" not in err


# --- MAF -----------------------------------------------------------------------------------------

MAF_HEADER = "Hugo_Symbol\tEntrez_Gene_Id\tCenter\tVariant_Classification\tVariant_Type\tTumor_Sample_Barcode\tMatched_Norm_Sample_Barcode\tHGVSp_Short"


def maf_text(variants):
    """A GDC-style MAF: `#` header lines, then (gene, class, tumour barcode) rows (a '#' inside a field, too)."""
    lines = ["#version gdc-1.0.0", "#filedate 20240101", "#annotation.spec gdc-2.0.0-aliquot-merged-masked", MAF_HEADER]
    lines += [
        f"{gene}\t0\tBI\t{kind}\tSNP\t{tumour}\t{tumour[:12]}-10A-01D-A000-09\tp.X1#" for gene, kind, tumour in variants
    ]
    return "\n".join(lines) + "\n"


P1, P2, P3, P4 = (f"TCGA-05-000{i}-01A-11D-A000-08" for i in range(1, 5))
VARIANTS = [
    ("TP53", "Missense_Mutation", P1),
    ("TP53", "Nonsense_Mutation", P1),  # twice in one patient counts once
    ("KRAS", "Silent", P1),
    ("TP53", "Frame_Shift_Del", P2),
    ("KRAS", "Missense_Mutation", P2),
    ("TTN", "Silent", P3),  # P3 has only a silent variant: listed, all 0
    ("STK11", "Splice_Site", P3),
    ("EGFR", "In_Frame_Del", "TCGA-05-0004-11A-01D-A000-08"),  # a normal sample: left out
    ("TTN", "3'UTR", P4),
    ("ALK", "Intron", P4),
]


def test_import_maf_binary_table_plain_and_gz(tmp_path):
    plain = tmp_path / "cohort.maf"
    plain.write_text(maf_text(VARIANTS))
    table = import_maf([plain], top=3)
    assert list(table.columns) == ["TP53", "KRAS", "STK11"]  # 2 patients, then ties at 1 alphabetical
    assert list(table.index) == ["TCGA-05-0001", "TCGA-05-0002", "TCGA-05-0003", "TCGA-05-0004"]
    assert table.to_dict(orient="list") == {"TP53": [1, 1, 0, 0], "KRAS": [0, 1, 0, 0], "STK11": [0, 0, 1, 0]}
    assert table.dtypes.unique().tolist() == [np.dtype("int8")]
    packed = tmp_path / "sub" / "cohort.maf.gz"
    packed.parent.mkdir()
    with gzip.open(packed, "wt") as handle:
        handle.write(maf_text(VARIANTS))
    pd.testing.assert_frame_equal(import_maf([tmp_path / "sub"], top=3), table)


def test_top_genes_ties_are_alphabetical_and_logged(tmp_path, caplog):
    maf = tmp_path / "x.maf"
    maf.write_text(
        maf_text(
            [
                ("ZNF1", "Missense_Mutation", P1),
                ("ABC1", "Missense_Mutation", P2),
                ("MID1", "Missense_Mutation", P3),
                ("TOP", "Missense_Mutation", P1),
                ("TOP", "Missense_Mutation", P2),
            ]
        )
    )
    table = import_maf([maf], top=2)
    assert list(table.columns) == ["TOP", "ABC1"]
    assert "genes ABC1, MID1, ZNF1 are mutated in 1 patients each" in caplog.text


def test_explicit_genes_across_several_files(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    (tmp_path / "a.maf").write_text(maf_text(VARIANTS[:3]))
    (tmp_path / "b.maf").write_text(maf_text(VARIANTS[3:]))
    table = import_maf([tmp_path / "a.maf", tmp_path / "b.maf"], genes=["KRAS", "EGFR", "TP53"])
    assert list(table.columns) == ["KRAS", "EGFR", "TP53"]
    assert table["EGFR"].sum() == 0 and table["TP53"].sum() == 2
    assert "have no qualifying variant in any patient (all 0): EGFR" in caplog.text
    assert "TCGA-05-0004-11A-01D-A000-08" in caplog.text  # the skipped normal sample is reported
    assert list(import_maf([tmp_path], genes=["TP53"], sample_types=[11]).index) == ["TCGA-05-0004"]


def test_maf_problems(tmp_path):
    bad = tmp_path / "bad.maf"
    bad.write_text(maf_text(VARIANTS).replace("Tumor_Sample_Barcode", "Tumor_Sample"))
    with pytest.raises(TargetError, match=r"bad.maf: no column 'Tumor_Sample_Barcode'.*is it a MAF file"):
        import_maf([bad])
    bad.write_text(maf_text([("TP53", "Missense_Mutation", "SAMPLE-1")]))
    with pytest.raises(TargetError, match=r"bad.maf: column 'Tumor_Sample_Barcode': 'SAMPLE-1' is not a TCGA barcode"):
        import_maf([bad])
    with pytest.raises(TargetError, match="not found"):
        import_maf([tmp_path / "none.maf"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TargetError, match=r"no \*.maf or \*.maf.gz file"):
        import_maf([tmp_path / "empty"])
    fake_gz = tmp_path / "fake.maf.gz"
    fake_gz.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(TargetError, match="fake.maf.gz: cannot read it as a MAF file"):
        import_maf([fake_gz])
    with pytest.raises(TargetError, match="--top must be at least 1"):
        import_maf([tmp_path / "bad.maf"], top=0)


def test_cli_import_maf_then_read_mutations(tmp_path, capsys):
    maf = tmp_path / "cohort.maf.gz"
    with gzip.open(maf, "wt") as handle:
        handle.write(maf_text(VARIANTS))
    out = tmp_path / "mutations.tsv"
    assert main(["import-maf", str(maf), "-o", str(out), "--top", "2"]) == 0
    assert "4 patients x 2 genes (TP53, KRAS)" in capsys.readouterr().out
    assert read_mutations(out).to_dict(orient="list") == {"TP53": [1, 1, 0, 0], "KRAS": [0, 1, 0, 0]}
    genes = tmp_path / "genes.txt"
    genes.write_text("STK11\nTP53\n")
    assert main(["import-maf", str(maf), "-o", str(out), "--genes", str(genes)]) == 0
    assert list(read_mutations(out).columns) == ["STK11", "TP53"]
    assert main(["import-maf", str(maf), "-o", str(out), "--genes", "EGFR", "ALK"]) == 0
    assert list(read_mutations(out).columns) == ["EGFR", "ALK"]
    assert main(["import-maf", str(tmp_path / "missing.maf"), "-o", str(out)]) == 2
    assert "missing.maf: MAF file or folder not found" in capsys.readouterr().err


# --- sample sheet from a folder of slides --------------------------------------------------------

SLIDES = [
    "a/TCGA-05-4244-01Z-00-DX1.11111111-aaaa-bbbb-cccc-000000000001.svs",
    "a/TCGA-05-4244-01Z-00-DX2.11111111-aaaa-bbbb-cccc-000000000002.svs",
    "b/TCGA-05-4244-01Z-00-DX1.22222222-aaaa-bbbb-cccc-000000000003.svs",  # same barcode again
    "b/TCGA-2Z-A9JE-01Z-00-DX1.33333333-aaaa-bbbb-cccc-000000000004.svs",
    "TCGA-2Z-A9JE-11A-01-TS1.44444444-aaaa-bbbb-cccc-000000000005.svs",  # normal tissue
    "notes.svs",
    "TCGA-55-1234-01Z-00-DX1.55555555-aaaa-bbbb-cccc-000000000006.svs.partial",  # unfinished download
]


@pytest.fixture
def slide_dir(tmp_path):
    folder = tmp_path / "slides"
    for name in SLIDES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    return folder


def test_sheet_from_tcga(slide_dir, caplog):
    samples, skipped = sheet_from_tcga(slide_dir, "TCGA-LUAD")
    assert [s.slide_id for s in samples] == [
        "TCGA-05-4244-01Z-00-DX1",
        "TCGA-05-4244-01Z-00-DX2",
        "TCGA-05-4244-01Z-00-DX1_2",
        "TCGA-2Z-A9JE-01Z-00-DX1",
    ]
    assert [s.patient_id for s in samples] == ["TCGA-05-4244"] * 3 + ["TCGA-2Z-A9JE"]
    assert [s.site for s in samples] == ["05", "05", "05", "2Z"]
    assert {s.cohort for s in samples} == {"TCGA-LUAD"} and all(s.mpp is None for s in samples)
    assert samples[2].path == (slide_dir / SLIDES[2]).as_posix()
    assert [(p.name, reason) for p, reason in skipped] == [
        (SLIDES[4], "sample type 11, not 01"),
        ("notes.svs", "the file name does not start with a TCGA barcode"),
    ]
    assert "barcode TCGA-05-4244-01Z-00-DX1 names 2 slides" in caplog.text


def test_written_sheet_passes_the_sample_sheet_schema(slide_dir, tmp_path):
    samples, _ = sheet_from_tcga(slide_dir, "TCGA-LUAD", sample_types=[1, 11])
    assert len(samples) == 5
    sheet = tmp_path / "samples.tsv"
    write_sample_sheet(samples, sheet)
    assert sheet.read_text().splitlines()[0] == "cohort\tslide_id\tpatient_id\tpath\tmpp\tsite\tbackend"
    assert load_samples(sheet) == samples


def test_sheet_problems(slide_dir, tmp_path):
    with pytest.raises(TargetError, match="cohort 'TCGA LUAD'"):
        sheet_from_tcga(slide_dir, "TCGA LUAD")
    with pytest.raises(TargetError, match="slide folder not found"):
        sheet_from_tcga(tmp_path / "none", "c")
    with pytest.raises(TargetError, match=r"no TCGA slide \(\*.svs\) of sample type 06; 6 skipped"):
        sheet_from_tcga(slide_dir, "c", sample_types=[6])


def test_cli_sheet_from_tcga(slide_dir, tmp_path, capsys):
    out = tmp_path / "samples.tsv"
    assert main(["sheet-from-tcga", str(slide_dir), "--cohort", "TCGA-LUAD", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "4 slides of 2 patients; 2 skipped" in printed
        and "notes.svs: the file name does not start with a TCGA barcode" in printed
    )
    assert len(load_samples(out)) == 4
    assert main(["sheet-from-tcga", str(slide_dir), "--cohort", "bad name", "-o", str(out)]) == 2
    assert "error: cohort 'bad name'" in capsys.readouterr().err
