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

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd

from pathwsi.dask_scheduler import DaskScheduler, compute_options
from pathwsi.outputs import write_frame, write_json, write_table
from pathwsi.store import FeatureStore, StoreError, open_store

log = logging.getLogger(__name__)
QUANTILE_BLOCK = 128  # features per block when a quantile needs every tile of a feature
_QUANTILE = re.compile(r"^q(\d{1,2}|100)$")
_STREAMING = {"mean": da.mean, "std": da.std, "min": da.min, "max": da.max}


class AggregateError(ValueError):
    """The stores of a cohort cannot be aggregated together; the message says which and why."""


def check_statistics(names: list[str]) -> list[str]:
    """The statistics as given, or AggregateError naming the unknown ones (mean, std, min, max, q0..q100)."""
    unknown = [n for n in names if n not in _STREAMING and not _QUANTILE.match(n)]
    if unknown or not names:
        raise AggregateError(f"aggregate.statistics: unknown {unknown or 'empty list'}; use mean, std, min, max or qNN (q0..q100, e.g. q50)")
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


def aggregate_cohort(entries: list[SlideEntry], models: list[str], statistics: list[str], scheduler: DaskScheduler = DaskScheduler()) -> CohortFeatures:
    """Slide- and patient-level features of every model from the cohort's usable stores, computed by `scheduler`."""
    statistics = check_statistics(statistics)
    usable, rows = _usable_stores(entries, models)
    provenance = _model_provenance(usable, models)
    slides: dict[str, pd.DataFrame] = {}
    patients: dict[str, pd.DataFrame] = {}
    patient_of = {e.slide_id: e.patient_id for e in entries}
    patient_ids = sorted({patient_of[s] for s in usable})
    with compute_options(scheduler) as options:
        for model in models:
            arrays = {slide: da.from_zarr(store.features(model)) for slide, store in usable.items()}
            dim = next(iter(arrays.values())).shape[1] if arrays else 0
            per_slide = [reduce_tiles(arrays[s], statistics) for s in usable]
            per_patient = [reduce_tiles(da.concatenate([arrays[s] for s in usable if patient_of[s] == p]), statistics) for p in patient_ids]
            slide_values, patient_values = dask.compute(per_slide, per_patient, **options)
            columns = feature_columns(statistics, dim)
            slides[model] = _frame(slide_values, list(usable), "slide_id", columns)
            patients[model] = _frame(patient_values, patient_ids, "patient_id", columns)
    slide_table = pd.DataFrame(rows, columns=["slide_id", "patient_id", "status", "reason", "n_tiles"])
    used = slide_table[slide_table.status == "used"]
    patient_table = used.groupby("patient_id", sort=True).agg(n_slides=("slide_id", "size"), n_tiles=("n_tiles", "sum")).reset_index()
    return CohortFeatures(slides, patients, slide_table, patient_table, {"statistics": statistics, "models": provenance})


def _frame(values: list[np.ndarray], ids: list[str], index: str, columns: list[str]) -> pd.DataFrame:
    matrix = np.stack(values) if values else np.empty((0, len(columns)), np.float32)
    return pd.DataFrame(matrix, index=pd.Index(ids, name=index), columns=columns)


def _usable_stores(entries: list[SlideEntry], models: list[str]) -> tuple[dict[str, FeatureStore], list[list[Any]]]:
    """Complete, non-empty stores holding every model, by slide id; and a status row per slide."""
    usable: dict[str, FeatureStore] = {}
    rows: list[list[Any]] = []
    for entry in entries:
        store, reason = _open_usable(entry, models)
        n_tiles = int(store.attrs.get("n_tiles", 0)) if store else 0
        if store is None:
            log.warning("slide %s left out: %s", entry.slide_id, reason)
        else:
            usable[entry.slide_id] = store
        rows.append([entry.slide_id, entry.patient_id, "used" if store else "left_out", reason, n_tiles])
    return usable, rows


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
        return None, f"no tiles (tiling status {attrs.get('tiling_status')}: {attrs.get('tiling_reason') or 'no reason recorded'})"
    return store, ""


def _model_provenance(usable: dict[str, FeatureStore], models: list[str]) -> dict[str, Any]:
    """Each model's provenance, whose network must be the same in every store (no mixing of
    architectures, weights, input sizes or input normalization)."""
    provenance: dict[str, Any] = {}
    for model in models:
        by_network: dict[str, list[str]] = {}
        for slide, store in usable.items():
            record = store.attrs["models"][model]
            by_network.setdefault(_network(record), []).append(slide)
            provenance.setdefault(model, record)
        if len(by_network) > 1:
            groups = "; ".join(f"{network}: {', '.join(s[:3])}{' ...' if len(s) > 3 else ''}" for network, s in by_network.items())
            raise AggregateError(f"model '{model}': the cohort's stores were made with different networks ({groups}); rerun the features of the stale slides")
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


def write_cohort(result: CohortFeatures, outputs: AggregateOutputs) -> None:
    """Write the feature tables (Parquet), the slide and patient tables (TSV) and the provenance."""
    outputs.folder.mkdir(parents=True, exist_ok=True)
    for level, tables in (("slides", result.slides), ("patients", result.patients)):
        for model, frame in tables.items():
            index = frame.index.name
            write_table({index: frame.index.to_numpy(dtype=str), **{c: frame[c].to_numpy() for c in frame.columns}}, outputs.features(model, level))
    write_frame(result.slide_table, outputs.slides, sep="\t")
    write_frame(result.patient_table, outputs.patients, sep="\t")
    warnings = sorted({m["warning"] for m in result.provenance["models"].values() if m.get("warning")})
    write_json({**result.provenance, "warnings": warnings}, outputs.provenance)


def read_features(path: Path) -> pd.DataFrame:
    """An aggregated feature table written by `write_cohort`, indexed by slide or patient id."""
    frame = pd.read_parquet(path)
    return frame.set_index(frame.columns[0])
