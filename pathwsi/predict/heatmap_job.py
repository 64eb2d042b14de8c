"""The per-cohort heatmap job: every used slide's tiles scored by the out-of-fold predictors of rule
predict (pathwsi.predict.tile_models), as a table, a QuPath GeoJSON and one picture per target.

Outputs under results/heatmaps/{cohort}/ (`HeatmapOutputs`):
- tiles/{slide}.parquet: x, y (level-0 px of the tile's top-left corner), size (level-0 px) and one
  score column per target;
- geojson/{slide}.geojson: the tiles as QuPath detections with their scores as measurements;
- {model}/{target}/{slide}.png: the slide's thumbnail with the scores as a diverging colour map;
- heatmaps.tsv: per slide and target, the tiles, the mean tile score and the slide's prediction
  (equal up to float rounding: the job checks it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pathwsi.features.store import open_store
from pathwsi.predict.aggregate import AggregateOutputs, read_features
from pathwsi.predict.tile_models import SLIDE_PREDICTIONS, TILE_MODELS, TileModelError, TileModels
from pathwsi.runtime.outputs import write_frame, write_table, write_text
from pathwsi.slides.tile_record import TilesRecord

log = logging.getLogger(__name__)
DECOMPOSITION_TOLERANCE = 1e-4  # |mean tile score − slide prediction| allowed, relative to 1 + |prediction|


@dataclass(frozen=True)
class HeatmapOutputs:
    """Where one cohort's heatmaps go."""

    folder: Path

    def picture(self, model: str, target: str, slide: str) -> Path:
        return self.folder / model / target / f"{slide}.png"

    def tiles(self, slide: str) -> Path:
        return self.folder / "tiles" / f"{slide}.parquet"

    def geojson(self, slide: str) -> Path:
        return self.folder / "geojson" / f"{slide}.geojson"

    @property
    def table(self) -> Path:
        return self.folder / "heatmaps.tsv"


def heatmap_link(cohort: str, model: str, target: str, slide: str) -> str:
    """The picture's path relative to results/predict/{cohort}/ (for links in its summary.md)."""
    return f"../../heatmaps/{cohort}/{model}/{target}/{slide}.png"


@dataclass(frozen=True)
class SlideScores:
    """One slide's tiles and their scores [tile, target], with the slide's prediction and truth per target."""

    slide: str
    record: TilesRecord
    coords: np.ndarray
    scores: np.ndarray
    prediction: np.ndarray
    truth: np.ndarray


def run_heatmap_job(
    predict_dir: Path,
    aggregate: AggregateOutputs,
    tiles_records: dict[str, Path],
    stores: dict[str, Path],
    out_dir: Path,
    expression_units: str = "log2(x+1)",
    max_px: int = 800,
) -> pd.DataFrame:
    """Score, write and draw every slide of `predict_dir`'s slide predictions; returns the heatmaps.tsv table."""
    from tqdm.auto import tqdm

    from pathwsi.predict.heatmap_figure import HeatmapStyle, draw_heatmap

    models = TileModels.load(predict_dir / TILE_MODELS)
    predictions = pd.read_csv(predict_dir / SLIDE_PREDICTIONS, sep="\t", dtype={"slide_id": str, "patient_id": str})
    slide_features = read_features(aggregate.features(models.model, "slides"))
    warnings = [w for w in aggregate.warnings() if f"'{models.model}'" in w]  # those of the drawn model
    outputs = HeatmapOutputs(out_dir)
    scored = []
    for slide, rows in tqdm(predictions.groupby("slide_id", sort=True), desc="tile scores", unit="slide"):
        rows = rows.set_index("target").loc[models.targets]
        scored.append(
            score_slide(
                models,
                str(slide),
                rows,
                slide_features.loc[str(slide), models.columns].to_numpy(float),
                stores[str(slide)],
                tiles_records[str(slide)],
            )
        )
        write_slide_scores(outputs, models.targets, scored[-1])
    table = check_decomposition(models, scored)
    write_frame(table, outputs.table, sep="\t")
    styles = [
        HeatmapStyle.for_target(models, target, [s.scores[:, i] for s in scored], expression_units, warnings)
        for i, target in enumerate(models.targets)
    ]
    for slide_scores in tqdm(scored, desc="heatmap pictures", unit="slide"):
        thumbnail, thumb_mpp = _thumbnail(slide_scores.record, max_px)
        for i, style in enumerate(styles):
            draw_heatmap(
                outputs.picture(models.model, models.targets[i], slide_scores.slide),
                thumbnail,
                thumb_mpp,
                slide_scores,
                i,
                style,
            )
    log.info("heatmaps of %d slides × %d targets in %s", len(scored), len(models.targets), out_dir)
    return table


def score_slide(
    models: TileModels, slide: str, rows: pd.DataFrame, features: np.ndarray, store_path: Path, record_path: Path
) -> SlideScores:
    """The slide's readable tiles scored by each target's fold model (the one that held its patient out);
    rows: the slide's predictions indexed by target; features: its aggregated feature row, in the models' columns."""
    store = open_store(store_path)
    if models.model not in store.models:
        raise TileModelError(
            f"slide {slide}: store {store_path} has no features of {models.model}; rerun its features job"
        )
    readable = store.readable()
    tiles = np.asarray(store.features(models.model)[:])[readable]
    scores = models.tile_scores(tiles, features, rows["fold"].to_numpy())
    return SlideScores(
        slide,
        TilesRecord.load(record_path),
        store.coords()[readable],
        scores,
        rows["prediction"].to_numpy(float),
        rows["truth"].to_numpy(float),
    )


def write_slide_scores(outputs: HeatmapOutputs, targets: Sequence[str], slide: SlideScores) -> None:
    """The slide's tile table (parquet) and its QuPath GeoJSON."""
    size = _tile_size(slide.record)
    columns = {"x": slide.coords[:, 0], "y": slide.coords[:, 1], "size": np.full(len(slide.coords), size)}
    write_table(columns | {t: slide.scores[:, i] for i, t in enumerate(targets)}, outputs.tiles(slide.slide))
    write_text(json.dumps(qupath_geojson(slide.coords, size, targets, slide.scores)), outputs.geojson(slide.slide))


def qupath_geojson(coords: np.ndarray, size: float, targets: Sequence[str], scores: np.ndarray) -> dict:
    """A FeatureCollection of square tiles (level-0 px) that QuPath imports as detections with measurements."""
    features = []
    for (x, y), values in zip(coords.tolist(), scores.tolist()):
        ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "name": "pathwsi tile",
                    "measurements": dict(zip(targets, values)),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def check_decomposition(models: TileModels, scored: list[SlideScores]) -> pd.DataFrame:
    """Per slide and target: tiles, mean tile score, prediction, their difference; warns where they differ."""
    rows = []
    for slide in scored:
        means = slide.scores.mean(axis=0) if len(slide.scores) else np.full(len(models.targets), np.nan)
        for i, target in enumerate(models.targets):
            rows.append([slide.slide, target, len(slide.scores), means[i], slide.prediction[i], slide.truth[i]])
    table = pd.DataFrame(rows, columns=["slide_id", "target", "tiles", "mean_tile_score", "prediction", "truth"])
    table["difference"] = table["mean_tile_score"] - table["prediction"]
    off = table["difference"].abs() > DECOMPOSITION_TOLERANCE * (1 + table["prediction"].abs())
    for row in table[off].itertuples():
        log.warning(
            "slide %s, %s: the tiles' mean score %.6g differs from the slide's prediction %.6g (were the stores re-extracted after rule aggregate ran?)",
            row.slide_id,
            row.target,
            row.mean_tile_score,
            row.prediction,
        )
    return table


def _tile_size(record: TilesRecord) -> float:
    if record.tile is None:
        raise TileModelError(
            f"slide {record.sample.slide_id}: its tiling record has no tile geometry; rerun its tile job"
        )
    return float(record.tile.level0_px)


def _thumbnail(record: TilesRecord, max_px: int) -> tuple[np.ndarray, float]:
    """The slide at a µm/px that fits its longest side in `max_px`, and that µm/px."""
    from pathwsi.slides.slide import Slide

    with Slide(record.sample.path, record.sample.slide_id, record.sample.mpp, record.backend or "auto") as slide:
        mpp = slide.mpp.value * max(1.0, max(slide.width, slide.height) / max_px)
        return slide.read_whole(mpp), mpp
