"""Aggregation: slide and patient features from Zarr stores with dask, left-out slides listed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pathwsi.features.store import open_writer, partial_path
from pathwsi.predict.aggregate import (
    AggregateError,
    AggregateOutputs,
    SlideEntry,
    aggregate_cohort,
    check_statistics,
    read_features,
    write_cohort,
)
from pathwsi.runtime.dask_scheduler import DaskScheduler, SchedulerError

DIM = 6


def write_store(
    path: Path,
    features: dict[str, np.ndarray],
    patient: str,
    chunk: int = 4,
    weights: str = "aaa",
    finish: bool = True,
    arch: str = "keras_xception",
    unreadable: dict[int, str] | None = None,
) -> Path:
    """A pathwsi store holding the given tile features (all chunks written)."""
    n = len(next(iter(features.values())))
    attrs = {
        "slide_id": path.stem,
        "patient_id": patient,
        "cohort": "c",
        "tiling_status": "ok" if n else "no_tissue",
        "tiling_reason": None if n else "no tissue found",
        "models": {m: {"arch": arch, "weights_sha256": weights, "warning": "UNTRAINED"} for m in features},
    }
    writer = open_writer(
        path, np.zeros((n, 2), np.int64), np.ones(n, np.float32), {m: DIM for m in features}, attrs, chunk, "float32"
    )
    for index in range(writer.n_chunks):
        start, end = index * chunk, writer.chunk_end(index)
        writer.write_chunk(
            index,
            {m: f[start:end] for m, f in features.items()},
            {i: r for i, r in (unreadable or {}).items() if start <= i < end},
        )
    return writer.finish() if finish else path


@pytest.fixture
def cohort(tmp_path):
    rng = np.random.default_rng(0)
    tiles = {
        name: {m: rng.normal(size=(n, DIM)).astype(np.float32) for m in ("imgnet", "ftx")}
        for name, n in (("s1", 10), ("s2", 3), ("s3", 7))
    }
    entries = [
        SlideEntry("s1", "p1", write_store(tmp_path / "s1.zarr", tiles["s1"], "p1")),
        SlideEntry("s2", "p1", write_store(tmp_path / "s2.zarr", tiles["s2"], "p1")),
        SlideEntry("s3", "p2", write_store(tmp_path / "s3.zarr", tiles["s3"], "p2")),
        SlideEntry(
            "empty",
            "p3",
            write_store(tmp_path / "empty.zarr", {m: np.zeros((0, DIM), np.float32) for m in ("imgnet", "ftx")}, "p3"),
        ),
        SlideEntry("missing", "p4", tmp_path / "missing.zarr"),
        SlideEntry("half", "p2", write_store(tmp_path / "half.zarr", tiles["s1"], "p2", finish=False)),
    ]
    return entries, tiles


def test_slide_and_patient_statistics_match_numpy(cohort):
    entries, tiles = cohort
    result = aggregate_cohort(entries, ["imgnet", "ftx"], ["mean", "std", "max", "q50"], DaskScheduler("synchronous"))
    for model in ("imgnet", "ftx"):
        slides = result.slides[model]
        assert list(slides.index) == ["s1", "s2", "s3"]
        for slide in ("s1", "s2", "s3"):
            t = tiles[slide][model]
            expected = np.concatenate([t.mean(0), t.std(0), t.max(0), np.median(t, 0)])
            np.testing.assert_allclose(slides.loc[slide].to_numpy(), expected, rtol=1e-5, atol=1e-6)
        pooled = np.concatenate([tiles["s1"][model], tiles["s2"][model]])
        patients = result.patients[model]
        assert list(patients.index) == ["p1", "p2"]
        np.testing.assert_allclose(
            patients.loc["p1", [f"mean_{i:04d}" for i in range(DIM)]].to_numpy(), pooled.mean(0), rtol=1e-5
        )
        np.testing.assert_allclose(patients.loc["p2"].to_numpy()[:DIM], tiles["s3"][model].mean(0), rtol=1e-5)


def test_left_out_slides_are_listed_with_their_reason(cohort):
    entries, _ = cohort
    table = aggregate_cohort(entries, ["imgnet"], ["mean"]).slide_table.set_index("slide_id")
    assert list(table.status) == ["used", "used", "used", "left_out", "left_out", "left_out"]
    assert "no tissue found" in table.loc["empty", "reason"]
    assert "no feature store" in table.loc["missing", "reason"]
    assert "partial" in table.loc["half", "reason"]
    assert partial_path(entries[-1].store).exists()


def test_incomplete_store_is_never_used(cohort):
    entries, tiles = cohort
    result = aggregate_cohort(entries, ["imgnet"], ["mean"])
    assert "half" not in result.slides["imgnet"].index
    np.testing.assert_allclose(result.patients["imgnet"].loc["p2"].to_numpy(), tiles["s3"]["imgnet"].mean(0), rtol=1e-5)


def test_written_tables_read_back(cohort, tmp_path):
    entries, _ = cohort
    result = aggregate_cohort(entries, ["imgnet", "ftx"], ["mean", "min"])
    outputs = AggregateOutputs(tmp_path / "agg")
    write_cohort(result, outputs)
    back = read_features(outputs.features("ftx", "patients"))
    assert back.index.name == "patient_id"
    np.testing.assert_array_equal(back.to_numpy(), result.patients["ftx"].to_numpy())
    assert outputs.slides.read_text().splitlines()[0].split("\t") == [
        "slide_id",
        "patient_id",
        "status",
        "reason",
        "n_tiles",
    ]
    assert "p1\t2\t13" in outputs.patients.read_text()


@pytest.mark.parametrize(
    ("field", "values", "shown"),
    [
        ("weights", ["old", "new"], "weights old"),
        ("arch", ["keras_xception", "legacy_xception"], "arch legacy_xception"),
    ],
)
def test_stores_of_different_networks_are_refused(tmp_path, field, values, shown):
    rng = np.random.default_rng(1)
    entries = [
        SlideEntry(
            f"s{i}",
            f"p{i}",
            write_store(tmp_path / f"s{i}.zarr", {"ftx": rng.normal(size=(5, DIM))}, f"p{i}", **{field: value}),
        )
        for i, value in enumerate(values)
    ]
    with pytest.raises(AggregateError, match=f"'ftx'.*different networks.*{shown}"):
        aggregate_cohort(entries, ["ftx"], ["mean"])


def test_unknown_statistic_is_named():
    assert check_statistics(["mean", "q5", "q100"]) == ["mean", "q5", "q100"]
    with pytest.raises(AggregateError, match="median"):
        check_statistics(["mean", "median"])


@pytest.mark.parametrize("how", ["local cluster", "address", "scheduler file"])
def test_distributed_scheduler_gives_the_local_result(cohort, tmp_path, how):
    from distributed import Client, LocalCluster

    entries, _ = cohort
    local = aggregate_cohort(entries, ["imgnet"], ["mean", "q50"], DaskScheduler("synchronous"))
    if how == "local cluster":
        result = aggregate_cohort(entries, ["imgnet"], ["mean", "q50"], DaskScheduler("distributed", workers=1))
    else:
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
            address = cluster.scheduler_address
            if how == "scheduler file":
                address = str(tmp_path / "scheduler.json")
                with Client(cluster) as client:
                    client.write_scheduler_file(address)
            result = aggregate_cohort(entries, ["imgnet"], ["mean", "q50"], DaskScheduler("distributed", address))
    pd.testing.assert_frame_equal(result.slides["imgnet"], local.slides["imgnet"])
    pd.testing.assert_frame_equal(result.patients["imgnet"], local.patients["imgnet"])


def test_an_unreachable_cluster_is_a_clear_error(cohort, tmp_path):
    entries, _ = cohort
    with pytest.raises(SchedulerError, match="scheduler_address 'tcp://127.0.0.1:9'.*no dask scheduler answers"):
        aggregate_cohort(
            entries, ["imgnet"], ["mean"], DaskScheduler("distributed", "tcp://127.0.0.1:9", connect_timeout_s=1)
        )
    missing = str(tmp_path / "scheduler.json")  # dask's Client would wait for it forever
    with pytest.raises(SchedulerError, match="no such scheduler file"):
        aggregate_cohort(entries, ["imgnet"], ["mean"], DaskScheduler("distributed", missing, connect_timeout_s=1))


def test_store_arrays_do_not_depend_on_the_working_directory(cohort, tmp_path, monkeypatch):
    """A remote dask worker unpickles the arrays elsewhere; relative store roots would read zeros there."""
    import pickle

    from pathwsi.features.store import open_store

    entries, tiles = cohort
    monkeypatch.chdir(entries[0].store.parent)
    array = open_store(Path(entries[0].store.name)).features("imgnet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(array))[:], tiles[entries[0].slide_id]["imgnet"].astype(array.dtype)
    )


def test_damaged_stores_are_named_and_left_out_and_the_rest_aggregated(tmp_path):
    rng = np.random.default_rng(3)
    tiles = {f"s{i}": {"ftx": rng.normal(size=(10, DIM)).astype(np.float32)} for i in range(3)}
    entries = [SlideEntry(s, f"p{s}", write_store(tmp_path / f"{s}.zarr", t, f"p{s}")) for s, t in tiles.items()]
    (tmp_path / "s0.zarr" / "features" / "ftx" / "c" / "1" / "0").unlink()  # a chunk deleted
    flipped = tmp_path / "s1.zarr" / "features" / "ftx" / "c" / "2" / "0"  # a byte changed: found only when read
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    result = aggregate_cohort(entries, ["ftx"], ["mean"], DaskScheduler("synchronous"))
    table = result.slide_table.set_index("slide_id")
    assert list(result.slides["ftx"].index) == ["s2"]
    assert "s0.zarr: damaged store: features/ftx/c/1/0 is missing" in table.loc["s0", "reason"]
    assert "s1.zarr: damaged store: features/ftx/c/2/0 has changed" in table.loc["s1", "reason"]
    assert list(table.status) == ["left_out", "left_out", "used"]
    np.testing.assert_allclose(result.slides["ftx"].loc["s2"].to_numpy(), tiles["s2"]["ftx"].mean(0), rtol=1e-5)


def test_unreadable_tiles_are_left_out_of_the_statistics(tmp_path):
    features = np.random.default_rng(4).normal(size=(10, DIM)).astype(np.float32)
    bad = {2: "JPEG tile 7 cannot be decoded", 9: "JPEG tile 12 cannot be decoded"}
    entries = [
        SlideEntry("s", "p", write_store(tmp_path / "s.zarr", {"ftx": features}, "p", unreadable=bad)),
        SlideEntry(
            "none",
            "q",
            write_store(tmp_path / "none.zarr", {"ftx": features[:3]}, "q", unreadable={0: "x", 1: "x", 2: "x"}),
        ),
    ]
    result = aggregate_cohort(entries, ["ftx"], ["mean", "max"], DaskScheduler("synchronous"))
    kept = np.delete(features, list(bad), axis=0)
    np.testing.assert_allclose(
        result.slides["ftx"].loc["s"].to_numpy(), np.concatenate([kept.mean(0), kept.max(0)]), rtol=1e-5
    )
    table = result.slide_table.set_index("slide_id")
    assert table.loc["s", "status"] == "used" and table.loc["s", "n_tiles"] == 8
    assert (
        table.loc["s", "reason"]
        == "2 of 10 tiles could not be read and are left out (first at level-0 (0, 0): JPEG tile 7 cannot be decoded)"
    )
    assert table.loc["none", "status"] == "left_out" and table.loc["none", "reason"].startswith(
        "none of its 3 tiles could be read"
    )
