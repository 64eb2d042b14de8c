"""Write outputs atomically: a temporary name in the same folder, then a rename.

A job killed mid-write leaves at most a `.partial` file, never a truncated output that a
later run would take as finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


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


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars and arrays and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
