"""What flushing outputs to disk costs: feature stores and small JSON outputs written with the fsyncs
that make them durable (pathwsi.runtime.outputs.FSYNC = True, the default) and without, interleaved in one run
on the same disk. A store here is one slide's: --tiles tiles x 2 models x 2,048 float16 features, in
chunks of 512 tiles, written and published as the features job does (manifest, fsync, rename).

    python benchmarks/bench_durability.py [--stores 10] [--tiles 2000] [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pathwsi.features.store import open_writer
from pathwsi.runtime import outputs

CHUNK, DIM = 512, 2048


def write_stores(folder: Path, count: int, tiles: int, rng: np.random.Generator) -> float:
    """Seconds to write and publish `count` stores (and each one's timings JSON)."""
    features = rng.normal(size=(CHUNK, DIM)).astype(np.float16)
    started = time.perf_counter()
    for index in range(count):
        path = folder / f"s{index}.zarr"
        coords = np.stack([np.arange(tiles), np.zeros(tiles, np.int64)], axis=1)
        writer = open_writer(
            path, coords, np.ones(tiles, np.float32), {"imgnet": DIM, "ftx": DIM}, {"slide_id": f"s{index}"}, CHUNK
        )
        for chunk in range(writer.n_chunks):
            rows = writer.chunk_end(chunk) - chunk * CHUNK
            writer.write_chunk(chunk, {"imgnet": features[:rows], "ftx": features[:rows]})
        writer.finish()
        outputs.write_json({"slide_id": f"s{index}", "seconds": {"total": 1.0}}, folder / f"s{index}.timings.json")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", type=int, default=10)
    parser.add_argument("--tiles", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary folder; use the results disk)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for fsync in (True, False):
            outputs.FSYNC = fsync
            with tempfile.TemporaryDirectory(dir=args.dir) as folder:
                seconds[fsync].append(write_stores(Path(folder), args.stores, args.tiles, rng))
    mib = args.stores * args.tiles * 2 * DIM * 2 / 2**20
    print(
        f"{args.stores} stores of {args.tiles} tiles x 2 models x {DIM} float16 ({mib:.0f} MiB before compression) + a JSON each, "
        f"in {args.dir or tempfile.gettempdir()}, median of {args.rounds} interleaved rounds:"
    )
    for fsync in (True, False):
        median = statistics.median(seconds[fsync])
        print(
            f"   fsync {'on ' if fsync else 'off'}: {median:6.2f} s  ({median / args.stores * 1000:6.1f} ms per store)   rounds: {', '.join(f'{s:.2f}' for s in seconds[fsync])}"
        )
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(
        f"   cost of durability: {on - off:+.2f} s in all, {(on - off) / args.stores * 1000:+.1f} ms per store ({on / off:.2f}x)"
    )


if __name__ == "__main__":
    main()
