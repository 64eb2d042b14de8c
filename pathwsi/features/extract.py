"""The per-slide feature job: read each kept tile once at the tile µm/px, stain-normalize it once
with the slide's fit (its `stain.method`), feed the same batch to every configured model, and write the
features into a resumable Zarr store (pathwsi.features.store).

DataLoader workers each open their own slide handle; tiles are read in the tile table's
row-major order (neighbours share stored JPEG tiles); writing runs on a background thread, so
reading (workers), normalizing + models (main thread) and writing overlap. On CUDA a batch's
normalization, models and copy back are queued before the previous batch's features are
collected, so the GPU is not idle while the main thread waits for the next batch; stage times
come from CUDA events, without extra synchronization.

`features.reader: gpu` (or `auto` on CUDA) moves the JPEG decoding from the workers to the device
(pathwsi.features.gpu_decode): workers send the stored tiles' bytes, the main thread decodes a batch
of them at once. `features.compile` decides per job whether the models run through torch.compile
(pathwsi.features.compile_policy); compiled models see one batch shape, so the last, partial batch
is padded with white tiles to the full size and the padding's features are dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pathwsi import __version__
from pathwsi.errors import ConfigError
from pathwsi.features.backbones import PRECISIONS, Backbone
from pathwsi.features.compile_policy import CompileSettings, job_nets
from pathwsi.features.store import StoreWriter, open_writer
from pathwsi.samples import Sample
from pathwsi.slides.tile_record import TilesRecord, TilesRecordError
from pathwsi.stain.macenko import StainFit
from pathwsi.stain.torch_apply import normalize_tiles

log = logging.getLogger(__name__)
READERS = ("fast", "exact", "gpu", "auto")
Batches = Iterator[tuple[torch.Tensor, list[str]]]


@dataclass(frozen=True)
class ExtractSettings:
    """Config section `features`."""

    batch_size: int = 32
    chunk_tiles: int = 512  # tiles per Zarr chunk and per resume step (rounded up to whole batches)
    num_workers: int = 1
    dtype: str = "float16"
    # fast: half-size JPEG decode where it applies; exact: OpenSlide's pixels (pathwsi.slides.readers);
    # gpu: the exact reader's tiles decoded in batches on the device (gpu_decode.resolve_reader); auto: gpu on CUDA, else fast
    reader: str = "fast"
    device: str = "auto"  # auto: CUDA when present, else CPU
    compile: bool | str = "auto"  # auto | true | false (pathwsi.features.compile_policy)
    # Inductor's cache folder; None: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/pathwsi/inductor
    compile_cache: str | None = None
    compile_min_tiles: int = 100_000  # auto compiles on CUDA slides of at least this many tiles...
    compile_min_tiles_warm: int = 10_000  # ...or this many when Inductor's cache holds the compile already

    def __post_init__(self) -> None:
        problems = []
        if self.reader not in READERS:
            problems.append(f"key 'features.reader': '{self.reader}' is not one of {', '.join(READERS)}")
        if not (self.compile is True or self.compile is False or self.compile == "auto"):
            problems.append(f"key 'features.compile': {self.compile!r} is not one of auto, true, false")
        if problems:
            raise ConfigError("features", problems)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ExtractSettings:
        """From a validated config's `features` section (`threads` is the job's, not the extraction's)."""
        return cls(**{key: value for key, value in config["features"].items() if key != "threads"})

    @property
    def aligned_chunk(self) -> int:
        return -(-self.chunk_tiles // self.batch_size) * self.batch_size

    @property
    def compiling(self) -> CompileSettings:
        return CompileSettings(self.compile, self.compile_cache, self.compile_min_tiles, self.compile_min_tiles_warm)


class SlideTiles(Dataset):
    """Tiles of one slide by index; each worker process opens its own slide handle on first use."""

    def __init__(
        self, sample: Sample, coords: np.ndarray, tile_px: int, tile_mpp: float, start: int = 0, exact: bool = False
    ):
        self.sample, self.coords, self.tile_px, self.tile_mpp, self.start, self.exact = (
            sample,
            coords,
            tile_px,
            tile_mpp,
            start,
            exact,
        )
        self._reader: Any = None

    def __len__(self) -> int:
        return len(self.coords) - self.start

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """The tile, and "" or why it could not be read (then the tile is blank and its features are not used)."""
        from pathwsi.slides.slide import SlideError

        if self._reader is None:
            self._reader = open_reader(self.sample, self.tile_mpp, self.tile_px, self.exact)
        x, y = self.coords[self.start + index]
        try:
            return torch.from_numpy(self._reader.read(int(x), int(y))), ""
        except SlideError as err:  # a damaged tile of the file: record it, go on with the others
            log.warning(
                "%s: tile at level-0 (%d, %d) cannot be read; it is left out: %s", self.sample.slide_id, x, y, err
            )
            self._reader = None  # OpenSlide handles stay in an error state: the next tile opens the slide anew
            return torch.zeros((self.tile_px, self.tile_px, 3), dtype=torch.uint8), str(err)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}


def open_reader(sample: Sample, mpp: float, tile_px: int, exact: bool = False) -> Any:
    """The fastest reader for this slide (decoding stored JPEG tiles once where possible)."""
    from pathwsi.slides.readers import open_tile_reader
    from pathwsi.slides.slide import Slide

    return open_tile_reader(
        Slide(sample.path, sample.slide_id, sample.mpp, sample.backend or "auto"), mpp, tile_px, exact=exact
    )


def _stain_record(record: TilesRecord, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """These keys of the stored stain record, and its `method` unless it is macenko (absent from records made
    before `stain.method` existed): a Macenko store keeps its hash and attrs, so it still resumes."""
    stain = record.stain_json()
    if not stain:
        return None
    method = stain.get("method", "macenko")
    return {k: stain[k] for k in keys} | ({"method": method} if method != "macenko" else {})


def _backend_record(record: TilesRecord) -> dict[str, str]:
    """{"backend": the library the slide was read with} unless it is OpenSlide (absent from stores made before
    backends existed, which then still match and resume)."""
    return {"backend": record.backend} if record.backend not in ("openslide", None) else {}


def _tile_record(record: TilesRecord) -> dict[str, Any] | None:
    return asdict(record.tile) if record.tile is not None else None


def settings_hash(record: TilesRecord, models: list[Backbone], dtype: str, reader: str) -> str:
    """A hash of everything that shapes the features: tiles, reader, stain parameters, model weights, dtype."""
    shaping = {
        "tile": _tile_record(record),
        "reader": reader,
        "stain": _stain_record(record, ("params", "target")),
        "models": {m.spec.name: {**asdict(m.spec), "weights_sha256": m.weights_sha256} for m in models},
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def store_attrs(
    sample: Sample, record: TilesRecord, models: list[Backbone], settings: ExtractSettings
) -> dict[str, Any]:
    """The store's attrs (all but `complete`): ids, geometry, stain, model provenance, hash."""
    warnings = [record["warning"] for record in (m.provenance() for m in models) if "warning" in record]
    return json.loads(
        json.dumps(
            {
                "slide_id": sample.slide_id,
                "patient_id": sample.patient_id,
                "cohort": sample.cohort,
                "tiling_status": record.status,
                "tiling_reason": record.reason,
                "tile": _tile_record(record),
                "mpp": asdict(record.mpp) if record.mpp is not None else None,
                "stain": _stain_record(record, ("status", "reason", "params", "target")),
                "models": {m.spec.name: m.provenance() for m in models},
                "warnings": warnings,
                "pathwsi_version": __version__,
                "reader": settings.reader,
                "config_hash": settings_hash(record, models, settings.dtype, settings.reader),
                **_backend_record(record),
            }
        )
    )


def extract_slide(
    sample: Sample,
    tiles: np.ndarray,
    fractions: np.ndarray,
    record: TilesRecord,
    models: list[Backbone],
    settings: ExtractSettings,
    store_path: Path,
) -> dict[str, float]:
    """Extract and store the features of one slide's tiles; resumes a killed run; tiles that cannot be
    read are recorded in the store and left out. Returns timings (seconds per stage; `compiled` 1 or 0).

    The store records the reader used (`features.reader` auto or gpu resolved for this slide and device); the
    slide is opened with the backend its tiling job used."""
    sample = replace(sample, backend=record.backend or sample.backend)
    settings = replace(settings, reader=_resolve_reader(sample, record, models, settings, len(tiles)))
    writer = open_writer(
        store_path,
        tiles,
        fractions,
        {m.spec.name: m.feature_dim for m in models},
        store_attrs(sample, record, models, settings),
        settings.aligned_chunk,
        settings.dtype,
    )
    try:
        return _extract(sample, tiles, record, models, settings, writer)
    finally:
        writer.close()


def _resolve_reader(
    sample: Sample, record: TilesRecord, models: list[Backbone], settings: ExtractSettings, n_tiles: int
) -> str:
    """fast or exact as configured; auto and gpu resolved for this slide and device (gpu_decode.resolve_reader)."""
    if settings.reader in ("fast", "exact"):
        return settings.reader
    from pathwsi.features.gpu_decode import resolve_reader

    tile = record.tile if n_tiles else None
    device = next(models[0].net.parameters()).device
    reader, why = resolve_reader(settings.reader, device, sample, tile.px if tile else None, tile.mpp if tile else None)
    level = logging.WARNING if settings.reader == "gpu" and reader != "gpu" else logging.INFO
    log.log(level, "%s: features.reader %s -> %s (%s)", sample.slide_id, settings.reader, reader, why)
    return reader


def _extract(
    sample: Sample,
    tiles: np.ndarray,
    record: TilesRecord,
    models: list[Backbone],
    settings: ExtractSettings,
    writer: StoreWriter,
) -> dict[str, float]:
    device = next(models[0].net.parameters()).device
    start = len(tiles) if writer.already_complete else writer.first_pending_tile
    timings = {"read": 0.0, "decode": 0.0, "normalize": 0.0, "model": 0.0, "write": 0.0, "tiles": len(tiles) - start}
    timings.update(compile=0.0, compiled=0.0)
    if start == len(tiles):
        writer.finish()
        return timings
    if start:
        log.info(
            "%s: resuming at tile %d of %d (%d chunks already stored)",
            sample.slide_id,
            start,
            len(tiles),
            writer.chunks_done,
        )
    if record.stain is None or record.tile is None:
        raise TilesRecordError(
            f"{sample.slide_id}: its tiling record has tiles but no stain fit or tile geometry; rerun its tiling"
        )
    stain, tile = record.stain, record.tile

    def warm_up(compiled: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
        blank = torch.full((settings.batch_size, tile.px, tile.px, 3), 255, dtype=torch.uint8, device=device)
        _launch(blank, [""] * settings.batch_size, stain, models, compiled, device).wait({"normalize": 0, "model": 0})

    nets, compiling = job_nets(
        models, device, len(tiles) - start, settings.batch_size, tile.px, settings.compiling, warm_up
    )
    timings.update(compile=compiling["seconds"], compiled=float(compiling["compiled"]))
    pad_to = settings.batch_size if compiling["compiled"] else None
    pending: dict[str, list[np.ndarray]] = {m.spec.name: [] for m in models}
    unreadable: dict[int, str] = {}  # tile index -> why, in the chunk being gathered
    chunk_index, done = writer.chunks_done, start
    started = time.perf_counter()
    with (
        ThreadPoolExecutor(1) as write_pool,
        tqdm(total=len(tiles), initial=start, unit="tile", desc=sample.slide_id, disable=None) as progress,
    ):
        last: Future | None = None

        def collect(batch: Launched) -> None:
            """Wait for one launched batch's features, then queue each finished chunk for writing."""
            nonlocal done, chunk_index, pending, unreadable, last
            for name, values in batch.wait(timings).items():
                pending[name].append(values)
            unreadable.update({done + i: reason for i, reason in enumerate(batch.unreadable) if reason})
            done += batch.size
            progress.update(batch.size)
            if done == writer.chunk_end(chunk_index):  # batches never straddle chunks: chunks hold whole batches
                last = _submit(write_pool, writer, chunk_index, pending, unreadable, timings, last)
                pending, unreadable = {name: [] for name in pending}, {}
                chunk_index += 1

        previous: Launched | None = None
        for batch, reasons in _batches(sample, tiles, tile.px, tile.mpp, start, settings, device, timings):
            launched = _launch(batch, reasons, stain, models, nets, device, pad_to)
            if previous is not None:  # the GPU already has the next batch queued while we wait here
                collect(previous)
            previous = launched
        if previous is not None:
            collect(previous)
        if last is not None:
            last.result()
    writer.finish()
    timings["total"] = time.perf_counter() - started
    timings["tiles_per_s"] = timings["tiles"] / timings["total"] if timings["total"] else 0.0
    return timings


def _batches(
    sample: Sample,
    coords: np.ndarray,
    tile_px: int,
    tile_mpp: float,
    start: int,
    settings: ExtractSettings,
    device: torch.device,
    timings: dict[str, float],
) -> Batches:
    """The slide's tiles from `start` on, batch by batch, each with per tile "" or why it could not be read;
    adds the seconds spent waiting on the workers (`read`) and decoding on the device (`decode`)."""
    if settings.reader == "gpu":
        from pathwsi.features.gpu_decode import CompressedTiles, DeviceDecoder

        compressed = DataLoader(
            CompressedTiles(sample, coords, tile_px, tile_mpp, start, settings.batch_size),
            batch_size=None,
            num_workers=settings.num_workers,
        )
        decoder = DeviceDecoder(open_reader(sample, tile_mpp, tile_px, exact=True), device)
        for item in _waited_for(compressed, timings):
            decoding = time.perf_counter()
            decoded = decoder(item)
            timings["decode"] += time.perf_counter() - decoding  # the main thread's time in the decoder
            yield decoded
        return
    loader = DataLoader(
        SlideTiles(sample, coords, tile_px, tile_mpp, start, exact=settings.reader == "exact"),
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    for batch, reasons in _waited_for(loader, timings):
        yield batch, list(reasons)


def _waited_for(items: Iterable[Any], timings: dict[str, float]) -> Iterator[Any]:
    """`items`, adding the seconds spent waiting for each (on the reader workers) to `timings["read"]`."""
    waited = time.perf_counter()
    for item in items:
        timings["read"] += time.perf_counter() - waited
        yield item
        waited = time.perf_counter()


@dataclass
class Launched:
    """One batch whose normalization, models and copy back to the host are queued on the device."""

    size: int
    unreadable: list[str]  # per tile: "" or why it could not be read
    features: dict[str, torch.Tensor]  # host tensors, filled asynchronously on CUDA
    marks: list[Any]  # CUDA events (or perf_counter times on the CPU): start, normalized, each model done

    def wait(self, timings: dict[str, float]) -> dict[str, np.ndarray]:
        """Block until the features are on the host; add the device's normalize and model seconds."""
        if isinstance(self.marks[-1], torch.cuda.Event):
            self.marks[-1].synchronize()
        timings["normalize"] += _seconds(self.marks[0], self.marks[1])
        timings["model"] += _seconds(self.marks[1], self.marks[-1])
        return {name: values.numpy() for name, values in self.features.items()}


def _launch(
    batch: torch.Tensor,
    unreadable: list[str],
    stain: StainFit,
    models: list[Backbone],
    nets: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    device: torch.device,
    pad_to: int | None = None,
) -> Launched:
    """Queue the batch's normalization (once) and every model on it, and the copy of the features back.

    pad_to: a shorter batch is padded with white tiles to this size (a compiled model's one shape) and
    the padding's features are dropped."""
    size = len(batch)
    if pad_to is not None and size < pad_to:
        batch = torch.cat([batch, batch.new_full((pad_to - size, *batch.shape[1:]), 255)])
    marks = [_mark(device)]
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2)
    x = normalize_tiles(x, stain)
    marks.append(_mark(device))
    features = {}
    for model in models:
        autocast = (
            torch.autocast("cuda", dtype=PRECISIONS[model.spec.precision]) if device.type == "cuda" else nullcontext()
        )
        with torch.inference_mode(), autocast:
            out = nets[model.spec.name](model.prepare(x))[:size]
            features[model.spec.name] = out.float().to("cpu", non_blocking=True)
    marks.append(_mark(device))
    return Launched(size, unreadable, features, marks)


def _mark(device: torch.device) -> Any:
    """A point in the device's stream: a recorded CUDA event, or the time now on the CPU."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))  # the stream the batch's work is queued on (cuda:N too)
    return event


def _seconds(begin: Any, end: Any) -> float:
    return begin.elapsed_time(end) / 1000 if isinstance(begin, torch.cuda.Event) else end - begin


def _submit(
    pool: ThreadPoolExecutor,
    writer: Any,
    index: int,
    pending: dict[str, list[np.ndarray]],
    unreadable: dict[int, str],
    timings: dict[str, float],
    last: Future | None,
) -> Future:
    """Queue chunk `index` for writing after the previous one (one writer thread keeps the order)."""
    arrays = {name: np.concatenate(parts) for name, parts in pending.items()}

    def write() -> None:
        clock = time.perf_counter()
        writer.write_chunk(index, arrays, unreadable)
        timings["write"] += time.perf_counter() - clock

    if last is not None:
        last.result()  # at most one chunk in flight: bounded memory, errors surface promptly
    return pool.submit(write)
