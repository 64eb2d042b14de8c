"""Fast tile reading: decode a slide's own JPEG tiles once each and assemble output tiles from them.

`open_tile_reader(slide, mpp, tile_px)` gives a reader whose `read(x0, y0)` returns what
`slide.read_region(x0, y0, tile_px, tile_px, mpp)` returns (same level, same sub-pixel placement,
white outside the image, same BOX/bicubic resize), with one exception by default, below:

- `JpegTileReader` where the level `slide.level_for(mpp)` picks is a JPEG-compressed tiled TIFF page
  of an Aperio SVS or generic tiled TIFF: the compressed tiles are read by byte range
  (`os.pread` on a descriptor the reader opens itself) and decoded, each one once while the
  caller walks tiles in row-major order (an LRU cache of decoded tiles);
- `OpenSlideTileReader` otherwise: `Slide.read_region` per tile.

The exception: where the output is the level shrunk by exactly 2 (0.5 µm/px tiles from a
0.25 µm/px scan, the feature-extraction case), the default reader (exact=False) decodes each stored
tile at half size in libjpeg-turbo's DCT domain (simplejpeg): twice the tiles/s of exact=True.
Its pixels differ from read_region's BOX halving by 0.84 levels on average (99th percentile 4,
largest 16, over the 2,025 tiles of benchmarks/bench_reader.py), and are 0.5 levels darker on
average, since the BOX halving rounds halves up twice. exact=True decodes at full size and
halves as PIL's BOX resize does: read_region's pixels bit for bit.

`JpegTileReader.plan`, `.stream` and `region_slots` give the same placement to decoders that work
on batches of stored tiles elsewhere (pathwsi.features.gpu_decode: nvJPEG on the GPU).

Readers pickle without their file handles and caches and reopen them in the process that reads
(one reader per DataLoader worker; they are not thread-safe). This module does not import torch.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import imagecodecs
import numpy as np
import simplejpeg
import tifffile
from PIL import Image

from pathwsi.slides.slide import Level, Slide, SlideError, resize

FAST_VENDORS = ("aperio", "generic-tiff")  # OpenSlide formats that are plain tiled TIFF pyramids
DEFAULT_CACHE_MIB = 256
_WHITE = np.uint32(0xFFFFFFFF)  # an RGBX pixel, packed little-endian into one word
_LOW7 = np.uint32(0x7F7F7F7F)
_RGBX = imagecodecs.JPEG8.CS.EXT_RGBX
_JPEG, _RGB, _YCBCR = 7, 2, 6  # TIFF Compression and PhotometricInterpretation codes
_SOI, _EOI, _APP0 = b"\xff\xd8", b"\xff\xd9", b"\xff\xe0"
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # APP14, transform 0: components are R, G, B


class NotJpegTiled(Exception):
    """The level cannot be read by decoding stored JPEG tiles; the message says why."""


@dataclass(frozen=True)
class JpegLevel:
    """Where one pyramid level's JPEG tiles lie in the file and how to decode them."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray  # (tiles_down * tiles_across,) byte offsets, row-major
    bytecounts: np.ndarray
    tables: bytes | None  # shared JPEGTables (Aperio), or None when each tile is self-contained
    rgb_components: bool  # photometric RGB: the JPEG components are R, G, B (no YCbCr conversion)

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_height)


def jpeg_level(slide: Slide, level: Level) -> JpegLevel:
    """The JPEG tile layout of `level`: the tiled TIFF page of the level's size.

    Raises NotJpegTiled when the file is not a plain tiled TIFF pyramid (per OpenSlide's vendor),
    the page is not 8-bit RGB/YCbCr JPEG, or it has missing tiles (OpenSlide paints those itself).
    """
    if slide.backend != "openslide":
        raise NotJpegTiled(f"the slide is opened with {slide.backend}, not OpenSlide")
    if slide.vendor not in FAST_VENDORS:
        raise NotJpegTiled(f"OpenSlide reads the file as '{slide.vendor}', not as one of {FAST_VENDORS}")
    with tifffile.TiffFile(slide.path) as tif:
        # every page is a TiffPage: TiffFile makes TiffFrames only when opened with useframes=True
        pages = [
            p
            for p in tif.pages
            if isinstance(p, tifffile.TiffPage)
            and p.is_tiled
            and (p.imagelength, p.imagewidth) == (level.height, level.width)
        ]
        if not pages:
            raise NotJpegTiled(f"no tiled TIFF page of {level.width}x{level.height} px for level {level.index}")
        page = pages[0]
        _check_jpeg_page(page, level.index)
        return JpegLevel(
            width=page.imagewidth,
            height=page.imagelength,
            tile_width=page.tilewidth,
            tile_height=page.tilelength,
            offsets=np.asarray(page.dataoffsets, np.int64),
            bytecounts=np.asarray(page.databytecounts, np.int64),
            tables=page.jpegtables or None,
            rgb_components=page.photometric == _RGB,
        )


def _check_jpeg_page(page: tifffile.TiffPage, index: int) -> None:
    if page.compression != _JPEG:
        raise NotJpegTiled(f"level {index} is {tifffile.COMPRESSION(page.compression).name}-compressed, not JPEG")
    layout = (
        page.photometric in (_RGB, _YCBCR),
        page.planarconfig == 1,
        page.samplesperpixel == 3,
        page.bitspersample == 8,
        not page.extrasamples,
        page.tiledepth == 1,
    )
    if not all(layout):
        raise NotJpegTiled(f"level {index} is not 8-bit 3-sample interleaved RGB/YCbCr JPEG")
    if min(page.databytecounts) == 0:
        raise NotJpegTiled(f"level {index} has missing (zero-length) tiles")


@dataclass(frozen=True)
class RegionPlan:
    """How `JpegTileReader.read` makes one output tile: from the square [top, top+side) x [left,
    left+side) of the level shrunk `shrink` times (1, or 2 for the halved-tile path), white outside,
    shifted by `shift` (x, y) 1/256 px when the tile starts between level pixels, then resized."""

    left: int
    top: int
    side: int
    shrink: int
    shift: tuple[int, int] | None = None

    def finish(self, region: np.ndarray, tile_px: int) -> np.ndarray:
        """The output tile from the region's RGB pixels (side, side, 3)."""
        if self.shift is not None:
            region = _shift_bilinear(region, *self.shift)
        return resize(region, tile_px, tile_px)


def region_slots(layout: JpegLevel, left: np.ndarray, top: np.ndarray, side: int, shrink: int) -> np.ndarray:
    """For squares of `side` px at (left, top) of the level shrunk `shrink` times: the stored tiles
    they span, as (n, k, k) tile indices in row-major slots from the one holding the square's
    top-left pixel, -1 where a slot lies outside the level or past the square (then white or unused).
    k = ceil(side / tile) + 1 slots a side: enough for any offset of the square within its first tile.
    Batched decoders (pathwsi.features.gpu_decode) gather output tiles from these slots."""
    th, tw = layout.tile_height // shrink, layout.tile_width // shrink
    k = max(-(-side // th), -(-side // tw)) + 1
    steps = np.arange(k)
    rows = np.asarray(top)[:, None] // th + steps  # floor: a negative top starts in a row of white
    cols = np.asarray(left)[:, None] // tw + steps
    row_ok = (rows >= 0) & (rows < layout.tiles_down) & (rows * th < np.asarray(top)[:, None] + side)
    col_ok = (cols >= 0) & (cols < layout.tiles_across) & (cols * tw < np.asarray(left)[:, None] + side)
    slots = rows[:, :, None] * layout.tiles_across + cols[:, None, :]
    return np.where(row_ok[:, :, None] & col_ok[:, None, :], slots, -1)


class TileReader(ABC):
    """Reads `tile_px` x `tile_px` RGB tiles at `mpp` µm/px by their level-0 top-left corner."""

    name: str

    def __init__(self, slide: Slide, mpp: float, tile_px: int):
        self.path, self.slide_id, self.label, self.backend = slide.path, slide.slide_id, slide.label, slide.backend
        self.level0_mpp = slide.mpp.value
        self.mpp, self.tile_px = float(mpp), int(tile_px)
        self.level = slide.level_for(mpp)
        scale = self.mpp / self.level.mpp
        self.level_px = max(1, round(self.tile_px * scale))  # side of the region read from the level

    @abstractmethod
    def read(self, x0: int, y0: int) -> np.ndarray:
        """RGB uint8 (tile_px, tile_px, 3) whose top-left corner is level-0 (x0, y0); white outside."""

    @abstractmethod
    def close(self) -> None:
        """Release this process's file handles (the reader reopens them if used again)."""

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenSlideTileReader(TileReader):
    """The general reader: `Slide.read_region` per tile. `reason` says why the fast one was not used."""

    name = "openslide"

    def __init__(self, slide: Slide, mpp: float, tile_px: int, reason: str):
        super().__init__(slide, mpp, tile_px)
        self.reason = reason
        self._slide: Slide | None = slide  # the caller's handle: used here, never closed by the reader
        self._owned = False
        self._pid = os.getpid()

    def read(self, x0: int, y0: int) -> np.ndarray:
        return self._handle().read_region(x0, y0, self.tile_px, self.tile_px, self.mpp)

    def _handle(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():  # unpickled or forked: open our own
            self._slide = Slide(self.path, self.slide_id, mpp_override=self.level0_mpp, backend=self.backend)
            self._owned, self._pid = True, os.getpid()
        return self._slide

    def close(self) -> None:
        if self._owned and self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide, self._owned = None, False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_slide": None, "_owned": False}


class JpegTileReader(TileReader):
    """Assembles output tiles from the level's stored JPEG tiles, decoding each at most once per walk.

    When the output is the level shrunk by exactly 2 (0.5 µm/px from a 0.25 µm/px level) and the
    tile starts on an even level pixel, each stored tile is decoded once at half size and output
    tiles are copied together from the half tiles. By default (exact=False) the half tiles come
    straight from libjpeg-turbo's DCT-domain scaling, as RGB bytes: 0.84 levels from read_region
    on average, 16 at most (module docstring); pixels past the level's edge are white, the one
    half pixel that straddles an odd edge blends in the tile's padding. exact=True decodes to
    RGBX words (one uint32 a pixel) and halves them with PIL's BOX rounding, edge padding made
    white first: read_region's pixels bit for bit. Other reads assemble the full-resolution
    region as RGBX words and resize it as `pathwsi.slides.slide.resize` does.

    Decoded tiles live in an LRU cache sized for a row-major walk across the whole level: the
    stored-tile rows one read spans, plus one, times the tiles across, so a stored tile shared by
    two rows of output tiles is still there when the second row reaches it. Memory is bounded:
    the count of tiles is capped at `cache_mib` MiB of full-resolution RGBX tiles (default 256:
    three rows of 256-px tiles across an 87,000-px-wide level; half tiles take 3/16 of that
    as RGB, 1/4 as RGBX), and is never less than one read needs. A wider walk, or one not in
    row-major order, re-decodes tiles; `decodes` counts every decode.
    """

    name = "jpeg-tiles"

    def __init__(
        self,
        slide: Slide,
        mpp: float,
        tile_px: int,
        layout: JpegLevel,
        cache_mib: int = DEFAULT_CACHE_MIB,
        exact: bool = False,
    ):
        super().__init__(slide, mpp, tile_px)
        self.layout, self.exact = layout, exact
        self.downsample = self.level.downsample
        self.colorspace = "RGB" if layout.rgb_components else "YCBCR"
        self.capacity = _cache_capacity(layout, self.level_px + 1, cache_mib)
        self.decodes = 0
        self._fd: int | None = None
        self._pid = os.getpid()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._scratch: np.ndarray | None = None  # decoding buffer for tiles that are halved at once
        self._prefix = _stream_prefix(layout)  # what simplejpeg needs before a tile's own segments

    def read(self, x0: int, y0: int) -> np.ndarray:
        plan = self.plan(x0, y0)
        region = self._region(plan.left, plan.top, plan.side, plan.side, plan.shrink)
        return region if self._dct(plan.shrink) else plan.finish(_to_rgb(region), self.tile_px)

    def plan(self, x0: int, y0: int) -> RegionPlan:
        """Which square of the level (shrunk how) the tile at level-0 (x0, y0) is made from, and how."""
        qx, qy = _level_position(x0, self.downsample), _level_position(y0, self.downsample)
        left, top, side = qx // 256, qy // 256, self.level_px
        if qx % 256 or qy % 256:
            return RegionPlan(left, top, side + 1, 1, ((qx % 256) & ~1, (qy % 256) & ~1))
        if side == 2 * self.tile_px and left % 2 == 0 and top % 2 == 0:
            return RegionPlan(left // 2, top // 2, self.tile_px, 2)
        return RegionPlan(left, top, side, 1)

    def stream(self, index: int) -> bytes:
        """Stored tile `index` as one self-contained JPEG stream (shared tables spliced in, an Adobe
        marker for R, G, B components), as a decoder other than imagecodecs needs it."""
        return self._complete_stream(self._stored(index))

    def _region(self, left: int, top: int, width: int, height: int, shrink: int) -> np.ndarray:
        """[top, top+height) x [left, left+width) of the level shrunk `shrink` times, white outside:
        RGB bytes (height, width, 3) from the DCT half tiles, else RGBX words (height, width)."""
        lay = self.layout
        tw, th = lay.tile_width // shrink, lay.tile_height // shrink
        right, bottom = min(left + width, -(-lay.width // shrink)), min(top + height, -(-lay.height // shrink))
        inside = left >= 0 and top >= 0 and right == left + width and bottom == top + height
        shape, dtype = ((height, width, 3), np.uint8) if self._dct(shrink) else ((height, width), np.uint32)
        out = np.empty(shape, dtype) if inside else np.full(shape, np.iinfo(dtype).max, dtype)  # white: all bits set
        if right <= max(left, 0) or bottom <= max(top, 0):
            return out
        for row in range(max(top, 0) // th, (bottom - 1) // th + 1):
            y0, y1 = max(top, row * th), min(bottom, (row + 1) * th)
            for col in range(max(left, 0) // tw, (right - 1) // tw + 1):
                x0, x1 = max(left, col * tw), min(right, (col + 1) * tw)
                tile = self._tile(row * lay.tiles_across + col, shrink)
                out[y0 - top : y1 - top, x0 - left : x1 - left] = tile[
                    y0 - row * th : y1 - row * th, x0 - col * tw : x1 - col * tw
                ]
        return out

    def _dct(self, shrink: int) -> bool:
        """Whether tiles shrunk `shrink` times come from the DCT half-scale decode."""
        return shrink == 2 and not self.exact

    def _tile(self, index: int, shrink: int) -> np.ndarray:
        """Stored tile `index` shrunk `shrink` times, as `_region` returns pixels; from the cache when there."""
        key = (index, shrink)
        tile = self._cache.get(key)
        if tile is not None:
            self._cache.move_to_end(key)
            return tile
        tile = self._decode(index, shrink)
        self._cache[key] = tile
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return tile

    def _decode(self, index: int, shrink: int) -> np.ndarray:
        """Stored tile `index` read from the file and decoded as `_tile` returns it; counted in `decodes`."""
        data = self._stored(index)
        tile = self._decode_half(index, data) if self._dct(shrink) else self._decode_words(index, data, shrink)
        self.decodes += 1
        return tile

    def _stored(self, index: int) -> bytes:
        """The bytes of stored tile `index`, read from the file."""
        offset, count = int(self.layout.offsets[index]), int(self.layout.bytecounts[index])
        data = os.pread(self._file(), count, offset)
        if len(data) != count:
            raise SlideError(
                f"slide {self.label}: JPEG tile {index} lies beyond the end of the file; it is truncated. Copy it again."
            )
        return data

    def _complete_stream(self, data: bytes) -> bytes:
        """A stored tile's bytes with what libjpeg needs before its own segments (`_stream_prefix`)."""
        if self._prefix is None:
            return data
        body = data[2:]  # the tile without its SOI
        if self.layout.rgb_components and body[:2] == _APP0:  # a JFIF marker would make libjpeg convert from YCbCr
            body = body[2 + int.from_bytes(body[2:4], "big") :]
        return self._prefix + body

    def _decode_half(self, index: int, data: bytes) -> np.ndarray:
        """RGB bytes of the tile at half size, scaled by libjpeg-turbo in the DCT domain."""
        lay = self.layout
        data = self._complete_stream(data)
        try:  # strict: libjpeg's warnings (a truncated or damaged tile) are errors, as in OpenSlide
            self._check_size(index, simplejpeg.decode_jpeg_header(data)[:2])  # a 2^k times larger tile would pass below
            return simplejpeg.decode_jpeg(data, "RGB", min_height=lay.tile_height // 2, min_width=lay.tile_width // 2)
        except ValueError as err:
            raise self._undecodable(index, err) from err

    def _decode_words(self, index: int, data: bytes, shrink: int) -> np.ndarray:
        """RGBX words of the tile, halved as PIL's BOX resize does when shrink is 2."""
        lay = self.layout
        if shrink == 2 and self._scratch is None:
            self._scratch = np.empty((lay.tile_height, lay.tile_width, 4), np.uint8)
        try:
            rgbx = imagecodecs.jpeg8_decode(
                data,
                tables=lay.tables,
                colorspace=self.colorspace,
                outcolorspace=_RGBX,
                out=self._scratch if shrink == 2 else None,
            )
        except (imagecodecs.Jpeg8Error, ValueError) as err:  # ValueError: a tile larger than the scratch buffer
            raise self._undecodable(index, err) from err
        self._check_size(index, rgbx.shape[:2])
        words = rgbx.view(np.uint32)[..., 0]
        if shrink == 1:
            return words
        row, col = divmod(index, lay.tiles_across)
        if col == lay.tiles_across - 1 or row == lay.tiles_down - 1:  # the tile's padding past the level's edge
            words[:, lay.width - col * lay.tile_width :] = _WHITE
            words[lay.height - row * lay.tile_height :] = _WHITE
        return _halve(words)

    def _check_size(self, index: int, size: tuple[int, ...]) -> None:
        """SlideError unless the tile's full (height, width) is the TIFF tile size."""
        expected = (self.layout.tile_height, self.layout.tile_width)
        if size != expected:
            raise SlideError(
                f"slide {self.label}: JPEG tile {index} decodes to {size}, not the TIFF tile size {expected}."
            )

    def _undecodable(self, index: int, err: Exception) -> SlideError:
        """The error for a tile libjpeg rejects."""
        return SlideError(
            f"slide {self.label}: JPEG tile {index} of level {self.level.index} cannot be decoded ({err}); the file is probably corrupt."
        )

    def _file(self) -> int:
        if self._fd is not None and self._pid != os.getpid():  # forked: drop the inherited copy
            os.close(self._fd)
            self._fd = None
        if self._fd is None:
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._cache.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_cache": OrderedDict(), "_scratch": None}


def open_tile_reader(
    slide: Slide, mpp: float, tile_px: int, cache_mib: int = DEFAULT_CACHE_MIB, exact: bool = False
) -> TileReader:
    """The fast JPEG-tile reader where the level for `mpp` allows it, else the OpenSlide reader.

    exact=True: read_region's pixels bit for bit also where the level is shrunk by exactly 2
    (full-size decode and BOX halving instead of the DCT half-scale decode; `JpegTileReader`)."""
    try:
        layout = jpeg_level(slide, slide.level_for(mpp))
    except NotJpegTiled as why:
        return OpenSlideTileReader(slide, mpp, tile_px, reason=str(why))
    return JpegTileReader(slide, mpp, tile_px, layout, cache_mib, exact)


def _stream_prefix(layout: JpegLevel) -> bytes | None:
    """What goes before a tile's own segments (its SOI dropped) for libjpeg to decode it as TIFF
    says: SOI, an Adobe marker saying R, G, B for photometric RGB, the shared JPEGTables without
    their SOI and EOI. None when the tiles decode as they are."""
    if layout.tables is None and not layout.rgb_components:
        return None
    tables = layout.tables.removesuffix(_EOI)[2:] if layout.tables else b""
    return _SOI + (_ADOBE_RGB if layout.rgb_components else b"") + tables


def _level_position(v0: int, downsample: float) -> int:
    """Where OpenSlide places a level-0 coordinate on the level, in 1/256 px.

    Non-negative: v0 / downsample on cairo's 1/256 px grid (a fraction makes OpenSlide interpolate
    bilinearly). Negative: OpenSlide starts the level at 0 and shifts it by the truncated whole pixels.
    """
    if v0 < 0:
        return -int(-v0 / downsample) * 256
    return round(v0 / downsample * 256)


def _cache_capacity(layout: JpegLevel, span_px: int, cache_mib: int) -> int:
    """Tiles to keep: the rows one read spans, plus one, across the level; at most `cache_mib` MiB."""
    rows = -(-span_px // layout.tile_height) + 1
    cols = -(-span_px // layout.tile_width) + 1
    tile_bytes = layout.tile_width * layout.tile_height * 4
    return max(rows * cols, min(rows * (layout.tiles_across + cols), cache_mib * 2**20 // tile_bytes))


def _halve(words: np.ndarray) -> np.ndarray:
    """PIL's BOX resize of RGBX words by exactly 2, bit for bit: pixel pairs in each row averaged
    and rounded first, then pairs of rows. Per byte, ceil((a + b) / 2) = (a | b) - ((a ^ b) >> 1)."""
    a, b = words[:, 0::2], words[:, 1::2]
    across, odd = a | b, a ^ b
    odd >>= 1
    odd &= _LOW7
    across -= odd
    a, b = across[0::2], across[1::2]
    out, odd = a | b, odd[: len(a)]
    np.bitwise_xor(a, b, out=odd)
    odd >>= 1
    odd &= _LOW7
    out -= odd
    return out


def _to_rgb(words: np.ndarray) -> np.ndarray:
    """RGBX words (h, w) as a writable RGB uint8 (h, w, 3) array (PIL packs the bytes)."""
    height, width = words.shape
    image = Image.frombuffer("RGBX", (width, height), np.ascontiguousarray(words), "raw", "RGBX", 0, 1)
    return np.frombuffer(bytearray(image.tobytes("raw", "RGB")), np.uint8).reshape(height, width, 3)


def _shift_bilinear(rgb: np.ndarray, wx: int, wy: int) -> np.ndarray:
    """(h+1, w+1, 3) -> (h, w, 3) sampled wx/256, wy/256 px right and down, as pixman's bilinear filter."""
    a = rgb.astype(np.int32)
    top = a[:-1, :-1] * (256 - wx) + a[:-1, 1:] * wx
    bottom = a[1:, :-1] * (256 - wx) + a[1:, 1:] * wx
    return ((top * (256 - wy) + bottom * wy + 32768) >> 16).astype(np.uint8)
