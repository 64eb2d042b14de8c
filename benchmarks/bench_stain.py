"""Stain-normalization throughput: each stain.method (one fit per slide + batched apply), and Macenko vs
torchstain tile by tile.

Tiles: `--tiles` 224-px tiles at 0.5 µm/px from one synthetic H&E slide (pathwsi.demo.slides),
each at least half tissue; rendered once and cached under benchmarks/.cache/.
Methods: for macenko, vahadane and reinhard, `fit_slide` on the same seeded sample of
`sample_tiles` tiles (timed `--fits` times, median), then `normalize_tiles` over all tiles on the
CPU, the methods' batches interleaved round by round. The first fit of each method (its imports:
scikit-learn's dictionary learning for vahadane) is timed apart.
pathwsi vs torchstain: `fit_slide` (Macenko), then `normalize_tiles` over
all tiles (uint8 in, uint8 out, host tensors in and out). torchstain: the torch backend's
`TorchMacenkoNormalizer.normalize` per tile (it re-fits every tile), to the same target.
Both run in this process on the same tiles, in interleaved rounds (a pathwsi batch, then a
slice of torchstain's tiles), so that load from other processes on a shared machine falls on
both alike. With CUDA, the apply is also timed on the GPU.

    python benchmarks/bench_stain.py [--tiles 2000] [--torchstain-tiles 2000] [--batch-size 256] [--fits 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pathwsi.demo.slides import SyntheticTissue
from pathwsi.stain.macenko import METHODS, StainFit, StainSettings
from pathwsi.stain.methods import default_target, fit_slide
from pathwsi.stain.torch_apply import normalize_tiles

CACHE = Path(__file__).resolve().parent / ".cache"
TILE_UM = 112.0


def slide_tiles(count: int, seed: int) -> np.ndarray:
    """`count` tissue tiles (N, 224, 224, 3) from one synthetic slide, cached as .npy."""
    path = CACHE / f"stain_tiles_{count}_{seed}.npy"
    if path.is_file():
        return np.load(path)
    tissue = SyntheticTissue(14000.0, 14000.0, seed=seed, background_band=0.0, tissue_cover=0.6)
    grid = [(x, y) for y in np.arange(0, 14000 - TILE_UM, TILE_UM) for x in np.arange(0, 14000 - TILE_UM, TILE_UM)]
    kept = [(x, y) for x, y in grid if tissue.tissue_fraction(x, y, TILE_UM, TILE_UM) >= 0.5]
    if len(kept) < count:
        raise SystemExit(f"the synthetic slide has only {len(kept)} tissue tiles; ask for fewer")
    picks = np.random.default_rng(seed).choice(len(kept), count, replace=False)
    print(f"rendering {count} tiles once (cached in {path}) ...", flush=True)
    tiles = np.stack([tissue.render(*kept[i], 224, 224, 0.5) for i in sorted(picks)])
    CACHE.mkdir(exist_ok=True)
    np.save(path, tiles)
    return tiles


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fit_sample(tiles: np.ndarray, settings: StainSettings, seed: int) -> tuple[StainFit, float]:
    """The slide's one fit from a seeded sample of its tiles, and the seconds it took."""
    started = time.perf_counter()
    sample = np.random.default_rng(seed).choice(len(tiles), min(settings.sample_tiles, len(tiles)), replace=False)
    fit = fit_slide(tiles[sample], settings, default_target(settings.method))
    return fit, time.perf_counter() - started


def apply_seconds(batch: torch.Tensor, fit: StainFit, device: torch.device) -> float:
    """Seconds to normalize one host batch on `device` and bring it back (uint8 in and out)."""
    started = time.perf_counter()
    normalize_tiles(batch.to(device), fit).cpu()
    return time.perf_counter() - started


def torchstain_seconds(normalizer: object, tiles: list[torch.Tensor]) -> tuple[float, int]:
    """Seconds for torchstain to normalize each tile on its own, and the tiles it failed on."""
    failures = 0
    started = time.perf_counter()
    for tile in tiles:
        try:
            normalizer.normalize(tile, stains=False)  # type: ignore[attr-defined]
        except (RuntimeError, IndexError, ValueError):  # torch.linalg.LinAlgError is a RuntimeError
            failures += 1
    return time.perf_counter() - started, failures


def compare_methods(tiles: np.ndarray, batch_size: int, seed: int, fits: int) -> None:
    """Each stain.method's per-slide fit (first, then the median of `fits`) and CPU apply, interleaved batch by
    batch."""
    fitted: dict[str, StainFit] = {}
    first_s: dict[str, float] = {}
    fit_s: dict[str, float] = {}
    for method in METHODS:
        settings = StainSettings(method=method)  # type: ignore[arg-type]
        fitted[method], first_s[method] = fit_sample(tiles, settings, seed)
        fit_s[method] = statistics.median(fit_sample(tiles, settings, seed)[1] for _ in range(fits))
        fit = fitted[method]
        print(f"{method}: {fit.status}{f' ({fit.reason})' if fit.reason else ''}, from {fit.n_tiles} tiles")
    host = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    for fit in fitted.values():
        apply_seconds(host[:8], fit, torch.device("cpu"))  # warm-up
    apply_s = dict.fromkeys(fitted, 0.0)
    for start in range(0, len(tiles), batch_size):
        for method, fit in fitted.items():
            apply_s[method] += apply_seconds(host[start : start + batch_size], fit, torch.device("cpu"))
    base = len(tiles) / apply_s["macenko"]
    print(f"{'method':<10} {'first fit s':>12} {'fit s/slide':>12} {'apply tiles/s':>14} {'apply vs macenko':>17}")
    for method in fitted:
        rate = len(tiles) / apply_s[method]
        print(f"{method:<10} {first_s[method]:>12.3f} {fit_s[method]:>12.3f} {rate:>14.0f} {rate / base:>16.2f}x")
    print(f"(fit s/slide: median of {fits} fits after the first; the first includes imports)")


def compare_on_cpu(tiles: np.ndarray, fit: StainFit, fit_s: float, batch_size: int, torchstain_tiles: int) -> None:
    """pathwsi's apply and torchstain, interleaved round by round; prints rates and ratios."""
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    normalizer = TorchMacenkoNormalizer()  # its built-in target is pathwsi's default reference
    host = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    theirs_tiles = [torch.from_numpy(tile).permute(2, 0, 1) for tile in tiles[:torchstain_tiles]]
    starts = range(0, len(tiles), batch_size)
    per_round = -(-len(theirs_tiles) // len(starts))
    apply_seconds(host[:8], fit, torch.device("cpu"))  # warm-up
    ours_s, theirs_s, failures, round_ratios = 0.0, 0.0, 0, []
    for index, start in enumerate(starts):
        ours = apply_seconds(host[start : start + batch_size], fit, torch.device("cpu"))
        mine = theirs_tiles[index * per_round : (index + 1) * per_round]
        theirs, failed = torchstain_seconds(normalizer, mine)
        ours_s, theirs_s, failures = ours_s + ours, theirs_s + theirs, failures + failed
        if mine:
            round_ratios.append((len(host[start : start + batch_size]) / ours) / (len(mine) / theirs))
    ours_rate, apply_rate, theirs_rate = (
        len(tiles) / (fit_s + ours_s),
        len(tiles) / ours_s,
        len(theirs_tiles) / theirs_s,
    )
    scaled = (
        ""
        if len(theirs_tiles) == len(tiles)
        else f" (timed on {len(theirs_tiles)} tiles, the rate stands for all {len(tiles)})"
    )
    print(f"pathwsi CPU: fit {fit_s:.3f} s, apply {apply_rate:.0f} tiles/s, fit + apply {ours_rate:.0f} tiles/s")
    print(f"torchstain torch backend, tile by tile: {theirs_rate:.0f} tiles/s{scaled}, {failures} failed tiles")
    print(
        f"ratio pathwsi (fit + apply) / torchstain: {ours_rate / theirs_rate:.1f}x; apply alone: {apply_rate / theirs_rate:.1f}x"
    )
    print(
        f"  apply ratio per round: median {np.median(round_ratios):.1f}x, range {min(round_ratios):.1f}-{max(round_ratios):.1f}x"
    )
    print(f"peak RSS of the process (tiles included): {peak_rss_mb():.0f} MB")


def time_on_cuda(tiles: np.ndarray, fit: StainFit, fit_s: float, batch_size: int, repeats: int = 20) -> None:
    """Apply on the GPU: with host copies, and with the batch resident on the GPU."""
    cuda = torch.device("cuda")
    host = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    apply_seconds(host[:8], fit, cuda)  # warm-up: context, allocator
    torch.cuda.reset_peak_memory_stats()
    apply_s = sum(
        apply_seconds(host[start : start + batch_size], fit, cuda) for start in range(0, len(tiles), batch_size)
    )
    print(
        f"pathwsi CUDA incl. host<->device copies: fit + apply {len(tiles) / (fit_s + apply_s):.0f} tiles/s, apply {len(tiles) / apply_s:.0f} tiles/s"
    )
    resident = host[:batch_size].to(cuda)
    normalize_tiles(resident, fit)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        normalize_tiles(resident, fit)
    torch.cuda.synchronize()
    rate = repeats * len(resident) / (time.perf_counter() - started)
    print(
        f"pathwsi CUDA apply only (batch of {len(resident)} resident on the GPU): {rate:.0f} tiles/s; peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=2000)
    parser.add_argument(
        "--torchstain-tiles", type=int, default=2000, help="tiles for torchstain (a subset is timed and scaled)"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fits", type=int, default=3, help="timed fits per method (median)")
    args = parser.parse_args()

    tiles = slide_tiles(args.tiles, args.seed)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; device: {device}")
    print("load average (1, 5, 15 min) at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"{len(tiles)} tiles of {tiles.shape[1]} px; peak RSS after loading: {peak_rss_mb():.0f} MB")
    settings = StainSettings()
    fit, fit_s = fit_sample(tiles, settings, args.seed)
    print(f"pathwsi fit: {fit.status}, {fit.n_od_pixels} tissue pixels from {fit.n_tiles} sampled tiles, {fit_s:.3f} s")
    print("-- stain.method, CPU (same tiles, same sample, batches interleaved) --")
    compare_methods(tiles, args.batch_size, args.seed, args.fits)
    print("-- macenko vs torchstain, CPU --")
    compare_on_cpu(tiles, fit, fit_s, args.batch_size, args.torchstain_tiles)
    if torch.cuda.is_available():
        time_on_cuda(tiles, fit, fit_s, args.batch_size)
    print("load average (1, 5, 15 min) at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
