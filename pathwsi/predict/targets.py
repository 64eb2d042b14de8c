"""Prediction targets: patients × genes expression and mutation tables, gene lists, the expression
transform, and matching targets to the patients that have image features (with a report).

Tables are TSV, CSV or Parquet (by suffix), one row per patient; the patient id is the first column
or a named one. Every problem is a TargetError naming the file, the column or row, and the fix.
docs/targets.md explains the formats and defaults.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pathwsi.errors import PathwsiError
from pathwsi.runtime.outputs import is_parquet, text_separator, write_frame

log = logging.getLogger(__name__)
DEFAULT_GENE_LIST = resources.files("pathwsi").joinpath("data", "immune_genes.tsv")  # package data
TRANSFORMS = ("log2p1", "none")
ID_COLUMN = "patient_id"
SHOWN_IDS = 5  # ids listed per category in reports and errors


class TargetError(PathwsiError, ValueError):
    """A target table, gene list or TCGA file that cannot be used; the message says where and what to do."""


def load_gene_list(spec: str | Path | Sequence[str] | None = "default") -> list[str]:
    """Genes from a list of symbols, a file (the first tab-separated field of each line; `#` comments
    and a first line `gene` skipped), or "default"/None: the shipped immune gene list."""
    if spec is None or (isinstance(spec, str) and spec == "default"):
        return _genes_from_file(DEFAULT_GENE_LIST)
    if isinstance(spec, (str, Path)):
        return _genes_from_file(Path(spec))
    genes = _unique([str(g).strip() for g in spec if str(g).strip()], "the gene list")
    if not genes:
        raise TargetError("the gene list is empty; give gene symbols, a file with one gene per line, or 'default'")
    return genes


def _genes_from_file(path: Path | Traversable) -> list[str]:
    if not path.is_file():
        raise TargetError(
            f"{path}: gene list file not found; give a file with one gene symbol per line, a list of genes, or 'default' for the shipped immune gene list"
        )
    fields = [
        line.split("\t")[0].strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    if fields and fields[0].lower() == "gene":
        fields = fields[1:]
    genes = _unique([f for f in fields if f], str(path))
    if not genes:
        raise TargetError(f"{path}: the gene list has no genes; write one gene symbol per line")
    return genes


def _unique(items: list[str], source: str) -> list[str]:
    """`items` without repeats, in first-seen order; repeats are logged."""
    unique = list(dict.fromkeys(items))
    if len(unique) < len(items):
        repeated = sorted(i for i, n in Counter(items).items() if n > 1)
        log.warning(
            "%s: %d repeated entries ignored: %s", source, len(items) - len(unique), ", ".join(repeated[:SHOWN_IDS])
        )
    return unique


def read_table(path: Path, genes: Sequence[str] | None = None, id_column: str | None = None) -> pd.DataFrame:
    """The cells of a patients × genes table, indexed by patient id (unique, non-empty), with the
    `genes` it has (all columns when None); numeric columns come back as numbers, others as text."""
    path = Path(path)
    if not path.is_file():
        raise TargetError(f"{path}: table not found; give a TSV, CSV or Parquet file with one row per patient")
    with _reading(path):
        header = _header(path)
    repeated = sorted(h for h, n in Counter(header).items() if n > 1)
    if repeated:
        raise TargetError(f"{path}: column(s) {', '.join(repeated)} appear more than once; give each gene one column")
    if id_column is not None and id_column not in header:
        raise TargetError(
            f"{path}: no column '{id_column}' for the patient id; the columns start with {', '.join(header[:5])}"
        )
    id_at = header.index(id_column) if id_column is not None else 0
    wanted = set(header) - {header[id_at]} if genes is None else set(genes)
    positions = [id_at] + [i for i, h in enumerate(header) if i != id_at and h in wanted]
    with _reading(path):
        try:
            table = _read_columns(path, positions).set_axis([header[i] for i in positions], axis=1)
        except pd.errors.EmptyDataError:
            table = None
    if table is None or table.empty:
        raise TargetError(f"{path}: the table has a header but no rows; add one row per patient")
    raw_ids = table.iloc[:, 0]
    ids = raw_ids.astype(str).str.strip()
    _check_ids(path, ids, raw_ids.isna() | (ids == ""))
    return table.iloc[:, 1:].set_axis(pd.Index(ids, name=ID_COLUMN), axis=0)


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a failure to read or parse `path` into a TargetError naming it."""
    try:
        yield
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, pa.ArrowException) as err:
        raise TargetError(
            f"{path}: cannot read it as a {'Parquet' if is_parquet(path) else 'delimited text'} table: {err}"
        ) from err


def _header(path: Path) -> list[str]:
    if is_parquet(path):
        return [str(name) for name in pq.read_schema(path).names]
    first = pd.read_csv(path, sep=text_separator(path), header=None, nrows=1, dtype=str, keep_default_na=False)
    return [str(h).strip() for h in first.iloc[0]]


def _read_columns(path: Path, positions: list[int]) -> pd.DataFrame:
    """The columns at `positions` (in that order) of the table body."""
    if is_parquet(path):
        names = pq.read_schema(path).names
        return pq.read_table(path, columns=[names[i] for i in positions]).to_pandas(ignore_metadata=True)
    body = pd.read_csv(
        path, sep=text_separator(path), header=None, skiprows=1, usecols=positions, dtype={positions[0]: str}
    )
    return body[positions]


def _check_ids(path: Path, ids: pd.Series, empty: pd.Series) -> None:
    if empty.any():
        raise TargetError(
            f"{path}: {_where(path, int(np.argmax(empty.to_numpy())))} has no patient id; fill it in or delete the row"
        )
    repeated = ids[ids.duplicated(keep=False)]
    if len(repeated):
        first = repeated.iloc[0]
        rows = [_where(path, int(i)) for i in np.flatnonzero(ids == first)]
        raise TargetError(
            f"{path}: patient id '{first}' appears on {' and '.join(rows)} ({repeated.nunique()} id(s) repeat); give one row per patient, e.g. average its samples first (`pathwsi import-expression` does this for GDC files)"
        )


def _where(path: Path, row: int) -> str:
    """Human position of data row `row` (0-based): the file line for text tables (header = line 1)."""
    return f"row {row + 1}" if is_parquet(path) else f"line {row + 2}"


def _numeric(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Cells as float64; an empty, non-numeric or infinite cell is a TargetError naming it."""
    values = table.copy()
    for column in table.select_dtypes(exclude="number").columns:
        values[column] = pd.to_numeric(table[column], errors="coerce")
    values = values.astype("float64")
    bad = np.argwhere(~np.isfinite(values.to_numpy()))
    if len(bad):
        row, col = (int(i) for i in bad[0])
        raw: Any = table.iat[row, col]  # any cell value: a number, a string, None, ...
        what = "is empty" if pd.isna(raw) or str(raw).strip() == "" else f"'{raw}' is not a finite number"
        raise TargetError(
            f"{path}: {_cell(path, table, row, col)} {what}; every cell must be a number: fix it, or drop that gene (column) or patient (row)"
        )
    return values


def _cell(path: Path, table: pd.DataFrame, row: int, col: int) -> str:
    return f"column '{table.columns[col]}', patient '{table.index[row]}' ({_where(path, row)}):"


def read_expression(
    path: Path, genes: Sequence[str] | None = None, transform: str = "log2p1", id_column: str | None = None
) -> pd.DataFrame:
    """Expression of `genes` (those the table has; all when None) per patient, float64, transformed:
    "log2p1" = log2(x + 1) of non-negative values (TPM or counts), or "none"."""
    if transform not in TRANSFORMS:
        raise TargetError(f"expression transform '{transform}' is unknown; use one of {', '.join(TRANSFORMS)}")
    path = Path(path)
    values = _numeric(read_table(path, genes, id_column), path)
    if transform == "none":
        return values
    array = values.to_numpy()
    negative = np.argwhere(array < 0)
    if len(negative):
        row, col = (int(i) for i in negative[0])
        raise TargetError(
            f"{path}: {_cell(path, values, row, col)} {array[row, col]:g} is negative, so log2(x + 1) is undefined; give raw non-negative values (TPM or counts), or set the transform to 'none' if the table is already log-scaled"
        )
    return cast(pd.DataFrame, np.log2(values + 1.0))  # a ufunc keeps the DataFrame (numpy's stubs say ndarray)


def read_mutations(path: Path, genes: Sequence[str] | None = None, id_column: str | None = None) -> pd.DataFrame:
    """Mutation status (int8: 1 mutated, 0 not) of `genes` (those the table has; all when None) per patient."""
    path = Path(path)
    values = _numeric(read_table(path, genes, id_column), path)
    array = values.to_numpy()
    outside = np.argwhere(~np.isin(array, (0.0, 1.0)))
    if len(outside):
        row, col = (int(i) for i in outside[0])
        raise TargetError(
            f"{path}: {_cell(path, values, row, col)} {array[row, col]:g} is not 0 or 1; a mutation table holds 1 (mutated) or 0 (not) per patient and gene; `pathwsi import-maf` makes one from MAF files"
        )
    return values.astype("int8")


class IdListing(TypedDict):
    """One category of a MatchReport: how many ids it has, and the first few."""

    count: int
    first: list[str]


@dataclass(frozen=True)
class MatchReport:
    """How the targets met the patients with image features."""

    matched: list[str]  # patients with features and targets, in feature order
    features_without_targets: list[str]
    targets_without_features: list[str]
    genes_kept: list[str]
    genes_missing: list[str]  # requested, not in the table
    genes_dropped: dict[str, str]  # gene -> "constant" or "all NaN" among the matched patients

    def to_dict(self, shown: int = SHOWN_IDS) -> dict[str, IdListing]:
        """Counts and the first `shown` ids of each category, for JSON."""
        parts = {
            "matched_patients": self.matched,
            "patients_with_features_but_no_targets": self.features_without_targets,
            "patients_with_targets_but_no_features": self.targets_without_features,
            "genes_kept": self.genes_kept,
            "genes_missing_from_table": self.genes_missing,
            "genes_dropped": [f"{gene} ({why})" for gene, why in self.genes_dropped.items()],
        }
        return {name: {"count": len(ids), "first": list(ids[:shown])} for name, ids in parts.items()}

    def lines(self, shown: int = SHOWN_IDS) -> list[str]:
        """The report as a few log lines."""
        out = []
        for name, part in self.to_dict(shown).items():
            more = ", ..." if part["count"] > len(part["first"]) else ""
            listing = f": {', '.join(part['first'])}{more}" if part["count"] else ""
            out.append(f"{name.replace('_', ' ')}: {part['count']}{listing}")
        return out


def match(
    feature_patients: Iterable[str],
    target_table: pd.DataFrame,
    genes: Sequence[str] | None = None,
    min_patients: int = 10,
) -> tuple[pd.DataFrame, MatchReport]:
    """Targets of the patients that have features (rows in feature order) for the requested `genes`
    (all columns when None) that vary among them; raise TargetError if fewer than `min_patients`
    (e.g. 2 × folds) match or no gene is left."""
    features = list(dict.fromkeys(str(p) for p in feature_patients))
    targets = target_table.set_axis(target_table.index.astype(str), axis=0)
    if not targets.index.is_unique:
        raise TargetError(
            f"the target table repeats patient id(s) {', '.join(targets.index[targets.index.duplicated()].unique()[:SHOWN_IDS])}; give one row per patient"
        )
    have_targets, have_features = set(targets.index), set(features)
    requested = list(targets.columns) if genes is None else list(dict.fromkeys(genes))
    present = [g for g in requested if g in targets.columns]
    matched = [p for p in features if p in have_targets]
    aligned = targets.loc[matched, present]
    dropped = {
        g: "all NaN" if aligned[g].isna().all() else "constant" for g in present if aligned[g].nunique(dropna=True) < 2
    }
    report = MatchReport(
        matched=matched,
        features_without_targets=[p for p in features if p not in have_targets],
        targets_without_features=[p for p in targets.index if p not in have_features],
        genes_kept=[g for g in present if g not in dropped],
        genes_missing=[g for g in requested if g not in targets.columns],
        genes_dropped=dropped,
    )
    if len(matched) < min_patients:
        raise TargetError(
            f"only {len(matched)} patient(s) have both image features and targets, fewer than the {min_patients} needed; "
            f"{len(features)} have features (e.g. {', '.join(features[:3])}), {len(targets)} have targets (e.g. {', '.join(targets.index[:3])}); "
            "check that both use the same patient ids (for TCGA the 12-character barcode, e.g. TCGA-05-4244)"
        )
    if not present:
        raise TargetError(
            f"none of the {len(requested)} requested genes (e.g. {', '.join(requested[:3])}) is a column of the target table; check the gene list and that the table has one row per patient and one column per gene"
        )
    if not report.genes_kept:
        raise TargetError(
            f"all {len(present)} genes are constant or empty among the {len(matched)} matched patients; nothing to predict"
        )
    return aligned[report.genes_kept], report


def write_target_table(table: pd.DataFrame, path: Path) -> None:
    """Write a patients × genes table atomically, the patient id as its first column `patient_id`."""
    write_frame(table.rename_axis(ID_COLUMN).reset_index(), path, float_format=None)  # the user's values, exactly
