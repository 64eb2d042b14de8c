"""The per-slide GPU job as the workflow runs it: tile table + tiling metadata -> feature store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pathwsi.features.backbones import build_backbone, resolve_device, specs_from_config
from pathwsi.features.extract import ExtractSettings, extract_slide
from pathwsi.features.feature_request import FeatureRequest
from pathwsi.features.store import open_store
from pathwsi.runtime.gpu_claim import GpuSettings, claimed_device
from pathwsi.runtime.logs import RUN_WIDE, job_log
from pathwsi.runtime.outputs import write_json
from pathwsi.samples import Sample
from pathwsi.slides.tile_record import TilesRecord

log = logging.getLogger(__name__)
SHOWN_IN_TIMINGS = 5  # unreadable tiles listed in the timings record (the store lists more)


def run_feature_job(
    sample: Sample,
    tiles_path: Path,
    meta_path: Path,
    store_path: Path,
    timings_path: Path,
    models_config: dict[str, Any],
    settings: ExtractSettings,
    threads: int = 1,
    gpus: GpuSettings | None = None,
) -> dict[str, Any]:
    """Extract one slide's features with every configured model; write the store and the timings.

    On CUDA the job first claims a GPU of its own (gpus: how, pathwsi.runtime.gpu_claim) and holds it to its end."""
    torch.set_num_threads(max(1, threads))
    tiling = TilesRecord.load(meta_path)
    table = pq.read_table(tiles_path)
    coords = (
        np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1).astype(np.int64).reshape(-1, 2)
    )
    fractions = table.column("tissue_fraction").to_numpy().astype(np.float32)
    job = f"features {sample.slide_id}"
    with claimed_device(resolve_device(settings.device), gpus or GpuSettings(), job) as (device, claim):
        models = [
            build_backbone(spec, allow_network=models_config["allow_network"], device=device)
            for spec in specs_from_config(models_config).values()
        ]
        for provenance in (model.provenance() for model in models):
            if "warning" in provenance:  # untrained weights: the run's start says it once, the job log for each slide
                log.warning("%s", provenance["warning"], extra=RUN_WIDE)
        if tiling.status != "ok":
            log.warning(
                "%s: tiling status %s (%s); writing an empty feature store",
                sample.slide_id,
                tiling.status,
                tiling.reason,
            )
        timings = extract_slide(sample, coords, fractions, tiling, models, settings, store_path)
        attrs = open_store(store_path).attrs
        unreadable = attrs["unreadable_tiles"]
        compiled = bool(timings.pop("compiled", 0.0))
        record = {
            "slide_id": sample.slide_id,
            "device": str(device),
            "gpu": claim or None,  # the GPU claimed (pathwsi.runtime.gpu_claim): index, id, CUDA_VISIBLE_DEVICES, wait
            "models": [m.spec.name for m in models],
            "reader": attrs["reader"],  # features.reader as resolved for this slide (auto, gpu)
            "compiled": compiled,  # torch.compile used (features.compile); seconds.compile: its time, warm-up batch included
            "seconds": {k: round(v, 3) for k, v in timings.items()},
            "unreadable_tiles": {"count": unreadable["count"], "tiles": unreadable["tiles"][:SHOWN_IN_TIMINGS]},
        }
        if unreadable["count"]:
            log.warning(
                "%s: %d of %d tiles could not be read and are left out (listed in the store's attrs and the run summary)",
                sample.slide_id,
                unreadable["count"],
                len(coords),
            )
        write_json(record, timings_path)
        log.info(
            "%s: %d tiles, %.1f tiles/s (read %.1f s, decode %.1f s, normalize %.1f s, models %.1f s, write %.1f s; "
            "%s reader; %s)",
            sample.slide_id,
            timings["tiles"],
            timings.get("tiles_per_s", 0.0),
            timings["read"],
            timings["decode"],
            timings["normalize"],
            timings["model"],
            timings["write"],
            attrs["reader"],
            f"compiled in {timings['compile']:.1f} s" if compiled else "eager",
        )
        return record


def run_request(request: FeatureRequest) -> None:
    """Rule `features`' job (what a fork-server child runs): log to the request's log, extract the slide."""
    with job_log(request.log):
        settings = ExtractSettings.from_config(request.config)
        run_feature_job(
            request.sample,
            request.tiles,
            request.meta,
            request.store,
            request.timings,
            request.config["models"],
            settings,
            threads=request.threads,
            gpus=GpuSettings.from_config(request.config),
        )
