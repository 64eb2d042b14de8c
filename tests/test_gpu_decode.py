"""features.reader gpu: stored JPEG tiles decoded in batches on the models' device (here the CPU) give the
exact reader's tiles; what it falls back to, and why; on CUDA, nvJPEG's tiles against libjpeg's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tile_reader import _write_rgb_jpeg_svs

from pathwsi.features import gpu_decode
from pathwsi.features.backbones import ModelSpec, build_backbone
from pathwsi.features.extract import ExtractSettings, extract_slide
from pathwsi.features.gpu_decode import CompressedTiles, DeviceDecoder, check_device_decode, resolve_reader
from pathwsi.features.store import open_store
from pathwsi.samples import Sample
from pathwsi.slides.readers import open_tile_reader
from pathwsi.slides.slide import Slide

pytestmark = pytest.mark.filterwarnings("ignore:model '.*' uses UNTRAINED weights")
TILE = 224
CPU = torch.device("cpu")


def corners(slide: Slide, mpp: float, odd: int = 0) -> np.ndarray:
    """A row-major grid of tile corners over the whole slide and past its edges, plus odd ones
    (sub-pixel positions and odd level pixels: the paths finished on the host)."""
    span = round(TILE * mpp / slide.mpp.value)
    grid = [(x, y) for y in range(-span // 2, slide.height + span, span) for x in range(-span, slide.width, span)]
    return np.array(grid + [(3, 5), (1001, 999), (slide.width - 301, slide.height - 201)][: 3 * bool(odd)], np.int64)


def device_tiles(path: Path, coords: np.ndarray, mpp: float, batch: int = 16, device=CPU) -> tuple[np.ndarray, list]:
    """Tiles through the worker dataset and the device decoder, and the decoder."""
    sample = Sample("c", "s", "p", str(path))
    dataset = CompressedTiles(sample, coords, TILE, mpp, 0, batch)
    with Slide(path) as slide:
        decoder = DeviceDecoder(open_tile_reader(slide, mpp, TILE, exact=True), device)
    tiles, reasons = [], []
    for index in range(len(dataset)):
        batch_tiles, batch_reasons = decoder(dataset[index])
        tiles.append(batch_tiles.cpu())
        reasons += batch_reasons
    return torch.cat(tiles).numpy(), [decoder, reasons]


def exact_tiles(path: Path, coords: np.ndarray, mpp: float) -> np.ndarray:
    with Slide(path) as slide, open_tile_reader(slide, mpp, TILE, exact=True) as reader:
        return np.stack([reader.read(int(x), int(y)) for x, y in coords])


@pytest.mark.parametrize(
    "mpp",
    [
        0.5,  # level 0 halved: decoded, halved and gathered on the device
        0.25,  # level 0 as is: gathered on the device
        1.0,  # level 1 (downsample 4), as is
        0.7,  # level 0 shrunk 2.8x: gathered on the device, resized on the host
    ],
)
def test_tiles_equal_the_exact_readers_on_the_cpu(slides, mpp):
    """Measured on the CPU: max and mean absolute difference 0 (torchvision's libjpeg-turbo decodes as imagecodecs')."""
    with Slide(slides.svs_025) as slide:
        coords = corners(slide, mpp, odd=True)
    ours, (_, reasons) = device_tiles(slides.svs_025, coords, mpp)
    assert ours.shape == (len(coords), TILE, TILE, 3) and not any(reasons)
    np.testing.assert_array_equal(ours, exact_tiles(slides.svs_025, coords, mpp))


def test_odd_sized_levels_have_white_past_their_edge(tmp_path):
    """A level whose width and height are odd: the halved pixel on the edge blends image and white, as in OpenSlide."""
    from pathwsi.demo.slides import SyntheticTissue, write_slide

    path = write_slide(tmp_path / "odd.tiff", SyntheticTissue(300.25, 250.5, seed=4, tissue_cover=0.8), 0.25, "tiff")
    with Slide(path) as slide:
        coords = corners(slide, 0.5)
    ours, _ = device_tiles(path, coords, 0.5)
    np.testing.assert_array_equal(ours, exact_tiles(path, coords, 0.5))


@pytest.mark.parametrize("kind", ["rgb", "ycbcr"])
def test_aperio_tiles_with_shared_tables_decode_as_the_exact_readers(tmp_path, kind):
    """Abbreviated tiles get the JPEGTables spliced in (and the Adobe marker for R, G, B components)."""
    path = _write_rgb_jpeg_svs(tmp_path / f"{kind}.svs", jfif=False, ycbcr=kind == "ycbcr")
    with Slide(path) as slide:
        coords = corners(slide, 0.5)
    ours, _ = device_tiles(path, coords, 0.5, batch=4)
    np.testing.assert_array_equal(ours, exact_tiles(path, coords, 0.5))


def test_a_row_major_walk_decodes_each_stored_tile_once(slides):
    with Slide(slides.svs_025) as slide:
        step = 2 * TILE
        coords = np.array([(x, y) for y in range(100, slide.height, step) for x in range(100, slide.width, step)])
        touched = {
            (row, col)
            for x, y in coords
            for row in range(y // 256, (min(y + step, slide.height) - 1) // 256 + 1)
            for col in range(x // 256, (min(x + step, slide.width) - 1) // 256 + 1)
        }
    _, (decoder, _) = device_tiles(slides.svs_025, coords, 0.5, batch=8)
    assert decoder.decodes == len(touched)


def test_damaged_stored_tiles_leave_out_only_the_tiles_that_need_them(slides, tmp_path):
    with Slide(slides.damaged_tiles) as slide:
        coords = corners(slide, 0.5)
    ours, (_, reasons) = device_tiles(slides.damaged_tiles, coords, 0.5)
    clean, _ = device_tiles(slides.svs_025, coords, 0.5)
    bad = np.array([bool(r) for r in reasons])
    assert 0 < bad.sum() < len(coords) // 4
    assert all("JPEG tile" in r and "cannot be decoded" in r for r in np.array(reasons)[bad])
    assert (ours[bad] == 0).all()
    np.testing.assert_array_equal(ours[~bad], clean[~bad])


def test_extraction_with_the_gpu_reader_on_the_cpu_equals_the_exact_reader(slides, tmp_path):
    sample, coords, fractions, meta = tiled_slide(slides.svs_025, tmp_path)
    nets = [build_backbone(ModelSpec("small", arch="test_resnet", input_px=64, seed=1))]
    settings = ExtractSettings(batch_size=8, chunk_tiles=16, num_workers=1)
    for reader in ("exact", "gpu"):
        extract_slide(
            sample, coords, fractions, meta, nets, replace(settings, reader=reader), tmp_path / f"{reader}.zarr"
        )
    exact, gpu = open_store(tmp_path / "exact.zarr"), open_store(tmp_path / "gpu.zarr")
    assert gpu.attrs["reader"] == "gpu" and gpu.attrs["config_hash"] != exact.attrs["config_hash"]
    np.testing.assert_array_equal(gpu.features("small")[:], exact.features("small")[:])


def test_auto_is_fast_on_the_cpu_and_gpu_falls_back_to_exact_without_jpeg_tiles(slides, tmp_path):
    import tifffile

    sample = Sample("c", "s", "p", str(slides.svs_025))
    assert resolve_reader("auto", CPU, sample, TILE, 0.5)[0] == "fast"
    assert resolve_reader("gpu", CPU, sample, TILE, 0.5)[0] == "gpu"
    assert resolve_reader("gpu", CPU, sample, None, None)[0] == "exact"  # no tiles: nothing to decode
    image = np.random.default_rng(1).integers(0, 256, (400, 500, 3), dtype=np.uint8)
    deflate = tmp_path / "deflate.tiff"
    tifffile.imwrite(deflate, image, tile=(256, 256), photometric="rgb", compression="zlib", resolution=(4e4, 4e4), resolutionunit="CENTIMETER", metadata=None)  # fmt: skip
    reader, why = resolve_reader("gpu", CPU, replace(sample, path=str(deflate)), TILE, 0.5)
    assert reader == "exact" and "not JPEG-tiled" in why and "ADOBE_DEFLATE" in why


def test_a_device_that_decodes_otherwise_is_not_used(slides, monkeypatch):
    """What guards against, say, nvJPEG converting R, G, B components as if they were YCbCr."""
    with Slide(slides.svs_025) as slide:
        assert check_device_decode(open_tile_reader(slide, 0.5, TILE, exact=True), CPU) is None
    decode = gpu_decode.decode_streams
    monkeypatch.setattr(
        gpu_decode, "decode_streams", lambda streams, device: [i.flip(0) for i in decode(streams, device)]
    )
    reader, why = resolve_reader("gpu", CPU, Sample("c", "s", "p", str(slides.svs_025)), TILE, 0.5)
    assert reader == "exact" and "differs from libjpeg's" in why


def test_the_reader_setting_accepts_gpu_and_auto():
    assert ExtractSettings(reader="gpu").reader == "gpu" and ExtractSettings(reader="auto").reader == "auto"


def tiled_slide(path: Path, folder: Path):
    """The slide tiled as the workflow does: sample, coords, tissue fractions, tiling record."""
    import pyarrow.parquet as pq

    from pathwsi.slides.tile_job import TilingJobSettings, TilingOutputs, tile_slide
    from pathwsi.slides.tile_record import TilesRecord

    sample = Sample("c", "section", "p", str(path))
    out = TilingOutputs.under(folder, "section")
    tile_slide(sample, TilingJobSettings(), out)
    table = pq.read_table(out.tiles)
    coords = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1)
    return sample, coords, table.column("tissue_fraction").to_numpy(), TilesRecord.load(out.meta)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_nvjpeg_tiles_are_close_to_the_exact_readers(slides, mpp, capsys):
    """nvJPEG against libjpeg-turbo: the tolerance asserted is DEVICE_TOLERANCE levels on average; the
    measured mean and max are printed (not measured on this project's CPU-only machine)."""
    with Slide(slides.svs_025) as slide:
        coords = corners(slide, mpp, odd=True)
    ours, (_, reasons) = device_tiles(slides.svs_025, coords, mpp, batch=32, device=torch.device("cuda"))
    diff = np.abs(ours.astype(int) - exact_tiles(slides.svs_025, coords, mpp))
    with capsys.disabled():
        print(
            f"\nnvJPEG vs exact reader at {mpp} µm/px, {len(coords)} tiles: mean {diff.mean():.3f}, max {diff.max()}, 99th pct {np.percentile(diff, 99):.0f}"
        )
    assert not any(reasons) and diff.mean() <= gpu_decode.DEVICE_TOLERANCE
