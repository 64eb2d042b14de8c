"""The per-slide tiling job: tissue mask, tile grid, outputs. CPU only; never imports torch.

Outputs (README "What the workflow does"): `tiles/{slide_id}.parquet` (x, y level-0 px of each kept tile's
top-left corner, tissue_fraction), `tiles/{slide_id}.json` (geometry, µm/px and its source,
the slide's stain fit by `stain.method` or its fallback, status), `qc/{slide_id}.png` (mask and tiles) and
`qc/stain/{slide_id}.png` (sampled tiles before and after normalization). A slide that cannot
be read finishes with status "failed" and its reason; a slide without tissue with status
"no_tissue"; neither stops the batch.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pathwsi import __version__
from pathwsi.runtime.logs import job_log
from pathwsi.runtime.outputs import write_table
from pathwsi.samples import Sample
from pathwsi.slides.grid import TileSettings, tile_grid, tissue_fractions
from pathwsi.slides.qc import (
    MASK_LEGEND,
    TILE_OUTLINE,
    message_card,
    narrowed,
    overview_mpp,
    save_png,
    scale_bar,
    tiles_overview,
    titled,
)
from pathwsi.slides.slide import Slide, SlideError
from pathwsi.slides.tile_record import LevelZeroMpp, TileCounts, TileGeometry, TilesRecord
from pathwsi.slides.tile_request import TileRequest, TilingOutputs
from pathwsi.slides.tissue_mask import TissueSettings, detect_tissue
from pathwsi.stain.macenko import StainFit, StainSettings, qc_panel
from pathwsi.stain.methods import fit_slide, load_target, normalize_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TilingJobSettings:
    """Everything that shapes a slide's tiles (the config sections tiling, tissue, qc)."""

    tiling: TileSettings = field(default_factory=TileSettings)
    tissue: TissueSettings = field(default_factory=TissueSettings)
    stain: StainSettings = field(default_factory=StainSettings)
    qc_max_px: int = 1200
    qc_stain_tiles: int = 6
    seed: int = 0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TilingJobSettings:
        """Build from a validated config (see pathwsi.config.validate_config)."""
        return cls(
            TileSettings.from_config(config),
            TissueSettings.from_config(config),
            StainSettings.from_config(config),
            config["qc"]["max_px"],
            config["qc"]["stain_tiles"],
            config["seed"],
        )


def tile_slide(sample: Sample, settings: TilingJobSettings, outputs: TilingOutputs) -> TilesRecord:
    """Tile one slide and write its outputs; return the record written to the JSON."""
    for path in (outputs.tiles, outputs.meta, outputs.qc, outputs.stain_qc):
        path.parent.mkdir(parents=True, exist_ok=True)
    ran_with = {"tiling": asdict(settings.tiling), "tissue": asdict(settings.tissue), "seed": settings.seed}
    started = time.perf_counter()
    try:
        with Slide(sample.path, sample.slide_id, sample.mpp, sample.backend or settings.tiling.backend) as slide:
            coords, fractions, found = _tile(slide, settings, outputs)
        record = TilesRecord(sample, settings=ran_with, pathwsi_version=__version__, **found)
    except SlideError as err:
        log.error("%s", err)
        record = TilesRecord(sample, "failed", str(err), ran_with, __version__)
        coords, fractions = np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
        for picture in (outputs.qc, outputs.stain_qc):
            save_png(message_card(f"FAILED: {sample.slide_id}", str(err)), picture)
    record = replace(record, seconds=round(time.perf_counter() - started, 3))
    write_table({"x": coords[:, 0], "y": coords[:, 1], "tissue_fraction": fractions.astype(np.float32)}, outputs.tiles)
    record.save(outputs.meta)
    log.info("%s: %s, %d tiles in %.2f s", sample.slide_id, record.status, len(coords), record.seconds)
    return record


def run_request(request: TileRequest) -> None:
    """Rule `tile`'s job (what a fork-server child runs): log to the request's log, tile the slide."""
    with job_log(request.log):
        tile_slide(request.sample, TilingJobSettings.from_config(request.config), request.outputs)


def _tile(
    slide: Slide, settings: TilingJobSettings, outputs: TilingOutputs
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Mask, grid and select; write the QC picture. Returns kept coords, their fractions, metadata."""
    tiling, tissue_settings = settings.tiling, settings.tissue
    mpp0 = slide.mpp.value
    slide_um = (slide.width * mpp0, slide.height * mpp0)
    mask_level = slide.level_for(tissue_settings.mask_mpp)
    tissue = detect_tissue(slide.read_whole(tissue_settings.mask_mpp), tissue_settings.mask_mpp, tissue_settings)
    grid = tile_grid(slide.width, slide.height, mpp0, tiling.tile_um)
    fractions = tissue_fractions(grid, mpp0, tiling.tile_um, tissue, slide_um) if len(grid) else np.zeros(0)
    keep = fractions >= tiling.min_tissue_fraction
    coords, kept_fractions = grid[keep], fractions[keep]
    read_level = slide.level_for(tiling.tile_mpp)
    found: dict[str, Any] = dict(
        status="ok" if len(coords) else "no_tissue",
        reason=None if len(coords) else _no_tissue_reason(tissue.area_mm2, len(grid), tiling),
        slide=slide.describe(),
        mpp=LevelZeroMpp(mpp0, slide.mpp.source),
        read={
            "level": read_level.index,
            "downsample": read_level.downsample,
            "level_mpp": read_level.mpp,
            "upsampled": read_level.mpp > tiling.tile_mpp * 1.02,
        },
        tile=TileGeometry(tiling.tile_px, tiling.tile_mpp, tiling.tile_um, tiling.tile_um / mpp0),
        mask={
            "mpp": tissue.mpp,
            "level": mask_level.index,
            "saturation_threshold": tissue.saturation_threshold,
            "tissue_area_mm2": round(tissue.area_mm2, 4),
        },
        counts=TileCounts(int(len(grid)), int(len(coords))),
    )
    if read_level.mpp > tiling.tile_mpp * 1.02:
        log.warning(
            "%s: finest level is %.3f µm/px, coarser than the %.3f µm/px asked for; tiles are enlarged",
            slide.slide_id,
            read_level.mpp,
            tiling.tile_mpp,
        )
    qc_mpp = overview_mpp(max(slide_um), settings.qc_max_px, tiling.tile_um, mpp0)
    overview = tiles_overview(slide.read_whole(qc_mpp), tissue.mask, coords * mpp0, tiling.tile_um, qc_mpp)
    title = [
        f"{slide.slide_id}: {len(coords)} tiles kept of {len(grid)}; tissue {tissue.area_mm2:.2f} mm2",
        f"level 0 at {mpp0:.4g} um/px (from {slide.mpp.source}); tiles {tiling.tile_px} px at {tiling.tile_mpp:g} um/px",
    ]
    legend = [(MASK_LEGEND, "tissue mask", True), (TILE_OUTLINE, f"kept tile ({tiling.tile_um:g} um)", False)]
    save_png(titled(scale_bar(overview, qc_mpp), title, legend), outputs.qc)
    fit = _fit_stain(slide, coords, settings, outputs.stain_qc)
    found["stain"] = fit
    if fit.status != "fitted" and len(coords):
        log.warning(
            "%s: stain fit not used (%s); normalized with the %s parameters",
            slide.slide_id,
            fit.reason,
            settings.stain.fallback,
        )
    return coords, kept_fractions, found


def _fit_stain(slide: Slide, coords: np.ndarray, settings: TilingJobSettings, qc_path: Path) -> StainFit:
    """The stain fit (`stain.method`) from a seeded sample of the slide's tissue tiles; QC picture before/after."""
    tiling, stain = settings.tiling, settings.stain
    rng = np.random.default_rng([settings.seed, zlib.crc32(slide.slide_id.encode())])
    picked = np.sort(rng.choice(len(coords), size=min(stain.sample_tiles, len(coords)), replace=False))
    tiles = [slide.read_region(x, y, tiling.tile_px, tiling.tile_px, tiling.tile_mpp) for x, y in coords[picked]]
    fit = fit_slide(tiles, stain, load_target(stain))
    shown = tiles[: settings.qc_stain_tiles]
    if shown:
        after = [normalize_rgb(tile, fit) for tile in shown]
        status = fit.status + (f" ({fit.reason})" if fit.reason else "")
        lines = [
            f"{slide.slide_id}: {fit.method} stain fit {status}",
            "top row: before normalization; bottom row: after",
        ]
        save_png(titled(narrowed(Image.fromarray(qc_panel(shown, after))), lines), qc_path)
    else:
        save_png(
            message_card(f"{slide.slide_id}: no tissue tiles", "nothing to normalize; see the tiling QC picture"),
            qc_path,
        )
    return fit


def _no_tissue_reason(area_mm2: float, grid_size: int, tiling: TileSettings) -> str:
    if grid_size == 0:
        return f"the slide is smaller than one {tiling.tile_um:g} µm tile"
    if area_mm2 == 0:
        return "no tissue detected (blank or background-only slide); check the QC picture"
    return f"{area_mm2:.3f} mm² of tissue found, but no tile reaches min_tissue_fraction={tiling.min_tissue_fraction}"
