"""The per-slide feature store: a Zarr v3 group, written under a partial path, resumable by chunk,
verifiable once complete.

Layout (README "What the workflow does"): arrays `coords` (N, 2) int64 level-0 px, `tissue` (N,) float32, `readable` (N,)
bool (False for a tile that could not be read: its features are NaN), `features/<model>` (N, D),
all chunked along tiles; attrs with the slide's ids, tile geometry, stain parameters, each model's
provenance, the package version, a hash of the settings that shaped the result, the unreadable
tiles, and `complete: true`, written last.

Writing happens in `<store>.partial/`, by one process at a time: the writer holds an exclusive lock
on `<store>.lock` for its lifetime (released by the kernel when it dies), and a second writer waits.
After every chunk of tiles is written for every model, `progress.json` (written atomically) records
how many chunks are done; a killed job resumes from there. When all chunks are in, `complete: true`
is set, `manifest.json` records every file of the store with its size and SHA-256, everything is
flushed to disk and the folder is renamed into place, so a store at the final path is complete.

Every chunk is written (also one of fill values) with a CRC32C checksum that each read checks.
Opening a store checks that every file of its manifest is there with its size (a missing chunk is
never read as zeros); `verify_store` checks every byte against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from pathwsi.errors import PathwsiError
from pathwsi.runtime.locks import hold_exclusive
from pathwsi.runtime.outputs import publish, write_json

log = logging.getLogger(__name__)
SCHEMA = "pathwsi.features/2"  # 2: readable, CRC32C chunks, every chunk written, manifest.json
PROGRESS = "progress.json"
UNREADABLE = "unreadable.jsonl"  # while writing: one line per unreadable tile
MANIFEST = "manifest.json"
SHOWN_UNREADABLE = 100  # unreadable tiles listed in the attrs (all are counted)
ARRAY_OPTIONS: dict[str, Any] = {"compressors": (ZstdCodec(), Crc32cCodec()), "config": {"write_empty_chunks": True}}


class StoreError(PathwsiError):
    """A store that is missing, incomplete, damaged or not a pathwsi feature store; the message names it."""


def _member(group: zarr.Group, name: str) -> zarr.Array:
    """The array `name` of `group` (zarr types a member as array or group; every one read here is an array)."""
    return cast(zarr.Array, group[name])


def _subgroup(group: zarr.Group, name: str) -> zarr.Group:
    """The group `name` of `group` (zarr types a member as array or group)."""
    return cast(zarr.Group, group[name])


def _read(array: zarr.Array, selection: slice = slice(None)) -> np.ndarray:
    """`array[selection]` in memory (zarr types it as array or scalar; a slice reads an array)."""
    return cast(np.ndarray, array[selection])


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@dataclass
class StoreWriter:
    """Writes one slide's features chunk by chunk under the partial path, holding the store's lock."""

    path: Path
    group: zarr.Group | None  # None: the store was already complete (written by another process while this one waited)
    chunk_tiles: int
    chunks_done: int
    lock: IO[str] | None = field(default=None, repr=False)

    @property
    def n_tiles(self) -> int:
        return int(_member(self.group, "coords").shape[0]) if self.group is not None else 0

    @property
    def n_chunks(self) -> int:
        return -(-self.n_tiles // self.chunk_tiles)

    @property
    def already_complete(self) -> bool:
        return self.group is None

    def chunk_end(self, index: int) -> int:
        """One past the last tile of chunk `index`."""
        return min((index + 1) * self.chunk_tiles, self.n_tiles)

    @property
    def first_pending_tile(self) -> int:
        return min(self.chunks_done * self.chunk_tiles, self.n_tiles)

    def write_chunk(
        self, index: int, features: dict[str, np.ndarray], unreadable: dict[int, str] | None = None
    ) -> None:
        """Write chunk `index` (all models; `unreadable`: tile index -> why it could not be read), then record it as done."""
        if index != self.chunks_done:
            raise ValueError(f"chunks are written in order: expected chunk {self.chunks_done}, got {index}")
        start, end = index * self.chunk_tiles, self.chunk_end(index)
        unreadable = unreadable or {}
        readable = np.ones(end - start, bool)
        readable[np.asarray([i - start for i in unreadable], dtype=int)] = False
        for name, values in features.items():
            array = self._array(f"features/{name}")
            values = values.astype(array.dtype, copy=True)
            values[~readable] = np.nan
            array[start:end] = values
        self._array("readable")[start:end] = readable
        if unreadable:
            coords = _read(_member(self._writing(), "coords"), slice(start, end))
            with (partial_path(self.path) / UNREADABLE).open("a") as handle:
                for i, reason in sorted(unreadable.items()):
                    handle.write(
                        json.dumps(
                            {
                                "index": i,
                                "x": int(coords[i - start, 0]),
                                "y": int(coords[i - start, 1]),
                                "reason": reason,
                            }
                        )
                        + "\n"
                    )
        self.chunks_done += 1
        _write_progress(partial_path(self.path), self.chunks_done)

    def _writing(self) -> zarr.Group:
        """The group being written (a writer of an already complete store has none and writes nothing)."""
        assert self.group is not None, f"{self.path}: already complete, nothing to write"
        return self.group

    def _array(self, name: str) -> zarr.Array:
        """An array to write to: every chunk is written, also one of fill values (the manifest counts them)."""
        return _member(self._writing(), name).with_config({"write_empty_chunks": True})

    def finish(self) -> Path:
        """Record the unreadable tiles, mark complete, write the manifest and move the store into place
        (flushed to disk first); release the lock. Returns the final path."""
        if self.group is None:  # already complete
            self.close()
            return self.path
        if self.chunks_done != self.n_chunks:
            raise StoreError(f"{self.path}: {self.chunks_done} of {self.n_chunks} chunks written; cannot finish")
        partial = partial_path(self.path)
        self.group.attrs["unreadable_tiles"] = _unreadable_record(partial)
        self.group.attrs["complete"] = True
        for name in (PROGRESS, UNREADABLE):
            (partial / name).unlink(missing_ok=True)
        write_json(_manifest(partial, self.group), partial / MANIFEST)
        if self.path.exists():
            shutil.rmtree(self.path)
        publish(partial, self.path)
        self.close()
        return self.path

    def close(self) -> None:
        """Release the store's lock (the kernel does it too when the process ends)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def open_writer(
    path: Path,
    coords: np.ndarray,
    tissue: np.ndarray,
    feature_dims: dict[str, int],
    attrs: dict[str, Any],
    chunk_tiles: int,
    dtype: str = "float16",
) -> StoreWriter:
    """Take the store's lock (waiting while another writer has it); then resume the partial store at `path`
    if it was started with the same attrs, else start anew. A complete store with the same attrs that
    verifies (finished by the writer this one waited for) is kept as it is."""
    path = Path(path)
    lock = hold_exclusive(lock_path(path), f"feature store {path}")
    if _same_complete_store(path, attrs, coords):
        log.info("%s: already complete with these settings (written by another run); kept", path)
        return StoreWriter(path, None, chunk_tiles, 0, lock)
    partial = partial_path(path)
    resumed = _resume(partial, attrs, coords, chunk_tiles, dtype)
    if resumed is not None:
        return StoreWriter(path, resumed, chunk_tiles, _read_progress(partial), lock)
    if partial.exists():
        shutil.rmtree(partial)
    group = zarr.open_group(str(partial), mode="w", zarr_format=3)
    n = len(coords)
    chunk = max(1, min(chunk_tiles, max(n, 1)))
    group.create_array("coords", shape=(n, 2), chunks=(chunk, 2), dtype="int64", **ARRAY_OPTIONS)[:] = coords
    group.create_array("tissue", shape=(n,), chunks=(chunk,), dtype="float32", **ARRAY_OPTIONS)[:] = tissue
    group.create_array("readable", shape=(n,), chunks=(chunk,), dtype="bool", fill_value=False, **ARRAY_OPTIONS)
    for name, dim in feature_dims.items():
        group.create_array(f"features/{name}", shape=(n, dim), chunks=(chunk, dim), dtype=dtype, **ARRAY_OPTIONS)
    group.attrs.update({**attrs, "schema": SCHEMA, "n_tiles": n, "chunk_tiles": chunk_tiles, "dtype": dtype})
    _write_progress(partial, 0)
    return StoreWriter(path, group, chunk_tiles, 0, lock)


def _same_complete_store(path: Path, attrs: dict[str, Any], coords: np.ndarray) -> bool:
    if not path.exists():
        return False
    try:
        store = open_store(path)
    except StoreError:
        return False
    same = all(store.attrs.get(k) == json.loads(json.dumps(v)) for k, v in attrs.items())
    return same and np.array_equal(store.coords(), coords) and not verify_store(path)


def _resume(
    partial: Path, attrs: dict[str, Any], coords: np.ndarray, chunk_tiles: int, dtype: str
) -> zarr.Group | None:
    """The partial group when it matches these attrs, coordinates, chunk size and dtype and has
    progress, else None. Progress counts chunks, so a partial store written with other chunks
    (another features.batch_size or chunk_tiles) cannot be resumed: it is started over."""
    if not (partial / PROGRESS).is_file():
        return None
    try:
        group = zarr.open_group(str(partial), mode="r+", zarr_format=3)
        same = group.attrs.get("schema") == SCHEMA and all(
            group.attrs.get(k) == json.loads(json.dumps(v)) for k, v in attrs.items()
        )
        if same and (group.attrs.get("chunk_tiles"), group.attrs.get("dtype")) != (chunk_tiles, dtype):
            log.warning(
                "%s: written in chunks of %s tiles (%s), this run writes %d (%s); starting it over",
                partial,
                group.attrs.get("chunk_tiles"),
                group.attrs.get("dtype"),
                chunk_tiles,
                dtype,
            )
            return None
        return group if same and np.array_equal(_read(_member(group, "coords")), coords) else None
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _write_progress(partial: Path, chunks_done: int) -> None:
    tmp = partial / (PROGRESS + ".tmp")
    tmp.write_text(json.dumps({"chunks_done": chunks_done}))
    tmp.replace(partial / PROGRESS)


def _read_progress(partial: Path) -> int:
    return int(json.loads((partial / PROGRESS).read_text())["chunks_done"])


def _unreadable_record(partial: Path) -> dict[str, Any]:
    """Count and (the first SHOWN_UNREADABLE) tiles that could not be read, one per tile (a resumed chunk is written twice)."""
    source = partial / UNREADABLE
    tiles: dict[int, dict[str, Any]] = {}
    if source.is_file():
        for line in source.read_text().splitlines():
            record = json.loads(line)
            tiles[record["index"]] = record
    ordered = [tiles[i] for i in sorted(tiles)]
    return {"count": len(ordered), "tiles": ordered[:SHOWN_UNREADABLE]}


def _manifest(root: Path, group: zarr.Group) -> dict[str, Any]:
    """Every file of the store (size, SHA-256) and the chunk count of every array."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            file = Path(folder) / name
            files[file.relative_to(root).as_posix()] = [file.stat().st_size, _sha256(file)]
    arrays = {name: int(array.nchunks) for name, array in group.arrays()}
    arrays.update(
        {f"features/{name}": int(array.nchunks) for name, array in _subgroup(group, "features").arrays()}
        if "features" in group
        else {}
    )
    return {"files": dict(sorted(files.items())), "chunks": arrays}


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _manifest_problems(path: Path, deep: bool) -> list[str]:
    """What does not match the store's manifest: missing or resized files (and, if `deep`, changed bytes)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as err:
        return [f"{MANIFEST} missing or unreadable ({type(err).__name__})"]
    problems = []
    for name, count in manifest["chunks"].items():
        listed = sum(1 for f in manifest["files"] if f.startswith(f"{name}/c/"))
        if listed != count:
            problems.append(f"array {name}: {listed} of its {count} chunks in the manifest")
    for name, (size, digest) in manifest["files"].items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, not {size}")
        elif deep and _sha256(file) != digest:
            problems.append(f"{name} has changed (SHA-256 differs)")
    return problems


def verify_store(path: Path) -> list[str]:
    """Every byte of a complete store checked against its manifest; the problems found (none: it verifies)."""
    return _manifest_problems(Path(path), deep=True)


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
        return sorted(_subgroup(self.group, "features").array_keys()) if "features" in self.group else []

    def coords(self) -> np.ndarray:
        return _read(_member(self.group, "coords"))

    def readable(self) -> np.ndarray:
        """(N,) bool: the tiles that could be read (the others' features are NaN)."""
        return _read(_member(self.group, "readable"))

    def features(self, model: str) -> zarr.Array:
        return _member(self.group, f"features/{model}")


def open_store(path: Path) -> FeatureStore:
    """Open a finished store; raise StoreError unless it is a complete pathwsi store whose files are all
    there with the sizes its manifest records."""
    path = Path(path)
    if not path.exists():
        hint = (
            " (an unfinished run left a .partial store: rerun the workflow to resume it)"
            if partial_path(path).exists()
            else ""
        )
        raise StoreError(f"{path}: no feature store here{hint}")
    try:
        # absolute: arrays sent to a remote dask cluster's workers must not depend on their directory
        group = zarr.open_group(str(path.resolve()), mode="r", zarr_format=3)
    except (FileNotFoundError, ValueError) as err:
        raise StoreError(f"{path}: not a Zarr v3 group ({err})") from err
    schema = group.attrs.get("schema")
    if schema != SCHEMA:
        if isinstance(schema, str) and schema.startswith("pathwsi.features/"):
            what = f"written by an older pathwsi ({schema}), without checksums"
        else:
            what = f"not a pathwsi feature store (schema {schema!r})"
        raise StoreError(f"{path}: {what}; delete it and rerun the workflow to extract the slide again")
    if group.attrs.get("complete") is not True:
        raise StoreError(f"{path}: incomplete store (`complete` is not true); do not use it, rerun the workflow")
    problems = _manifest_problems(path, deep=False)
    if problems:
        raise StoreError(
            f"{path}: damaged store: {'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}; delete it and rerun the workflow to extract the slide again"
        )
    return FeatureStore(path, group)


def describe(path: Path, verify: bool = False) -> dict[str, Any]:
    """What `pathwsi inspect` prints: validity, counts, shapes, provenance; with `verify`, every byte checked."""
    report: dict[str, Any] = {"path": str(path)}
    try:
        store = open_store(path)
    except StoreError as err:
        report.update(valid=False, problem=str(err))
        partial = partial_path(path)
        if (partial / PROGRESS).is_file():
            report["partial_chunks_done"] = _read_progress(partial)
        return report
    problems = verify_store(path) if verify else []
    n: Any = store.group.attrs.get("n_tiles")  # a JSON value: the tile count in a valid store
    arrays = {name: _member(store.group, name) for name in ("coords", "tissue", "readable")}
    arrays.update({f"features/{m}": store.features(m) for m in store.models})
    for name, array in arrays.items():
        if array.shape[0] != n:
            problems.append(f"{name} has {array.shape[0]} rows, attrs say {n} tiles")
    try:
        readable = store.readable()[: min(n or 0, 256)]
        for model in store.models:
            sample = _read(store.features(model), slice(None, min(n or 0, 256)))[readable]
            if sample.size and not np.isfinite(sample).all():
                problems.append(f"features/{model} holds non-finite values")
    except ValueError as err:  # a chunk that fails its checksum
        problems.append(f"cannot be read: {err}")
    report.update(
        valid=not problems,
        problems=problems,
        verified=verify and not problems,
        arrays={
            name: {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)}
            for name, a in arrays.items()
        },
        attrs=store.attrs,
    )
    return report
