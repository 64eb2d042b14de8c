"""What Keras's padding costs: `keras_xception` vs timm's `legacy_xception` forward passes, interleaved in one
run (same weights, same random uint8 batch through pathwsi's prepare path), on the CPU or a CUDA GPU.

    python benchmarks/bench_architectures.py [--px 224] [--batch 16] [--batches 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from pathwsi.models import ModelSpec, build_backbone

warnings.filterwarnings("ignore", message="model .* uses UNTRAINED weights")


def tiles_per_s(backbone, x: torch.Tensor, batches: int, device: torch.device) -> float:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), autocast:
        backbone.net(backbone.prepare(x))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(batches):
            backbone.net(backbone.prepare(x)).float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return len(x) * batches / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nets = {arch: build_backbone(ModelSpec("m", arch=arch, input_px=args.px), device=device) for arch in ("keras_xception", "legacy_xception")}
    x = torch.randint(0, 256, (args.batch, 3, args.px, args.px), dtype=torch.uint8, device=device)
    rates: dict[str, list[float]] = {arch: [] for arch in nets}
    for _ in range(args.rounds):
        for arch, backbone in nets.items():
            rates[arch].append(tiles_per_s(backbone, x, args.batches, device))
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"{name}; torch {torch.__version__}; {args.px} px, batch {args.batch}, median of {args.rounds} interleaved rounds of {args.batches} batches:")
    for arch, values in rates.items():
        print(f"   {arch:<16} {statistics.median(values):8.1f} tiles/s   (rounds: {', '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.median(rates["keras_xception"]) / statistics.median(rates["legacy_xception"])
    print(f"   keras_xception / legacy_xception: {ratio:.3f}")


if __name__ == "__main__":
    main()
