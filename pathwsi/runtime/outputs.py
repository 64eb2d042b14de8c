"""Write outputs atomically and durably: a private temporary name in the same folder, flushed to
disk (fsync), then a rename, then an fsync of the folder.

A job killed mid-write leaves at most a hidden `.{name}.{pid}-{token}.partial`, never a truncated
output that a later run would take as finished; two jobs writing the same output (a leftover job
of a killed run and its rerun) never write into each other's temporary; and after a power cut a
renamed output holds its data (without the fsync the rename can reach the disk before the data).
`FSYNC = False` turns the fsyncs off (benchmarks/bench_durability.py measures what they cost).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FSYNC = True


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write a file or a folder to; published at `path` when the block
    ends without error (an existing file is replaced; an existing folder must be removed first), removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    try:
        yield temporary
        publish(temporary, path)
    finally:
        _remove(temporary)


def publish(written: Path, path: Path) -> None:
    """Flush `written` (a file, or a folder and everything in it) to disk and rename it onto `path`."""
    sync_tree(written)
    os.replace(written, path)
    sync_dir(path.parent)


def sync_tree(path: Path) -> None:
    """fsync a file, or every file and folder below a folder (then the folder itself)."""
    if not FSYNC:
        return
    if path.is_dir():
        for folder, _, files in os.walk(path, topdown=False):
            for name in files:
                _fsync(Path(folder) / name, os.O_RDONLY)
            sync_dir(Path(folder))
    else:
        _fsync(path, os.O_RDONLY)


def sync_dir(folder: Path) -> None:
    """fsync a folder, so that the names created or renamed in it are on disk."""
    if FSYNC:
        _fsync(folder, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text(text: str, path: Path) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write `data` as indented JSON, atomically."""
    write_text(json.dumps(data, indent=2, default=_plain) + "\n", path)


def write_table(columns: dict[str, np.ndarray], path: Path) -> None:
    """Write equal-length numpy columns as a Parquet table, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as temporary:
        pq.write_table(pa.table(columns), temporary)


RESULT_FLOATS = "%.6g"  # six significant digits in text tables: results, not float noise (0.9999999999999419)


def write_frame(
    frame: pd.DataFrame, path: Path, sep: str | None = None, float_format: str | None = RESULT_FLOATS
) -> None:
    """Write `frame` without its index, atomically: Parquet, CSV or TSV by the suffix of `path`, or text with
    separator `sep` when given; text floats in `float_format` (None: every digit)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        if sep is None and is_parquet(path):
            frame.to_parquet(temporary, index=False)
        else:
            frame.to_csv(temporary, sep=sep or text_separator(path), index=False, float_format=float_format)


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
