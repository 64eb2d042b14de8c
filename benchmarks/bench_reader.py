"""Benchmark: reading 224-px tiles at 0.5 µm/px from a synthetic 40x JPEG slide, against two limits.

The slide: 20,480 x 20,480 px at 0.25 µm/px, JPEG quality 90 in 256 x 256 tiles, pyramid 1x and 4x,
about 85 % tissue, level 0 rendered at full resolution (nuclei, fibres, pixel noise; written once
to benchmarks/.cache/, about 2 minutes), self-contained YCbCr 4:2:0 JFIF tiles. The tiles: all
45 x 45 = 2,025 tiles of a central region, row-major. Each method runs in a fresh single-threaded
interpreter (OMP/BLAS threads 1; imagecodecs, libjpeg and PIL's resize are single-threaded),
methods interleaved, median of --repeats runs:

- OpenSlide: `Slide.read_region(x, y, 224, 224, 0.5)` per tile (OpenSlide read + RGBA->RGB + PIL BOX);
- pathwsi reader: `open_tile_reader(slide, 0.5, 224).read(x, y)` per tile, from a cold cache: the
  default, each stored tile decoded at half size in libjpeg-turbo's DCT domain (simplejpeg);
- exact reader: the same with exact=True (full-size decode + PIL-exact BOX halving: read_region's
  pixels bit for bit);
- raw decode: the distinct stored JPEG tiles those output tiles touch, each decoded once at full
  size to RGB with imagecodecs from bytes already in memory (no I/O, no assembly, no resize): the
  limit for a reader that decodes at full size (the exact one), given as output tiles / time;
- raw half-scale decode: the same tiles, each decoded once at half size to RGB with simplejpeg
  (min_height/min_width half the tile): the limit for a reader that decodes at half size. The
  default reader's >= 80 % target is judged against this one; its rate against the full-size raw
  decode is printed too (it can pass 100 %: it decodes less than a full decode does).

Rates use the child's CPU time (time.process_time: this machine's 2 cores are shared, and a
single-threaded loop with a warm page cache does not wait on I/O); wall-clock rates are printed too.
Peak memory is the child's VmHWM (interpreter and imports included). An extra line reads the same
file as a TCGA-like 0.2527 µm/px scan (sample-sheet override): the shrink is then not exactly 2x
and goes through PIL's BOX resize.

    python benchmarks/bench_reader.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
SLIDE = CACHE / "bench_reader_20480_40x.svs"
SIDE_PX, MPP0, TILE_PX, TILE_MPP, GRID = 20_480, 0.25, 224, 0.5, 45
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TARGET_VS_OPENSLIDE, TARGET_VS_RAW = 3.0, 0.80
METHODS = ["openslide", "reader", "reader-exact", "raw", "raw-half", "reader-0.2527"]


def ensure_slide() -> Path:
    """Write the benchmark slide once (full-resolution rendering)."""
    if SLIDE.is_file():
        return SLIDE
    from pathwsi.demo.slides import SyntheticTissue, write_slide

    CACHE.mkdir(exist_ok=True)
    side_um = SIDE_PX * MPP0
    tissue = SyntheticTissue(side_um, side_um, seed=7, tissue_cover=0.85, background_band=0.0)
    print(f"writing {SLIDE} (once, about 2 minutes) ...", file=sys.stderr)
    partial = SLIDE.with_suffix(".partial.svs")
    write_slide(partial, tissue, MPP0, "svs", downsamples=(1, 4))
    partial.replace(SLIDE)
    return SLIDE


def corners(span: int) -> list[tuple[int, int]]:
    """Level-0 corners of the central GRID x GRID tiles of `span` px, row-major."""
    origin = (SIDE_PX - GRID * span) // 2
    return [(origin + c * span, origin + r * span) for r in range(GRID) for c in range(GRID)]


def stored_tiles(points: list[tuple[int, int]], span: int, tile: int = 256) -> list[tuple[int, int]]:
    """Distinct (row, col) stored tiles the tiles at `points` touch."""
    return sorted(
        {
            (r, c)
            for x, y in points
            for r in range(y // tile, (y + span - 1) // tile + 1)
            for c in range(x // tile, (x + span - 1) // tile + 1)
        }
    )


def child(method: str, path: str) -> dict:
    """One timed run in this (fresh) process."""
    from pathwsi.slides.readers import jpeg_level, open_tile_reader
    from pathwsi.slides.slide import Slide

    override = 0.2527 if method == "reader-0.2527" else None
    slide = Slide(path, mpp_override=override)
    span = round(TILE_PX * TILE_MPP / slide.mpp.value)
    points = corners(span)
    extra: dict = {}
    if method == "openslide":
        started, cpu = time.perf_counter(), time.process_time()
        for x, y in points:
            slide.read_region(x, y, TILE_PX, TILE_PX, TILE_MPP)
    elif method in ("reader", "reader-exact", "reader-0.2527"):
        reader = open_tile_reader(slide, TILE_MPP, TILE_PX, exact=method == "reader-exact")
        started, cpu = time.perf_counter(), time.process_time()
        for x, y in points:
            reader.read(x, y)
        extra = {"reader": reader.name, "decodes": getattr(reader, "decodes", None)}
    else:
        import imagecodecs
        import simplejpeg

        layout = jpeg_level(slide, slide.levels[0])
        tiles = stored_tiles(points, span, layout.tile_width)
        with open(path, "rb") as fh:
            data = [
                os.pread(fh.fileno(), int(layout.bytecounts[i]), int(layout.offsets[i]))
                for i in (r * layout.tiles_across + c for r, c in tiles)
            ]
        colorspace = "RGB" if layout.rgb_components else "YCBCR"
        half_h, half_w = layout.tile_height // 2, layout.tile_width // 2
        assert method == "raw" or (layout.tables is None and not layout.rgb_components), (
            "the half-scale limit decodes the stored bytes as they are: self-contained YCbCr tiles"
        )
        started, cpu = time.perf_counter(), time.process_time()
        if method == "raw":
            for item in data:
                imagecodecs.jpeg8_decode(item, tables=layout.tables, colorspace=colorspace, outcolorspace="RGB")
        else:
            for item in data:
                simplejpeg.decode_jpeg(item, "RGB", min_height=half_h, min_width=half_w)
        extra = {"stored_tiles": len(tiles)}
    cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - started
    peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return {
        "tiles": len(points),
        "tiles_per_s": len(points) / cpu_s,
        "wall_tiles_per_s": len(points) / wall_s,
        "peak_mib": peak_kib / 1024,
        **extra,
    }


def run_child(method: str, slide: Path) -> dict:
    env = {**os.environ, **SINGLE_THREAD}
    done = subprocess.run(
        [sys.executable, __file__, "--child", method, str(slide)], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(done.stdout)


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SLIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    slide = ensure_slide()
    warm_page_cache(slide)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            runs[method].append(run_child(method, slide))
    med = {
        m: {k: statistics.median(r[k] for r in rs) for k in ("tiles_per_s", "wall_tiles_per_s", "peak_mib")}
        for m, rs in runs.items()
    }
    first = {m: rs[0] for m, rs in runs.items()}
    print(
        f"slide: {slide.name}  {SIDE_PX}x{SIDE_PX} px at {MPP0} µm/px, JPEG q90 256x256 tiles, level 0 rendered at full resolution"
    )
    print(
        f"tiles: {first['openslide']['tiles']} of {TILE_PX} px at {TILE_MPP} µm/px ({GRID}x{GRID}, row-major), "
        f"touching {first['raw']['stored_tiles']} stored tiles; one thread, median of {args.repeats}"
    )
    print(f"  {'method':52s} {'tiles/s':>8s} {'(wall)':>8s} {'peak MiB':>9s}")
    labels = {
        "openslide": "OpenSlide read_region + resize, per tile",
        "reader": f"pathwsi {first['reader']['reader']} reader, DCT half (decodes: {first['reader']['decodes']})",
        "reader-exact": f"pathwsi reader, exact=True (decodes: {first['reader-exact']['decodes']})",
        "raw": "raw decode of the stored tiles, once each",
        "raw-half": "raw half-scale decode of the same, once each",
        "reader-0.2527": "extra: reader, level 0 as 0.2527 µm/px (PIL BOX)",
    }
    for method in METHODS:
        print(
            f"  {labels[method]:52s} {med[method]['tiles_per_s']:8.0f} {med[method]['wall_tiles_per_s']:8.0f} {med[method]['peak_mib']:9.0f}"
        )

    def ratio(method: str, limit: str) -> float:
        return med[method]["tiles_per_s"] / med[limit]["tiles_per_s"]

    def verdict(value: float, target: float) -> str:
        return "met" if value >= target else "NOT met"

    for method, name in (("reader", "reader"), ("reader-exact", "exact reader")):
        vs_openslide = ratio(method, "openslide")
        print(
            f"{name} / OpenSlide: {vs_openslide:.2f}x (target >= {TARGET_VS_OPENSLIDE:g}x: {verdict(vs_openslide, TARGET_VS_OPENSLIDE)})"
        )
    vs_half, vs_raw = ratio("reader", "raw-half"), ratio("reader-exact", "raw")
    print(
        f"reader / raw decode: {ratio('reader', 'raw'):.0%} (it decodes at half scale: its limit is the half-scale decode)"
    )
    print(
        f"reader / raw half-scale decode: {vs_half:.0%} (target >= {TARGET_VS_RAW:.0%}: {verdict(vs_half, TARGET_VS_RAW)})"
    )
    print(f"exact reader / raw decode: {vs_raw:.0%} (target >= {TARGET_VS_RAW:.0%}: {verdict(vs_raw, TARGET_VS_RAW)})")
    print(
        "all runs (tiles/s, CPU time): "
        + "; ".join(f"{m} " + ", ".join(f"{r['tiles_per_s']:.0f}" for r in rs) for m, rs in runs.items())
    )


if __name__ == "__main__":
    main()
