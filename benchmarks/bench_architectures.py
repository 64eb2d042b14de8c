"""What Keras's padding costs: `keras_xception` vs timm's `legacy_xception` forward passes, interleaved in one
run (random 224 px uint8 batches through pathwsi's prepare path, resized to --px), on the CPU or a CUDA GPU.

    python benchmarks/bench_architectures.py [--px 224] [--batch 16] [--batches 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import models_alone  # noqa: E402  (also silences the UNTRAINED warnings)

from pathwsi.features.backbones import ModelSpec, build_backbone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nets = {
        arch: build_backbone(ModelSpec("m", arch=arch, input_px=args.px), device=device)
        for arch in ("keras_xception", "legacy_xception")
    }
    rates: dict[str, list[float]] = {arch: [] for arch in nets}
    for _ in range(args.rounds):
        for arch, backbone in nets.items():
            rates[arch].append(models_alone([backbone], args.batch, args.batches, device))
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    print(
        f"{name}; torch {torch.__version__}; {args.px} px, batch {args.batch}, median of {args.rounds} interleaved rounds of {args.batches} batches:"
    )
    for arch, values in rates.items():
        print(
            f"   {arch:<16} {statistics.median(values):8.1f} tiles/s   (rounds: {', '.join(f'{v:.1f}' for v in values)})"
        )
    ratio = statistics.median(rates["keras_xception"]) / statistics.median(rates["legacy_xception"])
    print(f"   keras_xception / legacy_xception: {ratio:.3f}")


if __name__ == "__main__":
    main()
