"""`features.reader: gpu`: a slide's stored JPEG tiles decoded in batches on the models' device.

DataLoader workers (`CompressedTiles`) do the cheap part on the CPU: for a batch of output tiles they
plan each one as the CPU reader does (`JpegTileReader.plan`), find the stored tiles the batch spans
(`region_slots`) and read their bytes as self-contained JPEG streams (`JpegTileReader.stream`).
The main process (`DeviceDecoder`) decodes those it has not decoded yet in one
`torchvision.io.decode_jpeg` call on the device (nvJPEG on CUDA; libjpeg-turbo on the CPU), makes
their padding past the level's edge white, halves them as PIL's BOX filter does where the tiles
are the level halved, and gathers every output tile from them in one indexing operation. Decoded
tiles stay in an LRU cache on the device, sized as the CPU reader's, so a row-major walk decodes
each stored tile once. Tiles that need more than halving (a sub-pixel shift, another scale) are
gathered on the device and finished on the host by `RegionPlan.finish`, the CPU reader's code: right,
but slow; `resolve_reader` picks `gpu` under `auto` only where no tile needs that.

The tiles are the `exact` reader's (read_region's pixels) up to the decoder: on the CPU, equal bit
for bit (tests/test_gpu_decode.py); nvJPEG's inverse DCT and chroma upsampling differ from
libjpeg-turbo's by an amount not measured here (no GPU). `check_device_decode` compares one stored
tile decoded on the device with libjpeg's decode before a job uses the device path, and the job falls
back to a CPU reader when they differ by more than `DEVICE_TOLERANCE` levels on average (nvJPEG may
not honour the Adobe marker of photometric-RGB tiles, for one).
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pathwsi.samples import Sample
from pathwsi.slides.readers import (
    DEFAULT_CACHE_MIB,
    JpegLevel,
    JpegTileReader,
    OpenSlideTileReader,
    RegionPlan,
    TileReader,
    _cache_capacity,
    _to_rgb,
    open_tile_reader,
    region_slots,
)
from pathwsi.slides.slide import Slide, SlideError

log = logging.getLogger(__name__)
DEVICE_TOLERANCE = 2.0  # mean absolute difference (levels) allowed between the device's and libjpeg's decode
_NO_SHIFT = -1


@dataclass
class CompressedBatch:
    """One batch of output tiles as the stored JPEG tiles they need (what a worker sends)."""

    plans: np.ndarray  # (n, 6) int64 per output tile: left, top, side, shrink, shift x, shift y (-1: none)
    stored: np.ndarray  # (m,) the stored tiles the batch spans, ascending
    data: np.ndarray  # their JPEG streams, one after the other (uint8)
    bounds: np.ndarray  # (m + 1,) where each stream starts in `data`
    failed: dict[int, str] = field(default_factory=dict)  # stored tiles that could not be read, and why

    def streams(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The JPEG streams of these stored tiles, as the CPU tensors decode_jpeg takes."""
        where = np.searchsorted(self.stored, indices)
        return [torch.from_numpy(self.data[self.bounds[k] : self.bounds[k + 1]]) for k in where]


def plan_rows(reader: JpegTileReader, coords: np.ndarray) -> np.ndarray:
    """`reader.plan` of each level-0 corner, as (n, 6) rows of a CompressedBatch."""
    rows = []
    for x, y in coords:
        plan = reader.plan(int(x), int(y))
        rows.append((plan.left, plan.top, plan.side, plan.shrink, *(plan.shift or (_NO_SHIFT, _NO_SHIFT))))
    return np.array(rows, np.int64).reshape(-1, 6)


def _plan(row: np.ndarray) -> RegionPlan:
    left, top, side, shrink, wx, wy = (int(v) for v in row)
    return RegionPlan(left, top, side, shrink, None if wx == _NO_SHIFT else (wx, wy))


def plan_groups(layout: JpegLevel, plans: np.ndarray) -> Iterator[tuple[np.ndarray, int, int, np.ndarray]]:
    """Output tiles grouped by region size and shrink: (their rows in the batch, side, shrink, slots)."""
    for side, shrink in sorted({(int(r[2]), int(r[3])) for r in plans}):
        members = np.flatnonzero((plans[:, 2] == side) & (plans[:, 3] == shrink))
        yield members, side, shrink, region_slots(layout, plans[members, 0], plans[members, 1], side, shrink)


def tile_failures(layout: JpegLevel, plans: np.ndarray, failed: dict[int, str]) -> list[str]:
    """Per output tile: "" or why one of the stored tiles it needs could not be read or decoded."""
    reasons = [""] * len(plans)
    if failed:
        for members, _, _, slots in plan_groups(layout, plans):
            for member, spans in zip(members, slots.reshape(len(members), -1)):
                bad = [failed[int(i)] for i in spans if int(i) in failed]
                reasons[member] = bad[0] if bad else ""
    return reasons


class CompressedTiles(Dataset):
    """Batches of one slide's tiles (item b: tiles start + b*batch_size ...) as CompressedBatch;
    each worker process opens its own reader. Use with DataLoader(batch_size=None)."""

    def __init__(self, sample: Sample, coords: np.ndarray, tile_px: int, tile_mpp: float, start: int, batch_size: int):
        self.sample, self.coords, self.tile_px, self.tile_mpp = sample, coords, tile_px, tile_mpp
        self.start, self.batch_size = start, batch_size
        self._reader: JpegTileReader | None = None

    def __len__(self) -> int:
        return -(-(len(self.coords) - self.start) // self.batch_size)

    def __getitem__(self, index: int) -> CompressedBatch:
        reader = self._open()
        first = self.start + index * self.batch_size
        plans = plan_rows(reader, self.coords[first : first + self.batch_size])
        spans = [slots[slots >= 0] for _, _, _, slots in plan_groups(reader.layout, plans)]
        stored = np.unique(np.concatenate(spans)) if spans else np.zeros(0, np.int64)
        chunks, failed = [], {}
        for i in stored:
            try:
                chunks.append(reader.stream(int(i)))
            except SlideError as err:  # a truncated file: the tiles that need this one are left out
                failed[int(i)] = str(err)
                chunks.append(b"")
        bounds = np.cumsum([0, *(len(c) for c in chunks)])
        data = np.frombuffer(bytearray(b"".join(chunks)), np.uint8)
        return CompressedBatch(plans, stored, data, bounds, failed)

    def _open(self) -> JpegTileReader:
        if self._reader is None:
            with Slide(self.sample.path, self.sample.slide_id, self.sample.mpp, self.sample.backend or "auto") as slide:
                reader = open_tile_reader(slide, self.tile_mpp, self.tile_px, exact=True)
            if not isinstance(reader, JpegTileReader):
                raise SlideError(f"slide {slide.label}: features.reader gpu needs JPEG tiles: {_why_not(reader)}")
            self._reader = reader
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}


def _why_not(reader: TileReader) -> str:
    """Why open_tile_reader gave the OpenSlide reader."""
    return reader.reason if isinstance(reader, OpenSlideTileReader) else reader.name


def decode_streams(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """(3, H, W) uint8 RGB images of JPEG streams, decoded on `device` in one call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)
    return list(images)


def halve(tiles: torch.Tensor) -> torch.Tensor:
    """(..., H, W) uint8 shrunk by 2 as PIL's BOX filter does, bit for bit (pathwsi.slides.readers._halve):
    pairs across averaged and rounded up first, then pairs of rows."""
    x = tiles.to(torch.int16)
    across = (x[..., 0::2] + x[..., 1::2] + 1) >> 1
    return ((across[..., 0::2, :] + across[..., 1::2, :] + 1) >> 1).to(torch.uint8)


class DeviceDecoder:
    """Turns CompressedBatch into (n, tile_px, tile_px, 3) uint8 tiles on `device`, and per tile "" or
    why it could not be read (then the tile is black, as the CPU path's). `decodes` counts decodes."""

    def __init__(self, reader: JpegTileReader, device: torch.device, cache_mib: int = DEFAULT_CACHE_MIB):
        self.reader, self.layout, self.device, self.tile_px = reader, reader.layout, device, reader.tile_px
        self.capacity = _cache_capacity(reader.layout, reader.level_px + 1, cache_mib)
        self.decodes = 0
        self._cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self._undecodable: dict[int, str] = {}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batch: CompressedBatch) -> tuple[torch.Tensor, list[str]]:
        groups = list(plan_groups(self.layout, batch.plans))
        needed = {(int(i), shrink) for _, _, shrink, slots in groups for i in np.unique(slots[slots >= 0])}
        self._decode_missing(needed, batch)
        reasons = tile_failures(self.layout, batch.plans, {**batch.failed, **self._undecodable})
        out = torch.zeros((len(batch.plans), self.tile_px, self.tile_px, 3), dtype=torch.uint8, device=self.device)
        for members, side, shrink, slots in groups:
            keep = np.array([not reasons[m] for m in members], bool)
            if not keep.any():
                continue
            rows = batch.plans[members[keep]]
            regions = self._gather(slots[keep], rows[:, 0], rows[:, 1], side, shrink)
            if side != self.tile_px or (rows[:, 4] != _NO_SHIFT).any():  # the CPU reader's finish, on the host
                host = regions.cpu().numpy()
                finished = [_plan(row).finish(region, self.tile_px) for row, region in zip(rows, host)]
                regions = torch.from_numpy(np.stack(finished)).to(self.device)
            out[torch.as_tensor(members[keep], device=self.device)] = regions
        while len(self._cache) > self.capacity + len(needed):  # this batch's tiles are the newest: kept
            self._cache.popitem(last=False)
        return out, reasons

    def _decode_missing(self, needed: set[tuple[int, int]], batch: CompressedBatch) -> None:
        """Decode the stored tiles the batch needs that are not cached (nor known to be broken), and cache
        them at each shrink the batch needs; mark the cached ones as just used."""
        for key in needed & self._cache.keys():
            self._cache.move_to_end(key)
        skip = self._undecodable.keys() | batch.failed.keys()
        todo = sorted({i for i, s in needed if (i, s) not in self._cache and i not in skip})
        if not todo:
            return
        images = self._decode(todo, batch.streams(todo))
        good = [i for i in todo if i in images]
        self.decodes += len(todo)
        if not good:
            return
        full = self._whiten_padding(torch.stack([images[i] for i in good]), good)
        shrinks = {s for _, s in needed}
        by_shrink = {1: full if 1 in shrinks else None, 2: halve(full) if 2 in shrinks else None}
        for k, i in enumerate(good):
            for s in shrinks:
                if (i, s) in needed:
                    tiles = by_shrink[s]
                    assert tiles is not None
                    self._cache[(i, s)] = tiles[k]

    def _decode(self, indices: list[int], streams: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Stored tile -> (3, H, W) image, for those that decode to the TIFF tile size; the others are
        recorded in `_undecodable` with the CPU reader's messages."""
        try:
            images = self._decode_on_device(streams)
        except RuntimeError:  # one bad stream fails the whole call: find it
            images = []
            for index, stream in zip(indices, streams):
                try:
                    images.extend(self._decode_on_device([stream]))
                except RuntimeError as err:
                    self._undecodable[index] = str(self.reader._undecodable(index, err))
                    images.append(None)
        decoded = {}
        for index, image in zip(indices, images):
            if image is None:
                continue
            try:
                self.reader._check_size(index, tuple(image.shape[1:]))
            except SlideError as err:
                self._undecodable[index] = str(err)
                continue
            decoded[index] = image
        return decoded

    def _decode_on_device(self, streams: list[torch.Tensor]) -> list[Any]:
        if self._stream is None:
            return list(decode_streams(streams, self.device))
        # torchvision's CUDA decoder writes on a stream of its own into memory allocated on the caller's,
        # which may still be read by kernels queued there (pytorch/vision PR 9606). Decode with a side
        # stream current, and tell the allocator the images are used on the main stream.
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            images = decode_streams(streams, self.device)
        main.wait_stream(self._stream)
        for image in images:
            image.record_stream(main)
        return list(images)

    def _whiten_padding(self, tiles: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """(u, 3, H, W) decoded stored tiles with the pixels past the level's right and bottom edge white."""
        lay = self.layout
        rows, cols = np.divmod(np.asarray(indices), lay.tiles_across)
        width = np.clip(lay.width - cols * lay.tile_width, 0, lay.tile_width)
        height = np.clip(lay.height - rows * lay.tile_height, 0, lay.tile_height)
        if (width == lay.tile_width).all() and (height == lay.tile_height).all():
            return tiles
        x = (
            torch.arange(lay.tile_width, device=self.device)[None, :]
            < torch.as_tensor(width, device=self.device)[:, None]
        )
        y = (
            torch.arange(lay.tile_height, device=self.device)[None, :]
            < torch.as_tensor(height, device=self.device)[:, None]
        )
        inside = (y[:, :, None] & x[:, None, :])[:, None]  # (u, 1, H, W)
        return torch.where(inside, tiles, torch.full_like(tiles, 255))

    def _gather(self, slots: np.ndarray, left: np.ndarray, top: np.ndarray, side: int, shrink: int) -> torch.Tensor:
        """(n, side, side, 3): each square of the level shrunk `shrink` times, from the cached tiles its slots name."""
        th, tw = self.layout.tile_height // shrink, self.layout.tile_width // shrink
        unique, where = np.unique(slots, return_inverse=True)
        white = torch.full((3, th, tw), 255, dtype=torch.uint8, device=self.device)
        stack = torch.stack([self._cache[(int(i), shrink)] if i >= 0 else white for i in unique])
        where_t = torch.as_tensor(where.reshape(slots.shape), device=self.device)
        y = torch.as_tensor(top - top // th * th, device=self.device)[:, None] + torch.arange(side, device=self.device)
        x = torch.as_tensor(left - left // tw * tw, device=self.device)[:, None] + torch.arange(
            side, device=self.device
        )
        n = torch.arange(len(slots), device=self.device)[:, None, None]
        tile = where_t[n, (y // th)[:, :, None], (x // tw)[:, None, :]]  # (n, side, side): which cached tile
        return stack[tile, :, (y % th)[:, :, None], (x % tw)[:, None, :]]  # (n, side, side, 3)


def check_device_decode(reader: JpegTileReader, device: torch.device) -> str | None:
    """None when the level's middle stored tile decodes on `device` within DEVICE_TOLERANCE levels (mean)
    of libjpeg's decode (the exact reader's), else what differs."""
    index = len(reader.layout.offsets) // 2
    try:
        data = reader._stored(index)
        expected = _to_rgb(reader._decode_words(index, data, 1)).astype(np.int16)
        image = decode_streams([torch.frombuffer(bytearray(reader._complete_stream(data)), dtype=torch.uint8)], device)
    except (SlideError, RuntimeError) as err:
        return f"stored tile {index} does not decode on {device} and with libjpeg alike ({err})"
    finally:
        reader.close()
    got = image[0].permute(1, 2, 0).cpu().numpy().astype(np.int16)
    if got.shape != expected.shape:
        return f"stored tile {index} decodes to {got.shape} on {device}, {expected.shape} with libjpeg"
    diff = float(np.abs(got - expected).mean())
    if diff > DEVICE_TOLERANCE:
        return f"stored tile {index} decoded on {device} differs from libjpeg's by {diff:.2f} levels on average (> {DEVICE_TOLERANCE})"
    return None


def resolve_reader(
    setting: str, device: torch.device, sample: Sample, tile_px: int | None, tile_mpp: float | None
) -> tuple[str, str]:
    """The reader a job uses (fast, exact or gpu) for `features.reader` = setting, and why.

    fast, exact: as asked. gpu: the device path where the slide's level is JPEG-tiled and the device
    decodes its tiles as libjpeg does (check_device_decode), else exact (the pixels gpu stands for).
    auto: gpu on CUDA where that holds and every tile is the level halved or as is (no host resize),
    else fast. This choice is made without a measured GPU figure (docs/extract.md)."""
    if setting in ("fast", "exact"):
        return setting, f"features.reader is {setting}"
    fallback = "exact" if setting == "gpu" else "fast"
    if tile_px is None or tile_mpp is None:
        return fallback, "the slide has no tiles"
    if setting == "auto" and device.type != "cuda":
        return "fast", f"features.reader is auto and the device is {device.type}"
    with Slide(sample.path, sample.slide_id, sample.mpp, sample.backend or "auto") as slide:
        reader = open_tile_reader(slide, tile_mpp, tile_px, exact=True)
    if not isinstance(reader, JpegTileReader):
        return fallback, f"the slide's level is not JPEG-tiled ({_why_not(reader)})"
    if setting == "auto" and reader.level_px not in (tile_px, 2 * tile_px):
        return "fast", f"tiles are {reader.level_px} level px resized to {tile_px}: resized on the host, not the device"
    problem = check_device_decode(reader, device)
    if problem is not None:
        return fallback, problem
    return "gpu", f"stored JPEG tiles decoded in batches on {device}"
