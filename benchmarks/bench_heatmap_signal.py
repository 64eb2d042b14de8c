"""Demo heatmaps against the planted signal: per target, Pearson r of tile score vs the tile's planted lymphocyte
share, pooled over the demo-luad tiles and within slides.

Run after the demo (README's first command), from the repository root:
    .venv/bin/python benchmarks/bench_heatmap_signal.py [--results results]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pathwsi.demo.heatmap_signal import planted_signal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args()
    table = planted_signal(args.results / "heatmaps", args.results / "tiles")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
