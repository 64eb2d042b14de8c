"""Benchmarks of the feature-extraction stage (pathwsi.features.extract), on the CPU or a CUDA GPU.

1. Pipeline efficiency: end-to-end tiles/s of `extract_slide` (read each tile once from the JPEG
   slide, Macenko-normalize, both Xceptions, write the Zarr store) vs the two models alone on
   random tensors of the same batch size, in the same run. Target on CPU: >= 90 %.
2. Memory: peak RSS (VmHWM) of a fresh process extracting 5,000 and 50,000 tiles with a small
   stand-in model (timm test_resnet at 64 px), so reading, normalizing and writing dominate.
   The 50,000 tile positions cycle over the slide's grid (a 40x slide of 20,480² px holds 2,025
   tiles of 224 px at 0.5 µm/px), which exercises the same code paths. Target: flat, < 3 GB.
3. On CUDA (when present): tiles/s end to end for both models at 224 px; the card is named.
   Goal: >= 2,000 tiles/s on one H100-class card. `--workers` DataLoader workers read the slide;
   `--cudnn-benchmark` lets cuDNN time its convolution algorithms first (printed either way).

The slide is the one of benchmarks/bench_reader.py (written once to benchmarks/.cache/).
Models use untrained weights: speed does not depend on the weights.

    python benchmarks/bench_extract.py [--tiles 192] [--rounds 3] [--batch 32] [--workers N] [--reader fast|exact] [--arch keras_xception|legacy_xception] [--compile] [--cudnn-benchmark] [--skip-memory]
    GPU: python benchmarks/bench_extract.py --tiles 61440 --batch 256 --workers 14 --skip-memory
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reader import ensure_slide  # noqa: E402

from pathwsi.features.backbones import ModelSpec, build_backbone  # noqa: E402
from pathwsi.features.extract import ExtractSettings, extract_slide  # noqa: E402
from pathwsi.samples import Sample  # noqa: E402
from pathwsi.stain.macenko import StainSettings, default_reference, fit_slide  # noqa: E402

warnings.filterwarnings("ignore", message="model .* uses UNTRAINED weights")
GRID, STEP0 = 45, 448  # 45 x 45 tiles of 448 level-0 px (224 px at 0.5 µm/px from 0.25 µm/px)


def tile_positions(count: int) -> np.ndarray:
    """`count` level-0 tile corners, row-major over the slide's grid, cycling when count > grid."""
    index = np.arange(count) % (GRID * GRID)
    return np.stack([(index % GRID) * STEP0 + 1024, (index // GRID) * STEP0 + 1024], axis=1).astype(np.int64)


def tiles_meta(slide: Path, coords: np.ndarray) -> dict:
    """The tiling metadata extract_slide needs, with a real stain fit from 16 of the tiles."""
    from pathwsi.slides.slide import Slide

    with Slide(slide) as handle:
        sample = [handle.read_region(x, y, 224, 224, 0.5) for x, y in coords[:16]]
    fit = fit_slide(sample, StainSettings(), default_reference())
    return {
        "status": "ok",
        "tile": {"px": 224, "mpp": 0.5, "um": 112.0, "level0_px": 448.0},
        "mpp": {"value": 0.25, "source": "bench"},
        "stain": fit.to_json(),
    }


def models_alone(models: list, batch: int, batches: int, device: torch.device) -> float:
    """Tiles/s of every model on random prepared tensors (no reading, no normalization, no writing)."""
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    with torch.inference_mode(), autocast:
        for model in models:
            model.net(model.prepare(x))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(batches):
            for model in models:
                model.net(model.prepare(x)).float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * batches / (time.perf_counter() - started)


def pipeline(slide: Path, models: list, count: int, settings: ExtractSettings) -> dict:
    coords = tile_positions(count)
    with tempfile.TemporaryDirectory() as folder:
        return extract_slide(
            Sample("bench", "bench", "bench", str(slide)),
            coords,
            np.ones(count, np.float32),
            tiles_meta(slide, coords),
            models,
            settings,
            Path(folder) / "s.zarr",
        )


MEMORY_CHILD = """
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[3])
from bench_extract import pipeline
from pathwsi.features.extract import ExtractSettings
from pathwsi.features.backbones import ModelSpec, build_backbone
from pathlib import Path
model = build_backbone(ModelSpec("small", arch="test_resnet", input_px=64))
timings = pipeline(Path(sys.argv[1]), [model], int(sys.argv[2]), ExtractSettings(batch_size=64, chunk_tiles=512, num_workers=1, device="cpu"))
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"peak_mib": peak / 1024, "tiles_per_s": timings["tiles_per_s"]}))
"""


def memory(slide: Path, count: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(slide), str(count), str(Path(__file__).resolve().parent)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=192, help="tiles for the pipeline-efficiency run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: 1 on the CPU, 4 on CUDA)")
    parser.add_argument(
        "--reader", choices=["fast", "exact"], default="fast", help="features.reader (pathwsi.slides.readers)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (alone and in the pipeline)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternate models-alone and pipeline runs this many times; medians"
    )
    parser.add_argument(
        "--arch", default="keras_xception", help="models.backbones.*.arch of both models (default: keras_xception)"
    )
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    slide = ensure_slide()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    workers = args.workers or (1 if device.type == "cpu" else 4)
    print(
        f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} torch threads'}; "
        f"torch {torch.__version__}; {workers} reader workers ({args.reader} reader); cudnn.benchmark {args.cudnn_benchmark}; torch.compile {args.compile}"
    )
    models = [build_backbone(ModelSpec(name, arch=args.arch), device=device) for name in ("imgnet", "ftx_stand_in")]
    settings = ExtractSettings(
        batch_size=args.batch,
        chunk_tiles=max(512, args.batch),
        num_workers=workers,
        device=str(device),
        compile=args.compile,
        reader=args.reader,
    )
    alone_models = [replace(m, net=torch.compile(m.net)) for m in models] if args.compile else models
    rounds = []  # interleaved, so that load from other processes falls on both alike
    for _ in range(args.rounds):
        rounds.append(
            (
                models_alone(alone_models, args.batch, max(2, args.tiles // args.batch), device),
                pipeline(slide, models, args.tiles, settings),
            )
        )
    alone = statistics.median(a for a, _ in rounds)
    timings = sorted((t for _, t in rounds), key=lambda t: t["tiles_per_s"])[len(rounds) // 2]
    end_to_end = timings["tiles_per_s"]
    label = "4. CUDA" if device.type == "cuda" else "1. CPU"
    goal = "GPU goal >= 2,000 tiles/s end to end" if device.type == "cuda" else "CPU target >= 90 %"
    print(
        f"{label}: two Xceptions ({args.arch}, 224 px, batch {args.batch}), {args.tiles} tiles read from the 40x JPEG SVS, median of {args.rounds} interleaved rounds:"
    )
    print(f"   models alone on random tensors : {alone:8.1f} tiles/s (each tile through both models)")
    print(
        f"   pipeline end to end            : {end_to_end:8.1f} tiles/s  = {end_to_end / alone:.0%} of models alone ({goal})"
    )
    print(
        "   all rounds (alone / pipeline tiles/s): " + ", ".join(f"{a:.1f} / {t['tiles_per_s']:.1f}" for a, t in rounds)
    )
    print(
        f"   main-thread time (median round): waiting on reads {timings['read']:.2f} s, normalize {timings['normalize']:.2f} s, models {timings['model']:.2f} s; writer thread {timings['write']:.2f} s; total {timings['total']:.2f} s"
    )
    if not args.skip_memory:
        small, large = memory(slide, 5_000), memory(slide, 50_000)
        print("2. peak memory, stand-in model (test_resnet, 64 px), fresh process each:")
        print(f"    5,000 tiles: {small['peak_mib']:7.0f} MiB ({small['tiles_per_s']:.0f} tiles/s)")
        print(
            f"   50,000 tiles: {large['peak_mib']:7.0f} MiB ({large['tiles_per_s']:.0f} tiles/s)   ratio {large['peak_mib'] / small['peak_mib']:.2f} (target: flat, < 3 GB)"
        )


if __name__ == "__main__":
    main()
