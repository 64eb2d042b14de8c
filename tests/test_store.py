"""The Zarr feature store: chunked writes, resume, atomic completion, validation."""

from __future__ import annotations

import numpy as np
import pytest

from pathwsi.store import PROGRESS, StoreError, describe, open_store, open_writer, partial_path

ATTRS = {"slide_id": "s", "config_hash": "abc"}


def coords(n: int) -> np.ndarray:
    return np.stack([np.arange(n) * 448, np.zeros(n, np.int64)], axis=1)


def write_all(path, n=10, chunk=4, attrs=ATTRS):
    writer = open_writer(path, coords(n), np.linspace(0.5, 1, n, dtype=np.float32), {"a": 3}, attrs, chunk)
    for index in range(writer.chunks_done, writer.n_chunks):
        rows = writer.chunk_end(index) - index * chunk
        writer.write_chunk(index, {"a": np.full((rows, 3), index, np.float32)})
    return writer.finish()


def test_finished_store_is_complete_and_readable(tmp_path):
    path = write_all(tmp_path / "s.zarr")
    store = open_store(path)
    assert store.attrs["complete"] is True and store.attrs["n_tiles"] == 10 and store.models == ["a"]
    np.testing.assert_array_equal(store.features("a")[:, 0], [0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    assert store.features("a").dtype == np.float16 and store.features("a").chunks == (4, 3)
    assert not partial_path(path).exists() and not (path / PROGRESS).exists()
    assert describe(path)["valid"] is True


def test_unfinished_store_is_never_opened(tmp_path):
    path = tmp_path / "s.zarr"
    writer = open_writer(path, coords(10), np.ones(10, np.float32), {"a": 3}, ATTRS, 4)
    writer.write_chunk(0, {"a": np.zeros((4, 3))})
    with pytest.raises(StoreError, match="partial store"):
        open_store(path)
    report = describe(path)
    assert report["valid"] is False and report["partial_chunks_done"] == 1
    with pytest.raises(StoreError, match="cannot finish"):
        writer.finish()


def test_a_store_without_complete_is_refused(tmp_path):
    path = write_all(tmp_path / "s.zarr")
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    del group.attrs["complete"]
    with pytest.raises(StoreError, match="incomplete store"):
        open_store(path)


def test_resume_continues_after_the_last_recorded_chunk(tmp_path):
    path = tmp_path / "s.zarr"
    first = open_writer(path, coords(10), np.ones(10, np.float32), {"a": 3}, ATTRS, 4)
    first.write_chunk(0, {"a": np.zeros((4, 3))})
    resumed = open_writer(path, coords(10), np.ones(10, np.float32), {"a": 3}, ATTRS, 4)
    assert resumed.chunks_done == 1 and resumed.first_pending_tile == 4
    with pytest.raises(ValueError, match="expected chunk 1"):
        resumed.write_chunk(2, {"a": np.zeros((2, 3))})


@pytest.mark.parametrize("change", ["attrs", "coords"])
def test_a_partial_store_from_other_settings_is_started_over(tmp_path, change):
    path = tmp_path / "s.zarr"
    open_writer(path, coords(10), np.ones(10, np.float32), {"a": 3}, ATTRS, 4).write_chunk(0, {"a": np.zeros((4, 3))})
    attrs = {**ATTRS, "config_hash": "other"} if change == "attrs" else ATTRS
    tiles = coords(10) + (1 if change == "coords" else 0)
    assert open_writer(path, tiles, np.ones(10, np.float32), {"a": 3}, attrs, 4).chunks_done == 0


def test_resumed_store_equals_an_uninterrupted_one(tmp_path):
    whole = write_all(tmp_path / "whole.zarr")
    path = tmp_path / "resumed.zarr"
    writer = open_writer(path, coords(10), np.linspace(0.5, 1, 10, dtype=np.float32), {"a": 3}, ATTRS, 4)
    writer.write_chunk(0, {"a": np.full((4, 3), 0, np.float32)})
    resumed = write_all(path)
    a, b = open_store(whole), open_store(resumed)
    assert a.attrs == b.attrs
    for name in ("coords", "tissue", "features/a"):
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:])


def test_empty_slide_gives_a_valid_empty_store(tmp_path):
    path = write_all(tmp_path / "empty.zarr", n=0)
    store = open_store(path)
    assert store.features("a").shape == (0, 3) and store.coords().shape == (0, 2)
    assert describe(path)["valid"] is True


def test_inspect_command_reports_validity(tmp_path, capsys):
    from pathwsi.cli import main

    path = write_all(tmp_path / "s.zarr")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid and complete" in out and "features/a" in out
    unfinished = tmp_path / "u.zarr"
    open_writer(unfinished, coords(10), np.ones(10, np.float32), {"a": 3}, ATTRS, 4).write_chunk(0, {"a": np.zeros((4, 3))})
    assert main(["inspect", str(unfinished)]) == 1
    assert "stored 1 chunk(s) under .partial" in capsys.readouterr().out
