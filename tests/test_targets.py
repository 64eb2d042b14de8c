"""Target tables, gene lists, the expression transform and matching targets to feature patients."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pathwsi.predict.targets import (
    DEFAULT_GENE_LIST,
    TargetError,
    load_gene_list,
    match,
    read_expression,
    read_mutations,
    read_table,
    write_target_table,
)


def write(path, text):
    path.write_text(text)
    return path


def test_default_gene_list_is_danahers_60_markers_with_current_symbols():
    genes = load_gene_list()
    assert len(genes) == 60 and genes == load_gene_list("default") == load_gene_list(None)
    assert {"PTPRC", "CD8A", "FOXP3", "FAM30A", "TPSB2", "XCL2"} <= set(genes) and "KIAA0125" not in genes
    header = DEFAULT_GENE_LIST.read_text().splitlines()[:6]
    assert any("Danaher" in line and "Tumor Infiltrating Leukocytes" in line for line in header)
    cell_types = pd.read_csv(DEFAULT_GENE_LIST, sep="\t", comment="#")["cell_type"]
    assert cell_types.nunique() == 14


def test_gene_list_from_file_and_list(tmp_path, caplog):
    listing = write(tmp_path / "genes.txt", "# my genes\ngene\tnote\nTP53\tp53\n\nKRAS\nTP53\n")
    assert load_gene_list(listing) == ["TP53", "KRAS"]
    assert load_gene_list(str(listing)) == ["TP53", "KRAS"]
    assert "repeated" in caplog.text
    assert load_gene_list([" EGFR", "STK11", ""]) == ["EGFR", "STK11"]


@pytest.mark.parametrize("spec, expected", [([], "empty"), ("nowhere.txt", "nowhere.txt: gene list file not found")])
def test_gene_list_problems(spec, expected):
    with pytest.raises(TargetError, match=expected):
        load_gene_list(spec)


def test_empty_gene_file_is_an_error(tmp_path):
    with pytest.raises(TargetError, match="has no genes"):
        load_gene_list(write(tmp_path / "g.txt", "# nothing\ngene\n"))


EXPRESSION = "patient\tGZMA\tCD8A\tPTPRC\nP1\t0\t1\t3\nP2\t7\t15\t1\nP3\t1\t3\t0\n"


def test_read_expression_log2p1_selected_genes_first_column_ids(tmp_path):
    table = read_expression(write(tmp_path / "expr.tsv", EXPRESSION), genes=["CD8A", "GZMA", "NOPE"])
    assert list(table.index) == ["P1", "P2", "P3"] and table.index.name == "patient_id"
    assert list(table.columns) == ["GZMA", "CD8A"]  # file order; missing genes left to match()
    np.testing.assert_allclose(table["CD8A"], [1.0, 4.0, 2.0])
    np.testing.assert_allclose(table["GZMA"], [0.0, 3.0, 1.0])
    raw = read_expression(tmp_path / "expr.tsv", transform="none")
    assert raw.loc["P2", "PTPRC"] == 1.0 and raw.shape == (3, 3)


def test_named_id_column_csv_and_parquet(tmp_path):
    csv = write(tmp_path / "expr.csv", "GZMA,case,CD8A\n1,P1,3\n3,P2,7\n")
    table = read_expression(csv, id_column="case")
    assert list(table.index) == ["P1", "P2"] and list(table.columns) == ["GZMA", "CD8A"]
    np.testing.assert_allclose(table.to_numpy(), [[1, 2], [2, 3]])
    write_target_table(table, tmp_path / "expr.parquet")
    back = read_expression(tmp_path / "expr.parquet", transform="none")
    pd.testing.assert_frame_equal(back, table)
    assert not list(tmp_path.glob("*.partial"))


def test_ids_stay_strings(tmp_path):
    table = read_mutations(write(tmp_path / "m.tsv", "id\tTP53\n007\t1\n010\t0\n"))
    assert list(table.index) == ["007", "010"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "p\tGZMA\nP1\t1\nP2\tlow\n",
            r"expr.tsv: column 'GZMA', patient 'P2' \(line 3\): 'low' is not a finite number",
        ),
        ("p\tGZMA\nP1\t\nP2\t1\n", r"column 'GZMA', patient 'P1' \(line 2\): is empty"),
        (
            "p\tGZMA\tCD8A\nP1\t1\t2\nP2\t3\t-0.5\n",
            r"column 'CD8A', patient 'P2' \(line 3\): -0.5 is negative.*transform to 'none'",
        ),
        ("p\tGZMA\nP1\t1\nP2\t2\nP1\t3\n", r"patient id 'P1' appears on line 2 and line 4"),
        ("p\tGZMA\tGZMA\nP1\t1\t2\n", r"column\(s\) GZMA appear more than once"),
        ("p\tGZMA\n\t1\n", r"line 2 has no patient id"),
    ],
)
def test_expression_problems_name_file_column_and_row(tmp_path, text, expected):
    with pytest.raises(TargetError, match=expected):
        read_expression(write(tmp_path / "expr.tsv", text))


def test_more_expression_problems(tmp_path):
    with pytest.raises(TargetError, match="missing.tsv: table not found"):
        read_expression(tmp_path / "missing.tsv")
    path = write(tmp_path / "expr.tsv", EXPRESSION)
    with pytest.raises(TargetError, match="no column 'case' for the patient id"):
        read_expression(path, id_column="case")
    with pytest.raises(TargetError, match="transform 'zscore' is unknown"):
        read_expression(path, transform="zscore")
    negative = write(tmp_path / "neg.tsv", "p\tG\nP1\t-2\n")
    assert read_expression(negative, transform="none").iat[0, 0] == -2.0


def test_only_requested_genes_are_validated(tmp_path):
    path = write(tmp_path / "expr.tsv", "p\tGOOD\tBROKEN\nP1\t1\tx\nP2\t3\ty\n")
    assert read_expression(path, ["GOOD"]).shape == (2, 1)
    assert read_table(path)["BROKEN"].tolist() == ["x", "y"]


def test_read_mutations(tmp_path):
    table = read_mutations(
        write(tmp_path / "mut.tsv", "patient_id\tTP53\tKRAS\nP1\t1\t0\nP2\t0.0\t1\n"), genes=["KRAS", "TP53"]
    )
    assert table.dtypes.unique().tolist() == [np.dtype("int8")]
    assert table.to_dict() == {"TP53": {"P1": 1, "P2": 0}, "KRAS": {"P1": 0, "P2": 1}}


@pytest.mark.parametrize("cell", ["2", "0.5", "-1"])
def test_mutation_values_outside_0_1(tmp_path, cell):
    path = write(tmp_path / "mut.tsv", f"patient_id\tTP53\tKRAS\nP1\t1\t0\nP2\t0\t{cell}\n")
    with pytest.raises(TargetError, match=r"mut.tsv: column 'KRAS', patient 'P2' \(line 3\): .* is not 0 or 1"):
        read_mutations(path)


def test_parquet_problems_give_the_row(tmp_path):
    pd.DataFrame({"patient_id": ["P1", "P2"], "TP53": [1, 3]}).to_parquet(tmp_path / "mut.parquet", index=False)
    with pytest.raises(TargetError, match=r"mut.parquet: column 'TP53', patient 'P2' \(row 2\): 3 is not 0 or 1"):
        read_mutations(tmp_path / "mut.parquet")


def targets_table() -> pd.DataFrame:
    index = pd.Index([f"P{i}" for i in range(1, 9)], name="patient_id")
    return pd.DataFrame(
        {"A": np.arange(8.0), "FLAT": 1.0, "EMPTY": np.nan, "B": [0, 1, 0, 1, 0, 1, 0, 1]},
        index=index,
    )


def test_match_aligns_to_feature_order_and_reports():
    features = ["P9", "P3", "P1", "P2", "P4", "P10", "P3", "P5"]
    aligned, report = match(features, targets_table(), genes=["B", "A", "FLAT", "EMPTY", "MISSING"], min_patients=5)
    assert list(aligned.index) == ["P3", "P1", "P2", "P4", "P5"]
    assert list(aligned.columns) == ["B", "A"]
    assert aligned.loc["P3", "A"] == 2.0
    assert report.features_without_targets == ["P9", "P10"]
    assert report.targets_without_features == ["P6", "P7", "P8"]
    assert report.genes_missing == ["MISSING"]
    assert report.genes_dropped == {"FLAT": "constant", "EMPTY": "all NaN"}
    summary = report.to_dict(shown=2)
    assert summary["matched_patients"] == {"count": 5, "first": ["P3", "P1"]}
    assert summary["patients_with_targets_but_no_features"] == {"count": 3, "first": ["P6", "P7"]}
    assert summary["genes_dropped"]["first"] == ["FLAT (constant)", "EMPTY (all NaN)"]
    lines = report.lines(shown=2)
    assert "patients with features but no targets: 2: P9, P10" in lines
    assert "patients with targets but no features: 3: P6, P7, ..." in lines
    assert "genes missing from table: 1: MISSING" in lines


def test_match_drops_genes_constant_among_matched_patients_only():
    aligned, report = match(["P1", "P3", "P5", "P7"], targets_table(), genes=["A", "B"], min_patients=4)
    assert list(aligned.columns) == ["A"] and report.genes_dropped == {"B": "constant"}


def test_match_all_columns_by_default():
    aligned, report = match([f"P{i}" for i in range(1, 9)], targets_table(), min_patients=8)
    assert list(aligned.columns) == ["A", "B"] and report.genes_missing == []


def test_match_problems():
    with pytest.raises(
        TargetError,
        match=r"only 2 patient\(s\) have both .* fewer than the 10 needed; 3 have features \(e.g. P1, P2, X\), 8 have targets",
    ):
        match(["P1", "P2", "X"], targets_table())
    with pytest.raises(TargetError, match="none of the 2 requested genes"):
        match([f"P{i}" for i in range(1, 9)], targets_table(), genes=["X", "Y"], min_patients=8)
    with pytest.raises(TargetError, match="all 2 genes are constant or empty"):
        match([f"P{i}" for i in range(1, 9)], targets_table(), genes=["FLAT", "EMPTY"], min_patients=8)
    twice = pd.DataFrame({"A": [1, 2]}, index=["P1", "P1"])
    with pytest.raises(TargetError, match="repeats patient id"):
        match(["P1"], twice, min_patients=1)


def test_write_target_table_tsv_round_trip(tmp_path):
    table = targets_table()[["A", "B"]]
    out = tmp_path / "sub" / "t.tsv"
    write_target_table(table, out)
    assert out.read_text().splitlines()[0] == "patient_id\tA\tB"
    pd.testing.assert_frame_equal(read_expression(out, transform="none"), table.astype("float64"))


def test_unreadable_tables_name_the_file(tmp_path):
    with pytest.raises(TargetError, match="fake.parquet: cannot read it as a Parquet table"):
        read_expression(write(tmp_path / "fake.parquet", "not parquet"))
    with pytest.raises(TargetError, match="empty.tsv: cannot read it"):
        read_expression(write(tmp_path / "empty.tsv", ""))


def test_a_table_with_a_header_but_no_rows_says_so(tmp_path):
    path = tmp_path / "expression.tsv"
    path.write_text("patient_id\tCD8A\tGZMB\n")
    with pytest.raises(
        TargetError, match=r"expression.tsv: the table has a header but no rows; add one row per patient"
    ):
        read_table(path)
