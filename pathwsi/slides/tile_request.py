"""What rule `tile` asks for one slide: a typed, picklable request that a Snakemake script builds without importing
the tiling code (a fork-server child runs it, pathwsi.runtime.forkserver)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pathwsi.runtime.forkserver import EntryJob
from pathwsi.samples import Sample

TILING_SECTIONS = ("seed", "tiling", "tissue", "stain", "qc")  # the config sections the tile job reads


@dataclass(frozen=True)
class TilingOutputs:
    """Where one slide's tiling outputs go."""

    tiles: Path
    meta: Path
    qc: Path
    stain_qc: Path

    @classmethod
    def under(cls, results: Path, slide_id: str) -> TilingOutputs:
        return cls(
            results / "tiles" / f"{slide_id}.parquet",
            results / "tiles" / f"{slide_id}.json",
            results / "qc" / f"{slide_id}.png",
            results / "qc" / "stain" / f"{slide_id}.png",
        )


@dataclass(frozen=True)
class TileRequest(EntryJob):
    """Tile one slide: its sheet row, the validated config sections that shape the job, its outputs and log."""

    entry: ClassVar[str] = "pathwsi.slides.tile_job:run_request"  # imported by the fork server before it forks

    sample: Sample
    config: dict[str, Any]  # TILING_SECTIONS of a validated config
    outputs: TilingOutputs
    log: Path
