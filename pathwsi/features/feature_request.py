"""What rule `features` asks for one slide: a typed, picklable request that a Snakemake script builds without
importing torch (a fork-server child runs it, pathwsi.runtime.forkserver)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pathwsi.runtime.forkserver import EntryJob
from pathwsi.samples import Sample

FEATURE_SECTIONS = ("models", "features", "gpus")  # the config sections the feature job reads


@dataclass(frozen=True)
class FeatureRequest(EntryJob):
    """Extract one slide's features: its sheet row, its tiling outputs, the store and timings to write, the
    validated config sections `models` (the backbones to run), `features` and `gpus`, and the job's CPU threads."""

    entry: ClassVar[str] = "pathwsi.features.feature_job:run_request"  # imported by the fork server before it forks

    sample: Sample
    tiles: Path
    meta: Path
    store: Path
    timings: Path
    config: dict[str, Any]  # FEATURE_SECTIONS of a validated config
    threads: int
    log: Path
