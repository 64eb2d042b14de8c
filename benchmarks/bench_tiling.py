"""Benchmark: tissue detection + tile grid on a synthetic 40x slide of 40,960 x 40,960 px.

The slide: 0.25 µm/px, JPEG 256x256 tiles, pyramid at 4x, 16x and 64x, about 35 % tissue
(written once to benchmarks/.cache/; level 0 is rendered at 1 µm/px and enlarged, so writing
it takes minutes, not an hour). Each run is a fresh interpreter, as a Snakemake job is, and
prints separately: interpreter + import start-up, the work itself (open, thumbnail, mask,
grid, tissue fractions), peak memory (the process's VmHWM) and the tiles found. Median of --repeats runs.

    python benchmarks/bench_tiling.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
SLIDE = CACHE / "bench_40960_40x_v2.svs"
SIDE_PX, MPP = 40_960, 0.25

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from pathwsi.slides.slide import Slide
from pathwsi.slides.grid import TileSettings, tile_grid, tissue_fractions
from pathwsi.slides.tissue_mask import TissueSettings, detect_tissue
t1 = time.perf_counter()
settings, tiling = TissueSettings(), TileSettings()
with Slide(sys.argv[1]) as slide:
    mask = detect_tissue(slide.read_whole(settings.mask_mpp), settings.mask_mpp, settings)
    grid = tile_grid(slide.width, slide.height, slide.mpp.value, tiling.tile_um)
    um = (slide.width * slide.mpp.value, slide.height * slide.mpp.value)
    kept = int((tissue_fractions(grid, slide.mpp.value, tiling.tile_um, mask, um) >= tiling.min_tissue_fraction).sum())
t2 = time.perf_counter()
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"imports_s": t1 - t0, "work_s": t2 - t1, "max_rss_mib": peak_kib / 1024,
                  "tiles": kept, "grid": len(grid), "tissue_share": float(mask.mask.mean()), "mask_level": slide.level_for(settings.mask_mpp).index}))
"""


def ensure_slide() -> Path:
    """Write the benchmark slide once."""
    if SLIDE.is_file():
        return SLIDE
    from pathwsi.demo.slides import SyntheticTissue, write_slide

    CACHE.mkdir(exist_ok=True)
    side_um = SIDE_PX * MPP
    tissue = SyntheticTissue(side_um, side_um, seed=40, tissue_cover=0.4, background_band=0.15)
    started = time.perf_counter()
    print(f"writing {SLIDE} (once) ...", file=sys.stderr)
    partial = SLIDE.with_suffix(".partial.svs")
    write_slide(partial, tissue, MPP, "svs", downsamples=(1, 4, 16, 64), level0_render_mpp=1.0)
    partial.replace(SLIDE)
    print(f"  {SLIDE.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return SLIDE


def run_once(slide: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(slide)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    result["wall_s"] = time.perf_counter() - started
    result["startup_s"] = result["wall_s"] - result["work_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    slide = ensure_slide()
    run_once(slide)  # warm the page cache and .pyc files
    runs = [run_once(slide) for _ in range(args.repeats)]
    median = {
        key: statistics.median(r[key] for r in runs)
        for key in ("wall_s", "startup_s", "imports_s", "work_s", "max_rss_mib")
    }
    first = runs[0]
    print(
        f"slide: {SIDE_PX} x {SIDE_PX} px at {MPP} µm/px, JPEG 256² tiles, levels 1/4/16/64x; mask from level {first['mask_level']}"
    )
    print(
        f"tissue share of the mask: {first['tissue_share']:.1%}; grid {first['grid']} tiles of 224 px at 0.5 µm/px; kept {first['tiles']}"
    )
    print(f"median of {args.repeats} fresh interpreters:")
    print(f"  whole command        {median['wall_s']:.3f} s   (target < 1 s)")
    print(f"  start-up (interp.+imports) {median['startup_s']:.3f} s   (imports alone {median['imports_s']:.3f} s)")
    print(f"  work                 {median['work_s']:.3f} s   (target < 0.2 s)")
    print(f"  peak memory (RSS)    {median['max_rss_mib']:.0f} MiB (target < 200 MiB)")


if __name__ == "__main__":
    main()
