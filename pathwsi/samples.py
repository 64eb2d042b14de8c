"""The sample sheet: its columns, one `Sample` per row, and its validation (every problem at once, each naming
the row, the slide and the column, with what to do)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from pathwsi.config import load_schema
from pathwsi.errors import ConfigError

REQUIRED_COLUMNS = ("cohort", "slide_id", "patient_id", "path")
OPTIONAL_COLUMNS = ("mpp", "site", "backend")
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS


@dataclass(frozen=True)
class Sample:
    """One row of the sample sheet."""

    cohort: str
    slide_id: str
    patient_id: str
    path: str
    mpp: float | None = None
    site: str | None = None
    backend: str | None = None  # the library that opens the slide; None: the config's `tiling.backend`


def load_samples(path: str | Path, check_files: bool = True, schema: dict[str, Any] | None = None) -> list[Sample]:
    """Read and validate the tab-separated sample sheet; raise ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            str(path),
            [
                "sample sheet not found; set `samples:` in the config to your sheet, or run `pathwsi demo` for the demo cohort"
            ],
        )
    schema = schema or load_schema("samples")
    with path.open(newline="", encoding="utf-8-sig") as handle:  # a spreadsheet's UTF-8 byte-order mark is fine
        rows = [row for row in csv.reader(handle, delimiter="\t") if row and not row[0].startswith("#")]
    if not rows:
        raise ConfigError(str(path), ["the sheet is empty; it needs a header row: " + "\t".join(REQUIRED_COLUMNS)])
    header, body = [h.strip() for h in rows[0]], rows[1:]
    problems = _header_problems(header)
    if any(column not in header for column in REQUIRED_COLUMNS):
        raise ConfigError(str(path), problems)
    samples: list[Sample] = []
    for line, row in enumerate(body, start=2):
        record, row_problems = _parse_row(header, row, line)
        if row_problems:
            problems += row_problems
            continue
        where = f"row {line} (slide_id '{record.get('slide_id', '?')}')"
        row_problems += sample_problems(record, where, schema)
        if check_files and isinstance(record.get("path"), str) and record["path"]:
            row_problems += _slide_file_problems(Path(record["path"]), where)
        problems += row_problems
        if not row_problems:
            samples.append(Sample(**record))
    problems += _duplicate_problems(body, header)
    if not body:
        problems.append(
            "the sheet has a header but no rows; add one row per slide"
            " (for the demo: `pathwsi demo`, then `snakemake --cores 2 --configfile demo/config.yaml`)"
        )
    if problems:
        raise ConfigError(str(path), problems)
    return samples


def _slide_file_problems(path: Path, where: str) -> list[str]:
    if path.is_dir() and not any(path.glob("*.dcm")):
        return [
            f"{where}: slide path '{path}' is a directory, not a slide file; give the file itself (for MIRAX, the .mrxs beside its folder; a folder is a slide only when it holds a DICOM-WSI series, *.dcm)"
        ]
    if path.is_dir():
        return []
    if not path.is_file():
        return [
            f"{where}: slide file '{path}' not found; fix the path (relative paths start from the directory you run snakemake in), or run `pathwsi demo` for the demo slides"
        ]
    return []


def sample_problems(
    record: dict[str, Any], where: str, schema: dict[str, Any] | None = None, called: dict[str, str] | None = None
) -> list[str]:
    """What is wrong with one sample-sheet row (as a dict of its columns), each naming `where` and the column, or
    what `called` calls it instead (a command's own flags: {"mpp": "--mpp"})."""
    validator = jsonschema.Draft202012Validator(schema or load_schema("samples"))
    named = called or {}
    return [
        f"{where}: {named.get(column, f'column {column!r}')} {err.message}; {_fix_for(column)}"
        for err in validator.iter_errors(record)
        for column in [_column_of(err)]
    ]


def _header_problems(header: list[str]) -> list[str]:
    known = set(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    problems = [
        f"missing column '{c}'; the header must name {', '.join(REQUIRED_COLUMNS)} (tab-separated)"
        for c in REQUIRED_COLUMNS
        if c not in header
    ]
    problems += [
        f"unknown column '{c}'; allowed columns are {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}"
        for c in header
        if c not in known
    ]
    problems += [f"column '{c}' appears more than once" for c in sorted({c for c in header if header.count(c) > 1})]
    return problems


def _parse_row(header: list[str], row: list[str], line: int) -> tuple[dict[str, Any], list[str]]:
    """Map a row onto the header; empty optional cells become None, mpp becomes a float."""
    if len(row) != len(header):
        return {}, [
            f"row {line}: has {len(row)} cells but the header has {len(header)}; check for missing or extra tabs"
        ]
    record: dict[str, Any] = {}
    problems: list[str] = []
    for column, cell in zip(header, (c.strip() for c in row)):
        if column not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
            continue
        if column in OPTIONAL_COLUMNS and cell == "":
            record[column] = None
        elif column == "mpp":
            try:
                value = float(cell)
                record[column] = value if math.isfinite(value) else cell
            except ValueError:
                record[column] = cell
        else:
            record[column] = cell
    return record, problems


def _column_of(err: jsonschema.ValidationError) -> str:
    if err.absolute_path:
        return str(err.absolute_path[0])
    return str(err.instance) if err.validator == "additionalProperties" else "?"


_FIXES = {
    "slide_id": "use only letters, digits, '.', '_' and '-' (it becomes a file name), not starting with '.' or '-'",
    "cohort": "use only letters, digits, '.', '_' and '-', not starting with '.' or '-'",
    "patient_id": "give the patient every slide belongs to (for TCGA, the first 12 characters of the barcode)",
    "path": "give the slide file's path",
    "mpp": "write the level-0 µm/px as a number (e.g. 0.25 for 40x, 0.5 for 20x), or leave it empty to use the file's value",
    "site": "give the tissue source site, or leave it empty",
    "backend": "write auto, openslide or tiatoolbox (the library that opens this slide), or leave it empty to use the config's tiling.backend",
}


def _fix_for(column: str) -> str:
    return _FIXES.get(column, "see config/README.md")


def _duplicate_problems(body: list[list[str]], header: list[str]) -> list[str]:
    if "slide_id" not in header:
        return []
    index = header.index("slide_id")
    seen: dict[str, int] = {}
    problems = []
    for line, row in enumerate(body, start=2):
        if len(row) <= index:
            continue
        slide_id = row[index].strip()
        if slide_id in seen:
            problems.append(
                f"row {line}: slide_id '{slide_id}' already used on row {seen[slide_id]}; slide ids must be unique across all cohorts"
            )
        else:
            seen[slide_id] = line
    return problems
