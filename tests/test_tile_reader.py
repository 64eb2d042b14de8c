"""Fast tile reading: read_region's pixels (exact) or close to them (DCT half-scale decode), stored tiles
decoded once, fallback, corrupt tiles, pickling."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from operator import methodcaller
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from pathwsi.demo.slides import SyntheticTissue, write_slide
from pathwsi.slides.readers import JpegTileReader, OpenSlideTileReader, _halve, _to_rgb, open_tile_reader
from pathwsi.slides.slide import Slide, SlideError, resize

TILE = 224
APERIO = "Aperio Image Library v12.0.15 \n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90|AppMag = 40|MPP = 0.25"


@pytest.fixture(scope="module")
def odd_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generic TIFF at 0.25 µm/px whose size is not a multiple of 4: level 1's downsample is not whole."""
    return write_slide(
        tmp_path_factory.mktemp("odd") / "odd.tiff",
        SyntheticTissue(300.25, 250.5, seed=4, tissue_cover=0.8),
        0.25,
        "tiff",
    )


@pytest.fixture(scope="module")
def files(slides, odd_tiff: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SVS and generic TIFF, each scanned at 0.25 and at 0.5 µm/px."""
    svs_05 = write_slide(
        tmp_path_factory.mktemp("svs05") / "svs05.svs",
        SyntheticTissue(300.0, 250.0, seed=6, tissue_cover=0.8),
        0.5,
        "svs",
    )
    return {"svs_025": slides.svs_025, "svs_05": svs_05, "tiff_025": odd_tiff, "tiff_05": slides.tiff_05}


@pytest.fixture(scope="module")
def aperio_rgb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Aperio-style SVS: photometric RGB, shared JPEGTables, tiles with no colour-space marker."""
    return _write_rgb_jpeg_svs(tmp_path_factory.mktemp("rgb") / "rgb.svs", jfif=False)


def _points(slide: Slide, mpp: float) -> list[tuple[int, int]]:
    """Tile corners inside, straddling stored-tile borders, at every edge, outside and negative."""
    ds = slide.level_for(mpp).downsample
    span = round(TILE * mpp / slide.mpp.value)  # level-0 px one tile covers
    w, h = slide.width, slide.height
    border = round(256 * ds)  # a stored-tile border, in level-0 px
    return [
        (round(8 * ds), round(8 * ds)),
        (border - 40, border - 24),
        (border - span // 2, 2 * border - span // 3),
        (w - span // 2, h // 3),
        (w // 4, h - span // 3),
        (w - span // 4, h - span // 4),
        (w + 10, 0),
        (-span // 2, -span // 3),
        (w // 2 + 1, h // 2 + 3),
        (2 * ((w - span // 3) // 2), 2 * ((h - span // 5) // 2)),  # even: the halved-tile path, at the far edge
    ]


def _assert_same(ours: np.ndarray, expected: np.ndarray, exact: bool) -> None:
    assert ours.shape == expected.shape == (TILE, TILE, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - expected.astype(int))
    if exact:
        assert diff.max() == 0
    else:  # sub-pixel positions: pixman's bilinear weights emulated, rounding may differ by a level or two
        assert diff.mean() < 0.5 and diff.max() <= 3


def _assert_close(ours: np.ndarray, expected: np.ndarray) -> None:
    """The DCT half-scale decode against read_region's BOX halving.

    Measured on these fixtures: mean at most 0.7, max 10; channel means up to 0.5 lower (BOX rounds up).
    """
    assert ours.shape == expected.shape == (TILE, TILE, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - expected.astype(int))
    assert diff.mean() < 1.5 and diff.max() <= 24
    assert np.abs(ours.mean((0, 1)) - expected.mean((0, 1))).max() < 1  # no colour cast


@pytest.mark.parametrize(
    "name, mpp, level",
    [
        ("svs_025", 0.25, 0),  # level 0 as is
        ("svs_025", 0.5, 0),  # level 0 halved (the feature-extraction case)
        ("tiff_025", 0.25, 0),
        ("tiff_025", 0.5, 0),  # level 0 halved, odd width and height: edge tiles half image, half white
        ("svs_05", 0.5, 0),
        ("svs_05", 1.0, 0),
        ("tiff_05", 0.5, 0),
        ("tiff_05", 0.7, 0),  # level 0 shrunk by a non-integer factor (PIL BOX)
        ("svs_025", 1.0, 1),  # served from level 1 (downsample 4)
        ("svs_025", 2.0, 1),  # level 1 halved
        ("tiff_025", 1.0, 1),  # level 1 with a non-integer downsample: sub-pixel positions
        ("svs_025", 0.2, 0),  # enlarged (bicubic)
    ],
)
def test_tiles_equal_read_region(files, name, mpp, level):
    with Slide(files[name]) as slide, open_tile_reader(slide, mpp, TILE, exact=True) as reader:
        assert isinstance(reader, JpegTileReader) and reader.level.index == level
        for x, y in _points(slide, mpp):
            ds = reader.level.downsample
            whole = (x < 0 or x / ds == int(x / ds)) and (y < 0 or y / ds == int(y / ds))
            _assert_same(reader.read(x, y), slide.read_region(x, y, TILE, TILE, mpp), exact=whole)


@pytest.mark.parametrize("name", ["svs_025", "tiff_025"])  # tiff_025: odd width and height
def test_default_halving_is_the_dct_decode_close_to_read_region(files, name):
    with Slide(files[name]) as slide, open_tile_reader(slide, 0.5, TILE) as reader:
        assert isinstance(reader, JpegTileReader) and not reader.exact
        halved = 0
        for x, y in _points(slide, 0.5):
            ours, expected = reader.read(x, y), slide.read_region(x, y, TILE, TILE, 0.5)
            if x % 2 or y % 2:  # not the half-tile path: exact as ever
                _assert_same(ours, expected, exact=True)
                continue
            _assert_close(ours, expected)
            halved += not np.array_equal(ours, expected)
        assert halved >= 3  # the DCT path was taken


def test_sub_pixel_tiles_at_the_far_edge_are_composited_on_white(odd_tiff):
    """At a sub-pixel position, OpenSlide blends the last image pixel with transparency.

    openslide-python returns that RGBA un-premultiplied; the reader and Slide.read_region both
    composite it onto white.
    """
    with Slide(odd_tiff) as slide, open_tile_reader(slide, slide.levels[1].mpp, TILE) as reader:  # no resize
        x, y = slide.width - 501, slide.height - 401  # level coordinates are not whole pixels
        rgba = np.asarray(openslide.OpenSlide(str(odd_tiff)).read_region((x, y), 1, (TILE, TILE))).astype(float)
        alpha = rgba[..., 3:] / 255
        composited = np.round(rgba[..., :3] * alpha + 255 * (1 - alpha))
        assert ((alpha > 0) & (alpha < 1)).any()
        _assert_same(reader.read(x, y), composited, exact=False)
        _assert_same(slide.read_region(x, y, TILE, TILE, slide.levels[1].mpp), composited, exact=False)


@pytest.mark.parametrize("exact", [False, True])
def test_outside_the_image_is_white(slides, exact):
    with Slide(slides.svs_025) as slide, open_tile_reader(slide, 0.5, TILE, exact=exact) as reader:
        assert (reader.read(slide.width + 5, 0) == 255).all()
        assert (reader.read(-2000, -2000) == 255).all()
        corner = reader.read(slide.width - 100, slide.height - 60)  # 50 x 30 output px inside
        assert (corner[30:] == 255).all() and (corner[:, 50:] == 255).all() and (corner[:30, :50] < 255).any()


def test_halving_is_pil_box_bit_for_bit():
    rgb = np.random.default_rng(0).integers(0, 256, (2 * 150, 2 * 170, 3), dtype=np.uint8)
    rgbx = np.full((*rgb.shape[:2], 4), 255, np.uint8)
    rgbx[..., :3] = rgb
    assert np.array_equal(_to_rgb(_halve(rgbx.view(np.uint32)[..., 0])), resize(rgb, 170, 150))


@pytest.mark.parametrize("exact", [False, True])
def test_row_major_walk_decodes_each_stored_tile_once(slides, exact):
    with Slide(slides.svs_025) as slide, open_tile_reader(slide, 0.5, TILE, exact=exact) as reader:
        step = 2 * TILE  # level-0 px per tile at 0.5 µm/px from 0.25
        corners = [(x, y) for y in range(100, slide.height, step) for x in range(100, slide.width, step)]
        touched = {
            (row, col)
            for x, y in corners
            for row in range(y // 256, (min(y + step, slide.height) - 1) // 256 + 1)
            for col in range(x // 256, (min(x + step, slide.width) - 1) // 256 + 1)
        }
        for x, y in corners:
            reader.read(x, y)
        assert reader.decodes == len(touched)
        assert len(reader._cache) <= reader.capacity


def test_the_cache_is_capped_and_reads_stay_right(slides):
    with Slide(slides.svs_025) as slide, open_tile_reader(slide, 0.5, TILE, cache_mib=1, exact=True) as reader:
        assert reader.capacity == 9  # one read's 3 x 3 tiles: 1 MiB would hold only 4 RGBX tiles
        corners = [(x, 700) for x in range(0, slide.width, 2 * TILE)] * 2
        tiles = [reader.read(x, y) for x, y in corners]
        assert len(reader._cache) == 9 and reader.decodes > 9
        for (x, y), tile in zip(corners, tiles):
            _assert_same(tile, slide.read_region(x, y, TILE, TILE, 0.5), exact=True)


@pytest.mark.parametrize("exact", [False, True])
def test_aperio_rgb_jpeg_with_shared_tables_is_read_fast_and_right(aperio_rgb, exact):
    """The DCT decode gets the tables spliced in and an Adobe marker saying the components are R, G, B."""
    with Slide(aperio_rgb) as slide, open_tile_reader(slide, 0.5, TILE, exact=exact) as reader:
        assert slide.vendor == "aperio" and isinstance(reader, JpegTileReader)
        assert reader.layout.tables and reader.layout.rgb_components
        for x, y in [(0, 0), (300, 200), (slide.width - 300, slide.height - 100)]:
            ours, expected = reader.read(x, y), slide.read_region(x, y, TILE, TILE, 0.5)
            if exact:
                _assert_same(ours, expected, exact=True)
            else:
                _assert_close(ours, expected)


def test_ycbcr_tiles_with_shared_tables_decode_at_half_scale(tmp_path):
    """The usual Aperio layout: abbreviated YCbCr 4:2:0 tiles, Huffman and quantisation tables in JPEGTables."""
    path = _write_rgb_jpeg_svs(tmp_path / "ycbcr.svs", jfif=False, ycbcr=True)
    with Slide(path) as slide, open_tile_reader(slide, 0.5, TILE) as reader:
        assert reader.layout.tables and not reader.layout.rgb_components
        _assert_close(reader.read(300, 200), slide.read_region(300, 200, TILE, TILE, 0.5))


@pytest.mark.parametrize("mpp", [0.25, 0.5])  # 0.5: the DCT half-scale decode
def test_photometric_rgb_wins_over_a_jfif_marker_as_in_openslide(tmp_path, mpp):
    """tifffile would convert JFIF tiles from YCbCr; OpenSlide follows the RGB tag, and so do we."""
    path = _write_rgb_jpeg_svs(tmp_path / "jfif.svs", jfif=True)
    with Slide(path) as slide, open_tile_reader(slide, mpp, TILE) as reader:
        ours, expected = reader.read(100, 100), slide.read_region(100, 100, TILE, TILE, mpp)
        if mpp == 0.25:
            _assert_same(ours, expected, exact=True)
        else:
            _assert_close(ours, expected)


@pytest.mark.parametrize(
    "exact, damage",
    # exact=True decodes with imagecodecs, which takes libjpeg's warnings (a truncated tile) as
    # harmless; OpenSlide and the DCT decode take them as errors
    [(False, "garbage"), (False, "truncated"), (False, "too large"), (True, "garbage"), (True, "too large")],
)
def test_a_corrupt_tile_is_a_slide_error_naming_the_slide(tmp_path, exact, damage):
    path = _write_rgb_jpeg_svs(tmp_path / "damaged.svs", jfif=True, damage=damage)
    with Slide(path, "damaged-slide") as slide, open_tile_reader(slide, 0.5, TILE, exact=exact) as reader:
        reader.read(512, 0)  # tiles 2 and 3 are sound
        with pytest.raises(SlideError, match=r"slide 'damaged-slide' \(.*damaged.svs\): JPEG tile 0 ") as caught:
            reader.read(0, 0)
    assert ("(512, 512" if damage == "too large" else "cannot be decoded") in str(caught.value)


def test_non_jpeg_tiff_falls_back_to_openslide(tmp_path):
    image = SyntheticTissue(120.0, 100.0, seed=1, tissue_cover=0.9).render(0, 0, 480, 400, 0.25)
    path = tmp_path / "deflate.tiff"
    tifffile.imwrite(
        path,
        image,
        tile=(256, 256),
        photometric="rgb",
        compression="zlib",
        resolution=(1e4 / 0.25, 1e4 / 0.25),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    with Slide(path) as slide, open_tile_reader(slide, 0.5, TILE) as reader:
        assert isinstance(reader, OpenSlideTileReader) and "ADOBE_DEFLATE" in reader.reason
        tile = reader.read(40, 20)
        _assert_same(tile, slide.read_region(40, 20, TILE, TILE, 0.5), exact=True)
    expected = resize(np.pad(image, ((0, 68), (0, 8), (0, 0)), constant_values=255)[20:468, 40:488], TILE, TILE)
    assert np.array_equal(tile, expected)


@pytest.mark.parametrize("kind", ["jpeg", "openslide"])
def test_a_pickled_reader_works_in_a_spawned_worker(slides, tmp_path, kind):
    path = slides.svs_025
    if kind == "openslide":
        path = tmp_path / "deflate.tiff"
        image = np.random.default_rng(1).integers(0, 256, (400, 500, 3), dtype=np.uint8)
        tifffile.imwrite(
            path,
            image,
            tile=(256, 256),
            photometric="rgb",
            compression="zlib",
            resolution=(1e4 / 0.25, 1e4 / 0.25),
            resolutionunit="CENTIMETER",
            metadata=None,
        )
    with Slide(path) as slide:
        reader = open_tile_reader(slide, 0.5, TILE)
        here = reader.read(200, 100)  # opens this process's handle before pickling
        copy = pickle.loads(pickle.dumps(reader))
        assert np.array_equal(copy.read(200, 100), here)
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            there = pool.submit(methodcaller("read", 200, 100), reader).result()
        reader.close()
        copy.close()
    assert np.array_equal(there, here)


_INHERITED: JpegTileReader | None = None


def _read_inherited(xy: tuple[int, int]) -> tuple[np.ndarray, bool]:
    assert _INHERITED is not None
    return _INHERITED.read(*xy), _INHERITED._pid == os.getpid()


def test_a_forked_worker_opens_its_own_descriptor(slides):
    """DataLoader's default on Linux: workers inherit the reader by fork, without pickling."""
    global _INHERITED
    with Slide(slides.svs_025) as slide, open_tile_reader(slide, 0.5, TILE) as reader:
        reader.read(600, 400)  # the parent's descriptor is open at fork time
        _INHERITED = reader
        try:
            with get_context("fork").Pool(1) as pool:
                there, reopened = pool.apply(_read_inherited, ((2000, 1600),))  # tiles not yet cached
        finally:
            _INHERITED = None
        assert reopened and np.array_equal(there, reader.read(2000, 1600))


def test_importing_the_reader_does_not_import_torch():
    code = "import sys, pathwsi.slides.readers; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _write_rgb_jpeg_svs(path: Path, jfif: bool, ycbcr: bool = False, damage: str | None = None) -> Path:
    """A one-level SVS whose JPEG tiles hold R, G, B components (no YCbCr), as Aperio writes them.

    jfif=False: abbreviated tiles sharing one JPEGTables, component ids 1-3, no APP markers.
    jfif=True: self-contained YCbCr JFIF tiles mislabelled photometric RGB.
    ycbcr=True (jfif=False): abbreviated YCbCr 4:2:0 tiles, photometric YCbCr.
    damage: tile 0 is "garbage", "truncated" (its second half zeros) or "too large" (512 x 512 px).
    """
    image = SyntheticTissue(200.0, 150.0, seed=5, tissue_cover=0.9).render(0, 0, 800, 600, 0.25)
    tiles, tables = [], None
    for top in range(0, 600, 256):
        for left in range(0, 800, 256):
            tile = np.full((256, 256, 3), 255, np.uint8)
            part = image[top : top + 256, left : left + 256]
            tile[: part.shape[0], : part.shape[1]] = part
            if jfif:
                tiles.append(bytes(imagecodecs.jpeg8_encode(tile, level=90)))
                continue
            colour = {} if ycbcr else {"outcolorspace": "rgb", "subsampling": "444"}
            tables, body = _split_tables(bytes(imagecodecs.jpeg8_encode(tile, level=90, **colour)))
            tiles.append(body)
    if damage is not None:
        first = tiles[0]
        tiles[0] = {
            "garbage": bytes(np.random.default_rng(0).integers(0, 256, len(first), dtype=np.uint8)),
            "truncated": first[: len(first) // 2] + bytes(len(first) - len(first) // 2),
            "too large": bytes(imagecodecs.jpeg8_encode(np.full((512, 512, 3), 200, np.uint8), level=90)),
        }[damage]
    extratags = [(347, 7, len(tables), tables, True)] if tables else []
    colour = (
        {"photometric": "ycbcr", "subsampling": (2, 2)}
        if ycbcr
        else {"photometric": "rgb", "compressionargs": {"outcolorspace": "rgb"}, "subsampling": (1, 1)}
    )
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            iter(tiles),
            shape=(600, 800, 3),
            dtype=np.uint8,
            tile=(256, 256),
            compression="jpeg",
            description=APERIO.format(w=800, h=600),
            metadata=None,
            extratags=extratags,
            **colour,
        )
    return path


def _split_tables(jpeg: bytes) -> tuple[bytes, bytes]:
    """(JPEGTables, abbreviated tile): DQT/DHT moved out, APPn dropped, component ids R,G,B -> 1,2,3."""
    pos, tables, body = 2, [], []
    while jpeg[pos + 1] != 0xDA:  # up to the start of scan
        length = struct.unpack(">H", jpeg[pos + 2 : pos + 4])[0]
        segment = jpeg[pos : pos + 2 + length]
        if jpeg[pos + 1] in (0xDB, 0xC4):
            tables.append(segment)
        elif not 0xE0 <= jpeg[pos + 1] <= 0xEF:
            body.append(_numbered_components(segment))
        pos += 2 + length
    length = struct.unpack(">H", jpeg[pos + 2 : pos + 4])[0]
    body.append(_numbered_components(jpeg[pos : pos + 2 + length]) + jpeg[pos + 2 + length :])
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(body)


def _numbered_components(segment: bytes) -> bytes:
    """SOF0/SOS segment with component ids 'R', 'G', 'B' renamed 1, 2, 3 (so only the TIFF tag says RGB)."""
    ids = {ord("R"): 1, ord("G"): 2, ord("B"): 3}
    out = bytearray(segment)
    first, stride = (10, 3) if segment[1] == 0xC0 else (5, 2)
    for i in range(out[first - 1]):
        out[first + stride * i] = ids.get(out[first + stride * i], out[first + stride * i])
    return bytes(out)
