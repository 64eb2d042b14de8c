"""Slide- and patient-level features from the tile feature stores, reduced with dask.

Each statistic is a reduction over tiles that dask computes straight from the Zarr chunks, so
memory follows the chunk size, not the cohort: means, standard deviations, minima and maxima
stream over tile chunks; quantiles need every tile of a feature at once, so their input is
rechunked to all tiles x `QUANTILE_BLOCK` features.

A patient's features are the same statistics over the pooled tiles of all its usable slides
(so the mean weighs every tile once, not every slide). Only stores marked complete are read;
a slide whose store is missing, incomplete or empty (no tissue, failed tiling) is listed as
left out, with its reason, never silently dropped.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd

from pathwsi.errors import PathwsiError
from pathwsi.features.store import FeatureStore, StoreError, open_store, verify_store
from pathwsi.runtime.dask_scheduler import DaskScheduler, compute_options
from pathwsi.runtime.outputs import write_frame, write_json, write_table

log = logging.getLogger(__name__)
QUANTILE_BLOCK = 128  # features per block when a quantile needs every tile of a feature
_QUANTILE = re.compile(r"^q(\d{1,2}|100)$")
_STREAMING = {"mean": da.mean, "std": da.std, "min": da.min, "max": da.max}


class AggregateError(PathwsiError, ValueError):
    """The stores of a cohort cannot be aggregated together; the message says which and why."""


def check_statistics(names: list[str]) -> list[str]:
    """The statistics as given, or AggregateError naming the unknown ones (mean, std, min, max, q0..q100)."""
    unknown = [n for n in names if n not in _STREAMING and not _QUANTILE.match(n)]
    if unknown or not names:
        raise AggregateError(
            f"aggregate.statistics: unknown {unknown or 'empty list'}; use mean, std, min, max or qNN (q0..q100, e.g. q50)"
        )
    return list(names)


@dataclass(frozen=True)
class SlideEntry:
    """One sample-sheet slide of a cohort and its feature store."""

    slide_id: str
    patient_id: str
    store: Path


@dataclass(frozen=True)
class CohortFeatures:
    """Per model, slide- and patient-level feature tables (rows: ids), and who was used or left out."""

    slides: dict[str, pd.DataFrame]
    patients: dict[str, pd.DataFrame]
    slide_table: pd.DataFrame  # slide_id, patient_id, status (used/left_out), reason, n_tiles
    patient_table: pd.DataFrame  # patient_id, n_slides, n_tiles
    provenance: dict[str, Any]


def reduce_tiles(tiles: da.Array, statistics: list[str]) -> da.Array:
    """(n_tiles, dim) -> (len(statistics) * dim,) float32: each statistic over tiles, concatenated."""
    tiles = tiles.astype(np.float32)
    parts = []
    for name in statistics:
        if name in _STREAMING:
            parts.append(_STREAMING[name](tiles, axis=0))
        else:
            whole_columns = tiles.rechunk({0: -1, 1: QUANTILE_BLOCK})
            parts.append(da.quantile(whole_columns, int(name[1:]) / 100, axis=0, method="linear"))
    return da.concatenate(parts).astype(np.float32)


def feature_columns(statistics: list[str], dim: int) -> list[str]:
    """Column names of the reduced features: `{statistic}_{index:04d}`."""
    return [f"{name}_{i:04d}" for name in statistics for i in range(dim)]


def aggregate_cohort(
    entries: list[SlideEntry], models: list[str], statistics: list[str], scheduler: DaskScheduler = DaskScheduler()
) -> CohortFeatures:
    """Slide- and patient-level features of every model from the cohort's usable stores (their readable
    tiles), computed by `scheduler`. A store whose chunks fail their checksum while being read is verified,
    named and left out, and the rest computed again."""
    statistics = check_statistics(statistics)
    usable, rows = _usable_stores(entries, models)
    provenance = _model_provenance(usable, models)
    patient_of = {e.slide_id: e.patient_id for e in entries}
    try:
        slides, patients = _reduce(usable, patient_of, models, statistics, scheduler)
    except Exception:  # a chunk that fails its checksum or does not decode: which stores are damaged?
        damaged = {slide: problems for slide, entry in usable.items() if (problems := verify_store(entry.store.path))}
        if not damaged:
            raise
        for row in rows:
            if row[0] in damaged:
                row[2:] = [
                    "left_out",
                    f"{usable[row[0]].store.path}: damaged store: {'; '.join(damaged[row[0]][:3])}; delete it and rerun the workflow to extract the slide again",
                    0,
                ]
                log.warning("slide %s left out: %s", row[0], row[3])
        usable = {slide: entry for slide, entry in usable.items() if slide not in damaged}
        slides, patients = _reduce(usable, patient_of, models, statistics, scheduler)
    slide_table = pd.DataFrame(rows, columns=["slide_id", "patient_id", "status", "reason", "n_tiles"])
    used = slide_table[slide_table.status == "used"]
    patient_table = (
        used.groupby("patient_id", sort=True)
        .agg(n_slides=("slide_id", "size"), n_tiles=("n_tiles", "sum"))
        .reset_index()
    )
    return CohortFeatures(
        slides, patients, slide_table, patient_table, {"statistics": statistics, "models": provenance}
    )


@dataclass(frozen=True)
class UsableStore:
    """A store that aggregation reads, and which of its tiles (None: all; else the readable tiles' indices)."""

    store: FeatureStore
    tiles: np.ndarray | None

    def features(self, model: str) -> da.Array:
        array = da.from_zarr(self.store.features(model))
        return array if self.tiles is None else array[self.tiles]


def _reduce(
    usable: dict[str, UsableStore],
    patient_of: dict[str, str],
    models: list[str],
    statistics: list[str],
    scheduler: DaskScheduler,
) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """Per model, the slide and patient feature tables."""
    slides: dict[str, pd.DataFrame] = {}
    patients: dict[str, pd.DataFrame] = {}
    patient_ids = sorted({patient_of[s] for s in usable})
    with compute_options(scheduler) as options:
        for model in models:
            arrays = {slide: entry.features(model) for slide, entry in usable.items()}
            dim = next(iter(arrays.values())).shape[1] if arrays else 0
            per_slide = [reduce_tiles(arrays[s], statistics) for s in usable]
            per_patient = [
                reduce_tiles(da.concatenate([arrays[s] for s in usable if patient_of[s] == p]), statistics)
                for p in patient_ids
            ]
            slide_values, patient_values = dask.compute(per_slide, per_patient, **options)
            columns = feature_columns(statistics, dim)
            slides[model] = _frame(slide_values, list(usable), "slide_id", columns)
            patients[model] = _frame(patient_values, patient_ids, "patient_id", columns)
    return slides, patients


def _frame(values: list[np.ndarray], ids: list[str], index: str, columns: list[str]) -> pd.DataFrame:
    matrix = np.stack(values) if values else np.empty((0, len(columns)), np.float32)
    return pd.DataFrame(matrix, index=pd.Index(ids, name=index), columns=columns)


def _usable_stores(entries: list[SlideEntry], models: list[str]) -> tuple[dict[str, UsableStore], list[list[Any]]]:
    """Complete stores with readable tiles and every model, by slide id; and a status row per slide
    (slide, patient, used / left_out, reason, tiles used)."""
    usable: dict[str, UsableStore] = {}
    rows: list[list[Any]] = []
    for entry in entries:
        store, reason = _open_usable(entry, models)
        if store is None:
            log.warning("slide %s left out: %s", entry.slide_id, reason)
            rows.append([entry.slide_id, entry.patient_id, "left_out", reason, 0])
            continue
        readable = store.readable()
        unreadable = store.attrs.get("unreadable_tiles") or {}
        if not readable.any():
            reason = f"none of its {len(readable)} tiles could be read ({_first_unreadable(unreadable)})"
            log.warning("slide %s left out: %s", entry.slide_id, reason)
            rows.append([entry.slide_id, entry.patient_id, "left_out", reason, 0])
            continue
        partial = not readable.all()
        if partial:
            reason = f"{len(readable) - int(readable.sum())} of {len(readable)} tiles could not be read and are left out ({_first_unreadable(unreadable)})"
            log.warning("slide %s: %s", entry.slide_id, reason)
        usable[entry.slide_id] = UsableStore(store, np.flatnonzero(readable) if partial else None)
        rows.append([entry.slide_id, entry.patient_id, "used", reason, int(readable.sum())])
    return usable, rows


def _first_unreadable(record: dict[str, Any]) -> str:
    tiles = record.get("tiles") or []
    return (
        f"first at level-0 ({tiles[0]['x']}, {tiles[0]['y']}): {tiles[0]['reason']}" if tiles else "no reason recorded"
    )


def _open_usable(entry: SlideEntry, models: list[str]) -> tuple[FeatureStore | None, str]:
    try:
        store = open_store(entry.store)
    except StoreError as err:
        return None, str(err)
    missing = [m for m in models if m not in store.models]
    if missing:
        return None, f"store lacks features of {missing}; rerun its features job"
    if not store.attrs.get("n_tiles"):
        attrs = store.attrs
        return (
            None,
            f"no tiles (tiling status {attrs.get('tiling_status')}: {attrs.get('tiling_reason') or 'no reason recorded'})",
        )
    return store, ""


def _model_provenance(usable: dict[str, UsableStore], models: list[str]) -> dict[str, Any]:
    """Each model's provenance, whose network must be the same in every store (no mixing of
    architectures, weights, input sizes or input normalization)."""
    provenance: dict[str, Any] = {}
    for model in models:
        by_network: dict[str, list[str]] = {}
        for slide, entry in usable.items():
            record = entry.store.attrs["models"][model]
            by_network.setdefault(_network(record), []).append(slide)
            provenance.setdefault(model, record)
        if len(by_network) > 1:
            groups = "; ".join(
                f"{network}: {', '.join(s[:3])}{' ...' if len(s) > 3 else ''}" for network, s in by_network.items()
            )
            raise AggregateError(
                f"model '{model}': the cohort's stores were made with different networks ({groups}); rerun the features of the stale slides"
            )
    return provenance


def _network(record: dict[str, Any]) -> str:
    """What makes a model's features comparable between stores, as one readable string."""
    return f"arch {record.get('arch')} weights {str(record.get('weights_sha256'))[:12]} input {record.get('input_px')} px mean {record.get('mean')} std {record.get('std')}"


@dataclass(frozen=True)
class AggregateOutputs:
    """Where one cohort's aggregated features go."""

    folder: Path

    def features(self, model: str, level: str) -> Path:
        return self.folder / f"{model}.{level}.parquet"

    @property
    def slides(self) -> Path:
        return self.folder / "slides.tsv"

    @property
    def patients(self) -> Path:
        return self.folder / "patients.tsv"

    @property
    def provenance(self) -> Path:
        return self.folder / "provenance.json"

    def warnings(self) -> list[str]:
        """The provenance's warnings about the features (untrained weights); none when there is no provenance."""
        return json.loads(self.provenance.read_text())["warnings"] if self.provenance.is_file() else []


def write_cohort(result: CohortFeatures, outputs: AggregateOutputs) -> None:
    """Write the feature tables (Parquet), the slide and patient tables (TSV) and the provenance."""
    outputs.folder.mkdir(parents=True, exist_ok=True)
    for level, tables in (("slides", result.slides), ("patients", result.patients)):
        for model, frame in tables.items():
            index = str(frame.index.name)
            write_table(
                {index: frame.index.to_numpy(dtype=str), **{c: frame[c].to_numpy() for c in frame.columns}},
                outputs.features(model, level),
            )
    write_frame(result.slide_table, outputs.slides, sep="\t")
    write_frame(result.patient_table, outputs.patients, sep="\t")
    warnings = sorted({m["warning"] for m in result.provenance["models"].values() if m.get("warning")})
    write_json({**result.provenance, "warnings": warnings}, outputs.provenance)


def read_features(path: Path) -> pd.DataFrame:
    """An aggregated feature table written by `write_cohort`, indexed by slide or patient id."""
    frame = pd.read_parquet(path)
    return frame.set_index(frame.columns[0])
