"""Does a demo heatmap show the planted signal? Tile scores against each tile's planted lymphocyte share.

The demo's targets are planted in the slides' lymphocytes (pathwsi.demo.targets): expression rises
with the lymphocyte density and STK11 is mutated in immune-cold (low-density) tumours. A tile's
planted share (`SyntheticTissue.lymphocyte_share`) is known exactly, so the heatmap's tile scores
can be correlated with it: pooled over the cohort's tiles, and within each slide (where only the
lymphocyte aggregates vary).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pathwsi.demo.cohort import DEMO_SLIDES
from pathwsi.predict.heatmap_job import HeatmapOutputs
from pathwsi.slides.tile_record import TilesRecord

MIN_TILES = 4  # slides with fewer tiles give no within-slide correlation


def planted_signal(heatmaps: Path, tiles_dir: Path, cohort: str = "demo-luad") -> pd.DataFrame:
    """Per heatmap target: tiles, slides, Pearson r of tile score vs planted lymphocyte share pooled over the
    cohort's tiles, and the mean within-slide r (slides of at least MIN_TILES tiles with varying share)."""
    outputs = HeatmapOutputs(heatmaps / cohort)
    frames = []
    for spec in (s for s in DEMO_SLIDES if s.cohort == cohort):
        path = outputs.tiles(spec.slide_id)
        if not path.is_file():
            continue
        tiles = pd.read_parquet(path)
        record = TilesRecord.load(tiles_dir / f"{spec.slide_id}.json")
        mpp = record.mpp.value if record.mpp else spec.mpp
        tissue = spec.tissue()
        tiles["share"] = [
            tissue.lymphocyte_share(x * mpp, y * mpp, size * mpp, size * mpp)
            for x, y, size in tiles[["x", "y", "size"]].to_numpy()
        ]
        frames.append(tiles.assign(slide_id=spec.slide_id))
    if not frames:
        raise FileNotFoundError(f"no heatmap tile tables under {outputs.folder / 'tiles'}; run the demo first")
    tiles = pd.concat(frames, ignore_index=True)
    targets = [c for c in tiles.columns if c not in ("x", "y", "size", "share", "slide_id")]
    rows = []
    for target in targets:
        within = [
            float(np.corrcoef(group[target], group["share"])[0, 1])
            for _, group in tiles.groupby("slide_id")
            if len(group) >= MIN_TILES and group["share"].std() > 0 and group[target].std() > 0
        ]
        rows.append(
            {
                "target": target,
                "tiles": len(tiles),
                "slides": tiles["slide_id"].nunique(),
                "pooled_r": float(np.corrcoef(tiles[target], tiles["share"])[0, 1]),
                "within_slide_r": float(np.mean(within)) if within else np.nan,
                "within_slides": len(within),
            }
        )
    return pd.DataFrame(rows)
