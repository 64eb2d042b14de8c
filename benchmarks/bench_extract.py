"""Benchmarks of the feature-extraction stage (pathwsi.features.extract), on the CPU or a CUDA GPU, in one run.

1. The two models alone on random tiles of the batch size (no reading, normalizing or writing): eager,
   and with --compile compiled too (torch.compile, dynamic=False), with the cold and warm compile
   seconds (two fresh processes sharing one new Inductor cache folder) and the slide size from which
   compiling pays (compile seconds / per-tile saving).
2. End to end, `extract_slide` (read each tile once from the 40x JPEG slide, Macenko-normalize, both
   models, write the Zarr store) with each reader in --readers and each worker count in --workers:
   tiles/s, the ratio to the models alone (compiled when measured), and the per-stage seconds
   (main thread waiting on the workers, device decode, normalize, models; writer thread; total;
   compile seconds, which the total leaves out). Targets on one H100/H200-class card with 16 cores
   (issue 17): >= 6,000 tiles/s and >= 90 % of the compiled models alone; >= 4,000 with 8 workers.
3. On CUDA with the gpu reader: nvJPEG's tiles against the exact reader's (mean and max difference).
4. --baseline DIR: the end-to-end rate of another copy of the package (DIR holds its `pathwsi/`,
   e.g. the last commit: `git archive HEAD pathwsi | tar -x -C DIR`) against this one, eager,
   first reader, first worker count, each in a fresh process, alternating which runs first: "nothing gets slower".
5. Memory: peak RSS (VmHWM) of a fresh process extracting 5,000 and 50,000 tiles with a small
   stand-in model (timm test_resnet at 64 px), so reading, normalizing and writing dominate.
   The 50,000 tile positions cycle over the slide's grid. Target: flat, < 3 GB.

The slide is the one of benchmarks/bench_reader.py (written once to benchmarks/.cache/). Models use
untrained weights: speed does not depend on the weights. Medians of --rounds interleaved rounds.

    python benchmarks/bench_extract.py [--tiles 192] [--batch 32] [--workers 1] [--readers fast exact]
        [--arch keras_xception] [--input-px 224] [--compile] [--baseline DIR] [--rounds 3] [--skip-memory]
    GPU: python benchmarks/bench_extract.py --tiles 61440 --batch 256 --workers 4 8 14 --readers fast exact gpu --compile --skip-memory
"""

from __future__ import annotations

import argparse
import json
import os
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_reader import ensure_slide  # noqa: E402

# only what every version of the package has (--baseline runs `pipeline` against an older copy)
from pathwsi.features.backbones import ModelSpec, build_backbone  # noqa: E402
from pathwsi.features.extract import ExtractSettings, extract_slide  # noqa: E402
from pathwsi.samples import Sample  # noqa: E402
from pathwsi.slides.tile_record import TilesRecord  # noqa: E402
from pathwsi.stain.macenko import StainSettings, default_reference, fit_slide  # noqa: E402

warnings.filterwarnings("ignore", message="model .* uses UNTRAINED weights")
warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose
GRID, STEP0 = 45, 448  # 45 x 45 tiles of 448 level-0 px (224 px at 0.5 µm/px from 0.25 µm/px)
STAGES = ("read", "decode", "normalize", "model", "write", "total", "compile")


def tile_positions(count: int) -> np.ndarray:
    """`count` level-0 tile corners, row-major over the slide's grid, cycling when count > grid."""
    index = np.arange(count) % (GRID * GRID)
    return np.stack([(index % GRID) * STEP0 + 1024, (index // GRID) * STEP0 + 1024], axis=1).astype(np.int64)


def tiles_record(slide: Path, coords: np.ndarray) -> TilesRecord:
    """The tiling record extract_slide needs, with a real stain fit from 16 of the tiles."""
    from pathwsi.slides.slide import Slide

    with Slide(slide) as handle:
        sample = [handle.read_region(int(x), int(y), 224, 224, 0.5) for x, y in coords[:16]]
    fit = fit_slide(sample, StainSettings(), default_reference())
    record = {
        "schema": "pathwsi.tiles/1",
        "pathwsi_version": "bench",
        "sample": {"cohort": "bench", "slide_id": "bench", "patient_id": "bench", "path": str(slide)},
        "settings": {},
        "status": "ok",
        "reason": None,
        "tile": {"px": 224, "mpp": 0.5, "um": 112.0, "level0_px": 448.0},
        "mpp": {"value": 0.25, "source": "bench"},
        "stain": fit.to_json(),
    }
    return TilesRecord.from_json(record)


def build_models(arch: str, input_px: int, device: torch.device) -> list:
    return [
        build_backbone(ModelSpec(n, arch=arch, input_px=input_px), device=device) for n in ("imgnet", "ftx_stand_in")
    ]


def models_alone(models: list, nets: dict, batch: int, batches: int, device: torch.device) -> float:
    """Tiles/s of every model on random tiles (prepare + forward + copy back; no reading, normalizing, writing)."""
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    with torch.inference_mode(), autocast:
        for model in models:
            nets[model.spec.name](model.prepare(x))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(batches):
            for model in models:
                nets[model.spec.name](model.prepare(x)).float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * batches / (time.perf_counter() - started)


def compiled_nets(models: list, batch: int, device: torch.device, cache: Path) -> tuple[dict, float]:
    """The models compiled as the feature job compiles them, warmed up on one batch; and the seconds."""
    from pathwsi.features.compile_policy import compile_models, use_cache_dir

    use_cache_dir(cache)
    eager = {m.spec.name: m.net for m in models}
    nets, seconds = compile_models(eager, True, lambda compiled: models_alone(models, dict(compiled), batch, 0, device))
    assert seconds is not None
    return nets, seconds


COMPILE_CHILD = """
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import torch
from bench_extract import build_models, compiled_nets
args = json.loads(sys.argv[2])
device = torch.device(args["device"])
models = build_models(args["arch"], args["input_px"], device)
print(json.dumps({"seconds": compiled_nets(models, args["batch"], device, Path(args["cache"]))[1]}))
"""


def compile_seconds(args: argparse.Namespace, device: torch.device, cache: Path) -> float:
    """Seconds a fresh process takes to compile both models (and run one batch) with Inductor's cache in `cache`."""
    spec = {
        "device": str(device),
        "arch": args.arch,
        "input_px": args.input_px,
        "batch": args.batch,
        "cache": str(cache),
    }
    done = subprocess.run([sys.executable, "-c", COMPILE_CHILD, str(HERE), json.dumps(spec)], capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"compiling in a child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def pipeline(slide: Path, models: list, count: int, settings: ExtractSettings) -> dict:
    coords = tile_positions(count)
    with tempfile.TemporaryDirectory() as folder:
        return extract_slide(
            Sample("bench", "bench", "bench", str(slide)),
            coords,
            np.ones(count, np.float32),
            tiles_record(slide, coords),
            models,
            settings,
            Path(folder) / "s.zarr",
        )


PIPELINE_CHILD = """
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import pathwsi, torch
from bench_extract import build_models, pipeline
from pathwsi.features.extract import ExtractSettings
args = json.loads(sys.argv[2])
torch.set_num_threads(args["threads"])
models = build_models(args["arch"], args["input_px"], torch.device(args["device"]))
timings = pipeline(Path(args["slide"]), models, args["tiles"], ExtractSettings(**args["settings"]))
print(json.dumps({"package": pathwsi.__file__, **timings}))
"""


def pipeline_in(package_root: Path, args: argparse.Namespace, slide: Path, settings: dict) -> dict:
    """End-to-end timings of the pipeline in a fresh process importing pathwsi from `package_root`."""
    spec = {
        "slide": str(slide),
        "arch": args.arch,
        "input_px": args.input_px,
        "tiles": args.tiles,
        "device": settings["device"],
        "threads": torch.get_num_threads(),
        "settings": settings,
    }
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    done = subprocess.run([sys.executable, "-c", PIPELINE_CHILD, str(HERE), json.dumps(spec)], capture_output=True, text=True, env=env, cwd=HERE)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"pipeline child ({package_root}) failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).resolve().is_relative_to(package_root.resolve()), result["package"]
    return result


MEMORY_CHILD = """
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[3])
from bench_extract import pipeline
from pathwsi.features.extract import ExtractSettings
from pathwsi.features.backbones import ModelSpec, build_backbone
from pathlib import Path
model = build_backbone(ModelSpec("small", arch="test_resnet", input_px=64))
timings = pipeline(Path(sys.argv[1]), [model], int(sys.argv[2]), ExtractSettings(batch_size=64, chunk_tiles=512, num_workers=1, device="cpu", compile=False))
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"peak_mib": peak / 1024, "tiles_per_s": timings["tiles_per_s"]}))
"""


def memory(slide: Path, count: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(slide), str(count), str(HERE)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The run with the median tiles/s."""
    return sorted(runs, key=lambda t: t["tiles_per_s"])[len(runs) // 2]


def stages(timings: dict) -> str:
    return ", ".join(f"{name} {timings.get(name, 0.0):.2f}" for name in STAGES)


def nvjpeg_difference(slide: Path, count: int, device: torch.device) -> str:
    """nvJPEG's tiles (the gpu reader) against the exact reader's, over the first `count` tiles."""
    from pathwsi.features.gpu_decode import CompressedTiles, DeviceDecoder
    from pathwsi.slides.readers import open_tile_reader
    from pathwsi.slides.slide import Slide

    coords = tile_positions(count)
    dataset = CompressedTiles(Sample("b", "b", "b", str(slide)), coords, 224, 0.5, 0, 64)
    with Slide(slide) as handle, open_tile_reader(handle, 0.5, 224, exact=True) as exact:
        decoder = DeviceDecoder(open_tile_reader(handle, 0.5, 224, exact=True), device)
        ours = torch.cat([decoder(dataset[b])[0].cpu() for b in range(len(dataset))]).numpy().astype(int)
        expected = np.stack([exact.read(int(x), int(y)) for x, y in coords]).astype(int)
    diff = np.abs(ours - expected)
    return f"mean {diff.mean():.3f}, 99th percentile {np.percentile(diff, 99):.0f}, max {diff.max()} levels over {count} tiles"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=192, help="tiles of each end-to-end run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", help="DataLoader worker counts (default: 1 on the CPU, 4 8 14 on CUDA)")  # fmt: skip
    parser.add_argument("--readers", nargs="+", choices=["fast", "exact", "gpu"], help="default: fast exact, and gpu on CUDA")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="also compile the models: alone, cold and warm compile, end to end")  # fmt: skip
    parser.add_argument("--baseline", type=Path, help="a folder holding another copy of pathwsi/ to compare end to end against")  # fmt: skip
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians")
    parser.add_argument("--arch", default="keras_xception", help="models.backbones.*.arch of both models")
    parser.add_argument("--input-px", type=int, default=224, help="models' input size (tiles are 224 px)")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    slide = ensure_slide()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    workers = args.workers or ([1] if device.type == "cpu" else [4, 8, 14])
    readers = args.readers or (["fast", "exact"] + (["gpu"] if device.type == "cuda" else []))
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(
        f"device: {card}; {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
        f"two {args.arch} at {args.input_px} px, batch {args.batch}, {args.tiles} tiles from the 40x JPEG SVS; "
        f"cudnn.benchmark {args.cudnn_benchmark}; medians of {args.rounds} rounds"
    )
    models = build_models(args.arch, args.input_px, device)
    eager = {m.spec.name: m.net for m in models}
    batches = max(2, args.tiles // args.batch)
    cache = Path(tempfile.mkdtemp(prefix="bench_inductor_"))
    compiled = None
    if args.compile:
        cold, warm = compile_seconds(args, device, cache), compile_seconds(args, device, cache)
        compiled, _ = compiled_nets(models, args.batch, device, cache)
    alone = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        alone["eager"].append(models_alone(models, eager, args.batch, batches, device))
        if compiled is not None:
            alone["compiled"].append(models_alone(models, compiled, args.batch, batches, device))
    eager_rate = statistics.median(alone["eager"])
    print("1. models alone (each tile through both models):")
    print(f"   eager    : {eager_rate:9.1f} tiles/s   (rounds: {', '.join(f'{r:.1f}' for r in alone['eager'])})")
    reference, reference_name = eager_rate, "eager"
    if compiled is not None:
        rate = statistics.median(alone["compiled"])
        saving = 1 / eager_rate - 1 / rate
        print(f"   compiled : {rate:9.1f} tiles/s   = {rate / eager_rate:.2f}x eager (rounds: {', '.join(f'{r:.1f}' for r in alone['compiled'])})")  # fmt: skip
        print(
            f"   compile seconds, fresh process: cold cache {cold:.1f} s, warm cache {warm:.1f} s (one batch included)"
        )
        if saving > 0:
            print(
                f"   compiling pays from {cold / saving:,.0f} tiles (cold) / {warm / saving:,.0f} tiles (warm) a slide"
            )
        else:
            print("   compiled is not faster here: compiling never pays")
        reference, reference_name = rate, "compiled"

    settings = ExtractSettings(
        batch_size=args.batch, chunk_tiles=max(512, args.batch), device=str(device), compile=False
    )
    modes = [False, True] if args.compile else [False]
    print(
        f"2. end to end (extract_slide); ratio to the {reference_name} models alone; stage seconds of the median round "
        "(compile: in this process, where the models were compiled once already):"
    )
    for reader in readers:
        for count in workers:
            for mode in modes:
                run = replace(settings, reader=reader, num_workers=count, compile=mode, compile_cache=str(cache))
                timings = median_run([pipeline(slide, models, args.tiles, run) for _ in range(args.rounds)])
                rate = timings["tiles_per_s"]
                label = f"{reader:5s} reader, {count:2d} workers, {'compiled' if mode else 'eager   '}"
                print(f"   {label}: {rate:9.1f} tiles/s = {rate / reference:5.0%}   [{stages(timings)}]")
    if device.type == "cuda" and "gpu" in readers:
        print(f"3. nvJPEG (gpu reader) vs exact reader: {nvjpeg_difference(slide, 512, device)}")
    if args.baseline:
        base = {"reader": readers[0], "num_workers": workers[0], "batch_size": args.batch, "chunk_tiles": max(512, args.batch), "device": str(device), "compile": False}  # fmt: skip
        pairs = []
        for round_ in range(args.rounds):  # the order alternates: neither side always runs first
            roots = [args.baseline, HERE.parent][:: 1 if round_ % 2 == 0 else -1]
            runs = {root: pipeline_in(root, args, slide, base) for root in roots}
            pairs.append((runs[args.baseline], runs[HERE.parent]))
        before, after = (statistics.median(p[i]["tiles_per_s"] for p in pairs) for i in (0, 1))
        print(f"4. before ({args.baseline}) / after (this tree), eager, {readers[0]} reader, {workers[0]} workers, fresh process each:")  # fmt: skip
        print(f"   before {before:.1f} tiles/s, after {after:.1f} tiles/s: after/before {after / before:.3f}")
        print("   rounds (before / after): " + ", ".join(f"{b['tiles_per_s']:.1f} / {a['tiles_per_s']:.1f}" for b, a in pairs))  # fmt: skip
    if not args.skip_memory:
        small, large = memory(slide, 5_000), memory(slide, 50_000)
        print("5. peak memory, stand-in model (test_resnet, 64 px), fresh process each:")
        print(f"    5,000 tiles: {small['peak_mib']:7.0f} MiB ({small['tiles_per_s']:.0f} tiles/s)")
        print(f"   50,000 tiles: {large['peak_mib']:7.0f} MiB ({large['tiles_per_s']:.0f} tiles/s)   ratio {large['peak_mib'] / small['peak_mib']:.2f} (target: flat, < 3 GB)")  # fmt: skip


if __name__ == "__main__":
    main()
