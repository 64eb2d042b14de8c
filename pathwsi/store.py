"""The per-slide feature store: a Zarr v3 group, written under a partial path, resumable by chunk.

Layout (DESIGN.md): arrays `coords` (N, 2) int64 level-0 px, `tissue` (N,) float32,
`features/<model>` (N, D), all chunked along tiles; attrs with the slide's ids, tile geometry,
stain parameters, each model's provenance, the package version, a hash of the settings that
shaped the result, and `complete: true`, written last.

Writing happens in `<store>.partial/`. After every chunk of tiles is written for every model,
`progress.json` (written atomically) records how many chunks are done; a killed job resumes
from there. When all chunks are in, `complete: true` is set and the folder is renamed into
place, so a store at the final path is always complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

log = logging.getLogger(__name__)
SCHEMA = "pathwsi.features/1"
PROGRESS = "progress.json"


class StoreError(Exception):
    """A store that is missing, incomplete or not a pathwsi feature store."""


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


@dataclass
class StoreWriter:
    """Writes one slide's features chunk by chunk under the partial path."""

    path: Path
    group: zarr.Group
    chunk_tiles: int
    chunks_done: int

    @property
    def n_tiles(self) -> int:
        return int(self.group["coords"].shape[0])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_tiles // self.chunk_tiles)

    def chunk_end(self, index: int) -> int:
        """One past the last tile of chunk `index`."""
        return min((index + 1) * self.chunk_tiles, self.n_tiles)

    @property
    def first_pending_tile(self) -> int:
        return min(self.chunks_done * self.chunk_tiles, self.n_tiles)

    def write_chunk(self, index: int, features: dict[str, np.ndarray]) -> None:
        """Write chunk `index` (all models), then record it as done."""
        if index != self.chunks_done:
            raise ValueError(f"chunks are written in order: expected chunk {self.chunks_done}, got {index}")
        start = index * self.chunk_tiles
        for name, values in features.items():
            array = self.group[f"features/{name}"]
            array[start : start + len(values)] = values.astype(array.dtype, copy=False)
        self.chunks_done += 1
        _write_progress(partial_path(self.path), self.chunks_done)

    def finish(self) -> Path:
        """Mark complete and move the store into place atomically; returns the final path."""
        if self.chunks_done != self.n_chunks:
            raise StoreError(f"{self.path}: {self.chunks_done} of {self.n_chunks} chunks written; cannot finish")
        self.group.attrs["complete"] = True
        partial = partial_path(self.path)
        (partial / PROGRESS).unlink(missing_ok=True)
        if self.path.exists():
            shutil.rmtree(self.path)
        partial.replace(self.path)
        return self.path


def open_writer(path: Path, coords: np.ndarray, tissue: np.ndarray, feature_dims: dict[str, int], attrs: dict[str, Any], chunk_tiles: int, dtype: str = "float16") -> StoreWriter:
    """Resume the partial store at `path` if it was started with the same attrs, else start anew."""
    partial = partial_path(path)
    resumed = _resume(partial, attrs, coords, chunk_tiles, dtype)
    if resumed is not None:
        return StoreWriter(path, resumed, chunk_tiles, _read_progress(partial))
    if partial.exists():
        shutil.rmtree(partial)
    group = zarr.open_group(str(partial), mode="w", zarr_format=3)
    n = len(coords)
    chunk = max(1, min(chunk_tiles, max(n, 1)))
    group.create_array("coords", shape=(n, 2), chunks=(chunk, 2), dtype="int64")[:] = coords
    group.create_array("tissue", shape=(n,), chunks=(chunk,), dtype="float32")[:] = tissue
    for name, dim in feature_dims.items():
        group.create_array(f"features/{name}", shape=(n, dim), chunks=(chunk, dim), dtype=dtype)
    group.attrs.update({**attrs, "schema": SCHEMA, "n_tiles": n, "chunk_tiles": chunk_tiles, "dtype": dtype})
    _write_progress(partial, 0)
    return StoreWriter(path, group, chunk_tiles, 0)


def _resume(partial: Path, attrs: dict[str, Any], coords: np.ndarray, chunk_tiles: int, dtype: str) -> zarr.Group | None:
    """The partial group when it matches these attrs, coordinates, chunk size and dtype and has
    progress, else None. Progress counts chunks, so a partial store written with other chunks
    (another features.batch_size or chunk_tiles) cannot be resumed: it is started over."""
    if not (partial / PROGRESS).is_file():
        return None
    try:
        group = zarr.open_group(str(partial), mode="r+", zarr_format=3)
        same = all(group.attrs.get(k) == json.loads(json.dumps(v)) for k, v in attrs.items())
        if same and (group.attrs.get("chunk_tiles"), group.attrs.get("dtype")) != (chunk_tiles, dtype):
            log.warning("%s: written in chunks of %s tiles (%s), this run writes %d (%s); starting it over",
                        partial, group.attrs.get("chunk_tiles"), group.attrs.get("dtype"), chunk_tiles, dtype)
            return None
        return group if same and np.array_equal(group["coords"][:], coords) else None
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _write_progress(partial: Path, chunks_done: int) -> None:
    tmp = partial / (PROGRESS + ".tmp")
    tmp.write_text(json.dumps({"chunks_done": chunks_done}))
    tmp.replace(partial / PROGRESS)


def _read_progress(partial: Path) -> int:
    return int(json.loads((partial / PROGRESS).read_text())["chunks_done"])


@dataclass(frozen=True)
class FeatureStore:
    """A complete store opened for reading."""

    path: Path
    group: zarr.Group

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def models(self) -> list[str]:
        return sorted(self.group["features"].array_keys()) if "features" in self.group else []

    def coords(self) -> np.ndarray:
        return self.group["coords"][:]

    def features(self, model: str) -> zarr.Array:
        return self.group[f"features/{model}"]


def open_store(path: Path) -> FeatureStore:
    """Open a finished store; raise StoreError unless it is a complete pathwsi store."""
    if not path.exists():
        hint = " (an unfinished run left a .partial store: rerun the workflow to resume it)" if partial_path(path).exists() else ""
        raise StoreError(f"{path}: no feature store here{hint}")
    try:
        # absolute: arrays sent to a remote dask cluster's workers must not depend on their directory
        group = zarr.open_group(str(path.resolve()), mode="r", zarr_format=3)
    except (FileNotFoundError, ValueError) as err:
        raise StoreError(f"{path}: not a Zarr v3 group ({err})") from err
    if group.attrs.get("schema") != SCHEMA:
        raise StoreError(f"{path}: not a pathwsi feature store (schema {group.attrs.get('schema')!r})")
    if group.attrs.get("complete") is not True:
        raise StoreError(f"{path}: incomplete store (`complete` is not true); do not use it, rerun the workflow")
    return FeatureStore(path, group)


def describe(path: Path) -> dict[str, Any]:
    """What `pathwsi inspect` prints: validity, counts, shapes, provenance."""
    report: dict[str, Any] = {"path": str(path)}
    try:
        store = open_store(path)
    except StoreError as err:
        report.update(valid=False, problem=str(err))
        partial = partial_path(path)
        if (partial / PROGRESS).is_file():
            report["partial_chunks_done"] = _read_progress(partial)
        return report
    problems = []
    n = store.group.attrs.get("n_tiles")
    arrays = {"coords": store.group["coords"], "tissue": store.group["tissue"], **{f"features/{m}": store.features(m) for m in store.models}}
    for name, array in arrays.items():
        if array.shape[0] != n:
            problems.append(f"{name} has {array.shape[0]} rows, attrs say {n} tiles")
    for model in store.models:
        sample = store.features(model)[: min(n or 0, 256)]
        if sample.size and not np.isfinite(sample).all():
            problems.append(f"features/{model} holds non-finite values")
    report.update(
        valid=not problems,
        problems=problems,
        arrays={name: {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)} for name, a in arrays.items()},
        attrs=store.attrs,
    )
    return report
