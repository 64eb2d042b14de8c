"""Shared fixtures: small synthetic pyramidal slides with known geometry, made once per session, and
private folders for the fork servers that the tests start."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from stain_fixtures import LAB_B_STAINS, synth_he

from pathwsi.demo.slides import SyntheticTissue, write_slide
from pathwsi.runtime.forkserver import stop_servers

TISSUE = SyntheticTissue(900.0, 700.0, seed=11, tissue_cover=0.5, background_band=0.25)


@dataclass(frozen=True)
class SlideSet:
    """Files of one synthetic section scanned several ways, plus broken and empty slides."""

    tissue: SyntheticTissue
    svs_025: Path  # Aperio SVS, 0.25 µm/px, MPP in the description
    tiff_05: Path  # generic tiled TIFF, 0.5 µm/px, µm/px only in the resolution tags
    no_mpp: Path  # generic tiled TIFF without any µm/px
    blank: Path  # glass only
    corrupt: Path  # SVS cut short
    damaged_tiles: Path  # SVS with 4 KiB XOR-ed in the middle of the file: tiles of level 0 that do not decode
    not_a_slide: Path  # text file with a slide's name


@pytest.fixture(scope="session")
def slides(tmp_path_factory: pytest.TempPathFactory) -> SlideSet:
    folder = tmp_path_factory.mktemp("slides")
    svs = write_slide(folder / "section.svs", TISSUE, 0.25, "svs")
    tiff = write_slide(folder / "section.tiff", TISSUE, 0.5, "tiff")
    no_mpp = write_slide(folder / "no_mpp.tiff", TISSUE, 0.5, "tiff", record_mpp=False)
    blank = write_slide(folder / "blank.svs", SyntheticTissue(600.0, 500.0, seed=2, tissue_cover=0.0), 0.5, "svs")
    corrupt = folder / "corrupt.svs"
    corrupt.write_bytes(svs.read_bytes()[: svs.stat().st_size // 3])
    damaged = bytearray(svs.read_bytes())
    middle = len(damaged) // 2
    damaged[middle : middle + 4096] = bytes(b ^ 0xFF for b in damaged[middle : middle + 4096])
    damaged_tiles = folder / "damaged.svs"
    damaged_tiles.write_bytes(bytes(damaged))
    not_a_slide = folder / "notes.svs"
    not_a_slide.write_text("this is not a slide\n")
    return SlideSet(TISSUE, svs, tiff, no_mpp, blank, corrupt, damaged_tiles, not_a_slide)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread is as fast, and far faster when the shared cores are busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def fork_server_dir() -> Iterator[Path]:
    """A short private folder for fork servers (socket paths are limited to ~107 bytes); its servers are stopped at the end."""
    folder = Path(tempfile.mkdtemp(prefix="pwfs", dir="/tmp"))
    try:
        yield folder
    finally:
        stop_servers(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def tests_fork_servers() -> Iterator[None]:
    """Workflow runs started by the tests put their fork servers in a private TMPDIR, stopped when the
    session ends: the tests never use, nor leave behind, a server of the user's own runs."""
    with fork_server_dir() as folder:
        previous = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(folder)
        try:
            yield
        finally:
            if previous is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = previous


@pytest.fixture(scope="module")
def private_tmp() -> Iterator[Path]:
    """A TMPDIR whose fork server the tests of one module share."""
    with fork_server_dir() as folder:
        yield folder


@pytest.fixture
def fresh_tmp() -> Iterator[Path]:
    """A TMPDIR whose fork server one test starts itself."""
    with fork_server_dir() as folder:
        yield folder


@pytest.fixture(scope="module")
def target_image() -> np.ndarray:
    """A 256-px synthetic H&E tile of the reference stains: a normalization target."""
    return synth_he(256, seed=1)


@pytest.fixture(scope="module")
def source_image() -> np.ndarray:
    """A 256-px synthetic H&E tile of another lab's stains and concentrations: a slide to normalize."""
    return synth_he(256, stains=LAB_B_STAINS, max_conc=(1.4, 1.3), seed=2)
