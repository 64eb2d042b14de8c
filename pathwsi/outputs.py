"""Write outputs atomically: a temporary name in the same folder, then a rename.

A job killed mid-write leaves at most a `.partial` file, never a truncated output that a
later run would take as finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write `data` as indented JSON, atomically."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, default=_plain) + "\n")
    partial.replace(path)


def write_table(columns: dict[str, np.ndarray], path: Path) -> None:
    """Write equal-length numpy columns as a Parquet table, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    partial = path.with_name(path.name + ".partial")
    pq.write_table(pa.table(columns), partial)
    partial.replace(path)


def write_frame(frame: pd.DataFrame, path: Path, sep: str | None = None) -> None:
    """Write `frame` without its index, atomically: Parquet, CSV or TSV by the suffix of `path`, or
    text with separator `sep` when given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    if sep is None and is_parquet(path):
        frame.to_parquet(partial, index=False)
    else:
        frame.to_csv(partial, sep=sep or text_separator(path), index=False)
    partial.replace(path)


def is_parquet(path: Path) -> bool:
    """Whether `path` names a Parquet file (by its suffix)."""
    return path.name.lower().endswith((".parquet", ".pq"))


def text_separator(path: Path) -> str:
    """The field separator of a text table: comma for .csv, else tab."""
    return "," if path.name.lower().endswith((".csv", ".csv.gz")) else "\t"


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars and arrays and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
