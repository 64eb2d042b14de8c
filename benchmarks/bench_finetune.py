"""Fine-tuning throughput: training images/s of step 1 (frozen backbone, new head) and step 2 (top unfrozen).

The same code as `pathwsi.finetune.train` (`train_step`, channels_last, bf16 autocast on CUDA) on
random uint8 batches, so image loading is not measured. CPU always; CUDA too when present
(its name is printed). Untrained `legacy_xception` weights: speed does not depend on them.

    python benchmarks/bench_finetune.py [--px 224] [--batch-size 16] [--iterations 4] [--unfreeze-from block11] [--threads N]
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import torch

from pathwsi.features.backbones import ModelSpec, build_backbone
from pathwsi.finetune.train import (
    StepSettings,
    TileClassifier,
    make_optimizer,
    set_trainable,
    train_step,
    trainable_blocks,
)

N_CLASSES = 9


def bench(device: torch.device, px: int, batch_size: int, iterations: int, unfreeze_from: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = build_backbone(ModelSpec("imgnet", input_px=px), device=device)
    model = (
        TileClassifier(backbone.net, backbone.feature_dim, N_CLASSES, 0.0)
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    dtype = torch.bfloat16 if device.type == "cuda" else None
    tiles = torch.randint(0, 256, (batch_size, 3, px, px), dtype=torch.uint8, device=device)
    labels = torch.randint(0, N_CLASSES, (batch_size,), device=device)
    for name, blocks in (
        ("step 1 (head only)", []),
        (f"step 2 (from {unfreeze_from})", trainable_blocks(backbone.net, unfreeze_from, "--unfreeze-from")),
    ):
        optimizer = make_optimizer(
            set_trainable(model, blocks, train_batchnorm=True), StepSettings(epochs=1, lr=1e-4, optimizer="sgd")
        )
        train_step(backbone, model, optimizer, tiles, labels, dtype)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(iterations):
            train_step(backbone, model, optimizer, tiles, labels, dtype)  # .item() inside waits for the GPU
        rate = iterations * batch_size / (time.perf_counter() - started)
        memory = (
            f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
            if device.type == "cuda"
            else f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
        )
        print(f"  {name:<24} {rate:8.1f} images/s   {memory}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--unfreeze-from", default="block11")
    parser.add_argument(
        "--threads", type=int, help="CPU threads (default: PyTorch's choice); 1 is faster on a busy shared machine"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"legacy_xception training, {args.px} px, batch {args.batch_size}, channels_last, {args.iterations} timed iterations after 1 warm-up"
    )
    print(f"CPU ({torch.get_num_threads()} threads, float32):")
    bench(torch.device("cpu"), args.px, args.batch_size, args.iterations, args.unfreeze_from)
    if torch.cuda.is_available():
        print(f"CUDA {torch.cuda.get_device_name()} (bfloat16 autocast):")
        bench(torch.device("cuda"), args.px, args.batch_size, max(args.iterations, 20), args.unfreeze_from)
    else:
        print("CUDA: no GPU visible; skipped")


if __name__ == "__main__":
    main()
