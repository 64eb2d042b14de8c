"""Inter-slide colour spread of tissue pixels, before and after each slide's Macenko normalization.

For every slide of a run: a seeded sample of `--tiles` of its kept tiles (from the run's
`results/tiles/{slide}.parquet`), read at the tile geometry of its `results/tiles/{slide}.json`
and normalized with the stain parameters recorded there (its fit, or the fallback), with the same
numpy apply as the QC pictures. A slide the run has not tiled is tiled here first (tile job,
default settings, into a temporary folder). Tissue pixels: OD >= beta in at least one channel
(the pixels the apply moves the whole way), chosen on the tile before normalization; the same
pixels are measured after. Each slide gives one mean tissue RGB before and one after; the spread
between slides is the mean and the maximum Euclidean distance between two slides' means (RGB
levels, 0-255), over all pairs, and the standard deviation across slides per channel.

    python benchmarks/bench_stain_spread.py [--run .] [--samples demo/samples.tsv] [--tiles 64] [--per-slide]

`--run` is the working directory of the Snakemake run (its `results/`; relative slide paths of
the sheet are resolved from there).
"""

from __future__ import annotations

import argparse
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pathwsi.samples import Sample, load_samples
from pathwsi.slides.slide import Slide
from pathwsi.slides.tile_job import TilingJobSettings, tile_slide
from pathwsi.slides.tile_record import TilesRecord
from pathwsi.slides.tile_request import TilingOutputs
from pathwsi.stain.macenko import optical_density
from pathwsi.stain.methods import normalize_rgb


@dataclass(frozen=True)
class SlideColour:
    """One slide's mean tissue RGB before and after normalization, and how it was measured."""

    slide_id: str
    status: str  # the stain fit's status: fitted or fallback
    tiles: int
    pixels: int
    before: np.ndarray  # (3,) mean RGB levels
    after: np.ndarray
    max_conc: np.ndarray  # (2,) H, E: the maximum concentrations it is normalized from
    separation_deg: float | None  # angle between its fitted H and E vectors


def slide_colour(sample: Sample, run: Path, tiles: int, seed: int) -> SlideColour | None:
    """The slide's colours; None when it has no tissue tiles (or could not be read)."""
    if (run / "results" / "tiles" / f"{sample.slide_id}.json").is_file():
        return _measure(sample, run, run / "results", tiles, seed)
    with tempfile.TemporaryDirectory(prefix="stain_spread_") as folder:
        tile_slide(sample, TilingJobSettings(), TilingOutputs.under(Path(folder), sample.slide_id))
        return _measure(sample, run, Path(folder), tiles, seed)


def _measure(sample: Sample, run: Path, results: Path, tiles: int, seed: int) -> SlideColour | None:
    record = TilesRecord.load(results / "tiles" / f"{sample.slide_id}.json")
    coords = pq.read_table(results / "tiles" / f"{sample.slide_id}.parquet").to_pandas()[["x", "y"]].to_numpy()
    if record.stain is None or record.tile is None or not len(coords):
        return None
    fit, geometry = record.stain, record.tile
    rng = np.random.default_rng([seed, zlib.crc32(sample.slide_id.encode())])
    picked = np.sort(rng.choice(len(coords), size=min(tiles, len(coords)), replace=False))
    path = Path(sample.path) if Path(sample.path).is_absolute() else run / sample.path
    with Slide(path, sample.slide_id, sample.mpp) as slide:
        before = np.stack([slide.read_region(x, y, geometry.px, geometry.px, geometry.mpp) for x, y in coords[picked]])
    after = normalize_rgb(before, fit)
    tissue = optical_density(before, fit.settings.io).max(axis=-1) >= fit.settings.beta
    return SlideColour(
        sample.slide_id,
        fit.status,
        len(picked),
        int(tissue.sum()),
        before[tissue].mean(axis=0),
        after[tissue].mean(axis=0),
        fit.params.max_conc,
        (fit.angles_deg or {}).get("separation"),
    )


def spread(means: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Mean and max pairwise Euclidean distance of the rows of `means` (slides × RGB), and the per-channel SD."""
    distances = [float(np.linalg.norm(means[i] - means[j])) for i, j in combinations(range(len(means)), 2)]
    return float(np.mean(distances)), float(np.max(distances)), means.std(axis=0, ddof=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("."), help="the run's working directory (its results/)")
    parser.add_argument("--samples", type=Path, default=Path("demo/samples.tsv"), help="relative to --run")
    parser.add_argument("--tiles", type=int, default=64, help="tiles sampled per slide")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--per-slide", action="store_true", help="print each slide's mean colours too")
    args = parser.parse_args()

    samples = load_samples(args.run / args.samples, check_files=False)
    with ProcessPoolExecutor(args.jobs) as pool:
        found = list(
            pool.map(slide_colour, samples, *zip(*[(args.run, args.tiles, args.seed)] * len(samples), strict=True))
        )
    colours = [c for c in found if c is not None]
    if len(colours) < 2:
        raise SystemExit(f"{len(colours)} slide(s) with tissue tiles: a spread needs at least 2")
    if args.per_slide:
        print("slide\tfit\ttiles\ttissue_px\tbefore_R\tbefore_G\tbefore_B\tafter_R\tafter_G\tafter_B")
        for c in colours:
            print(c.slide_id, c.status, c.tiles, c.pixels, *np.round(c.before, 1), *np.round(c.after, 1), sep="\t")
    fitted = [c for c in colours if c.status == "fitted"]
    print(
        f"{len(colours)} slides with tissue ({len(fitted)} with their own stain fit, {len(colours) - len(fitted)} with the"
        f" fallback; {len(samples) - len(colours)} without tissue), up to {args.tiles} tiles each (seed {args.seed})"
    )
    print("slide-mean tissue colour, RGB levels       before      after normalization")
    for name, rows in (("all slides", colours), ("slides with their own fit", fitted)):
        if len(rows) < 2 or (name != "all slides" and len(rows) == len(colours)):
            continue
        before, after = spread(np.stack([c.before for c in rows])), spread(np.stack([c.after for c in rows]))
        print(f"  {name} ({len(rows)}):")
        print(f"    mean pairwise distance           {before[0]:9.1f}  {after[0]:9.1f}")
        print(f"    max pairwise distance            {before[1]:9.1f}  {after[1]:9.1f}")
        for channel, name in enumerate("RGB"):
            print(f"    SD across slides, {name}             {before[2][channel]:9.1f}  {after[2][channel]:9.1f}")
    after_means = np.stack([c.after for c in colours])
    max_conc = np.stack([c.max_conc for c in colours])
    for stain, name in enumerate(("H", "E")):
        r = [np.corrcoef(after_means[:, channel], max_conc[:, stain])[0, 1] for channel in range(3)]
        print(
            f"max concentration normalized from, {name}: {max_conc[:, stain].min():.3f}-{max_conc[:, stain].max():.3f}"
            f" over slides; Pearson r with the after-normalization R, G, B means: {', '.join(f'{v:.2f}' for v in r)}"
        )
    separations = [c.separation_deg for c in fitted if c.separation_deg is not None]
    if separations:
        print(f"fitted H-E separation: {min(separations):.1f}-{max(separations):.1f} degrees over slides")


if __name__ == "__main__":
    main()
