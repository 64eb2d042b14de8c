"""The Zarr feature store: chunked writes, resume, atomic completion, validation, verification, one writer at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pathwsi.features.store import (
    MANIFEST,
    PROGRESS,
    SCHEMA,
    StoreError,
    describe,
    open_store,
    open_writer,
    partial_path,
    verify_store,
)

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
    open_writer(unfinished, coords(10), np.ones(10, np.float32), {"a": 3}, ATTRS, 4).write_chunk(
        0, {"a": np.zeros((4, 3))}
    )
    assert main(["inspect", str(unfinished)]) == 1
    assert "stored 1 chunk(s) under .partial" in capsys.readouterr().out


# -- a complete store is verifiable; damage is never read as data ------------------------------------


def chunk_file(path, name="features/a", index=1):
    return path / name / "c" / str(index) / "0"


def test_every_chunk_is_written_with_a_checksum_and_listed_in_the_manifest(tmp_path):
    path = write_all(tmp_path / "s.zarr")  # chunk 0 of features/a holds only zeros, the fill value
    assert chunk_file(path, index=0).is_file()
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["chunks"] == {"coords": 3, "tissue": 3, "readable": 3, "features/a": 3}
    assert "features/a/c/0/0" in manifest["files"] and "zarr.json" in manifest["files"]
    assert verify_store(path) == [] and describe(path, verify=True)["verified"] is True


def test_a_missing_chunk_is_refused_not_read_as_zeros(tmp_path):
    path = write_all(tmp_path / "s.zarr")
    chunk_file(path).unlink()
    with pytest.raises(StoreError, match=r"s\.zarr: damaged store: features/a/c/1/0 is missing; delete it and rerun"):
        open_store(path)
    assert describe(path)["valid"] is False


def test_a_truncated_chunk_is_refused_and_named(tmp_path):
    path = write_all(tmp_path / "s.zarr")
    data = chunk_file(path).read_bytes()
    chunk_file(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(
        StoreError, match=rf"s\.zarr: damaged store: features/a/c/1/0 has {len(data) // 2} bytes, not {len(data)}"
    ):
        open_store(path)


def test_a_changed_byte_fails_verification_and_its_read(tmp_path, capsys):
    from pathwsi.cli import main

    path = write_all(tmp_path / "s.zarr")
    data = bytearray(chunk_file(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk_file(path).write_bytes(bytes(data))
    assert verify_store(path) == ["features/a/c/1/0 has changed (SHA-256 differs)"]
    assert main(["inspect", str(path), "--verify"]) == 1
    assert "features/a/c/1/0 has changed" in capsys.readouterr().out
    with pytest.raises(ValueError, match="checksum"):  # the chunk's CRC32C: never decoded into wrong numbers
        open_store(path).features("a")[:]


def test_a_store_of_an_older_schema_is_refused_with_what_to_do(tmp_path):
    path = write_all(tmp_path / "s.zarr")
    metadata = json.loads((path / "zarr.json").read_text())
    metadata["attributes"]["schema"] = "pathwsi.features/1"
    (path / "zarr.json").write_text(json.dumps(metadata))
    with pytest.raises(
        StoreError, match=r"older pathwsi \(pathwsi.features/1\), without checksums; delete it and rerun"
    ):
        open_store(path)


def test_the_features_rule_reruns_stores_of_another_schema():
    rule = (Path(__file__).resolve().parent.parent / "workflow" / "rules" / "features.smk").read_text()
    assert f'store_schema="{SCHEMA}"' in rule


def test_unreadable_tiles_are_marked_nan_and_listed(tmp_path):
    path = tmp_path / "s.zarr"
    writer = open_writer(path, coords(10), np.ones(10, np.float32), {"a": 3}, ATTRS, 4)
    writer.write_chunk(0, {"a": np.ones((4, 3))}, {2: "JPEG tile 7 cannot be decoded"})
    writer.write_chunk(1, {"a": np.ones((4, 3))}, {5: "JPEG tile 9 cannot be decoded"})
    writer.write_chunk(2, {"a": np.ones((2, 3))})
    store = open_store(writer.finish())
    np.testing.assert_array_equal(store.readable(), [True, True, False, True, True, False, True, True, True, True])
    features = store.features("a")[:]
    assert np.isnan(features[[2, 5]]).all() and (features[store.readable()] == 1).all()
    assert store.attrs["unreadable_tiles"] == {
        "count": 2,
        "tiles": [
            {"index": 2, "x": 896, "y": 0, "reason": "JPEG tile 7 cannot be decoded"},
            {"index": 5, "x": 2240, "y": 0, "reason": "JPEG tile 9 cannot be decoded"},
        ],
    }
    assert describe(path)["valid"] is True  # NaN only where tiles are unreadable


# -- one writer at a time --------------------------------------------------------------------------

SECOND_WRITER = """
import sys, numpy as np
from pathwsi.features.store import open_writer
from test_store import ATTRS, coords
writer = open_writer(sys.argv[1], coords(10), np.linspace(0.5, 1, 10, dtype=np.float32), {"a": 3}, ATTRS, 4)
print("already complete" if writer.already_complete else f"resumed at chunk {writer.chunks_done}", flush=True)
if len(sys.argv) > 2:
    import time; time.sleep(600)
"""


def second_writer(path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", SECOND_WRITER, str(path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_second_writer_waits_and_keeps_the_store_the_first_finished(tmp_path):
    path = tmp_path / "s.zarr"
    first = open_writer(path, coords(10), np.linspace(0.5, 1, 10, dtype=np.float32), {"a": 3}, ATTRS, 4)
    first.write_chunk(0, {"a": np.full((4, 3), 0, np.float32)})
    second = second_writer(path)
    time.sleep(3)
    assert second.poll() is None  # waiting for the lock, touching nothing
    for index in (1, 2):
        first.write_chunk(index, {"a": np.full((first.chunk_end(index) - index * 4, 3), index, np.float32)})
    first.finish()
    out, err = second.communicate(timeout=60)
    assert out.strip() == "already complete" and "is being written by pid" in err
    assert verify_store(path) == [] and open_store(path).features("a")[-1, 0] == 2


def test_a_killed_writer_frees_the_lock(tmp_path):
    path = tmp_path / "s.zarr"
    holder = second_writer(path, "hold")
    assert holder.stdout.readline().strip() == "resumed at chunk 0"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.perf_counter()
    assert open_writer(path, coords(10), np.linspace(0.5, 1, 10, dtype=np.float32), {"a": 3}, ATTRS, 4).chunks_done == 0
    assert time.perf_counter() - started < 5
