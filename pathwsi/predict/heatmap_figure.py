"""One heatmap picture: a slide's thumbnail with its tile scores as a diverging colour map (matplotlib, Agg).

The colours are centred on the cohort's mean slide prediction of the target and span the
cohort's `COLOUR_QUANTILE` of |tile score − centre|, so one colour means the same score on every
slide of the cohort.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pathwsi.predict.heatmap_job import SlideScores
from pathwsi.predict.plots import save_figure, use_agg
from pathwsi.predict.tile_models import UNITS, TileModels

if TYPE_CHECKING:
    from pathlib import Path

COLOUR_MAP = "RdBu_r"  # red: above the cohort mean, blue: below
TILE_ALPHA = 0.6
DPI = 80
COLOUR_QUANTILE = 0.98  # the colour scale spans this quantile of the cohort's |tile score − centre|


@dataclass(frozen=True)
class HeatmapStyle:
    """How one target is drawn on every slide of a cohort."""

    model: str
    target: str
    units: str
    centre: float
    half_range: float
    mean_only: bool
    warnings: tuple[str, ...]

    @classmethod
    def for_target(
        cls,
        models: TileModels,
        target: str,
        scores: Sequence[np.ndarray],
        expression_units: str,
        warnings: Sequence[str],
    ) -> HeatmapStyle:
        """The target's units, and a colour scale centred on the mean slide prediction of the cohort."""
        means = [s.mean() for s in scores if len(s)]
        centre = float(np.mean(means)) if means else 0.0
        pooled = np.concatenate([s for s in scores if len(s)]) if means else np.zeros(1)
        half = float(np.quantile(np.abs(pooled - centre), COLOUR_QUANTILE)) or 1.0
        task = models.task(target)
        units = UNITS[task] if task == "mutation" else f"{UNITS[task]}, {expression_units}"
        return cls(models.model, target, units, centre, half, models.mean_only, tuple(warnings))


def draw_heatmap(
    path: Path, thumbnail: np.ndarray, thumb_mpp: float, slide: SlideScores, index: int, style: HeatmapStyle
) -> None:
    """The thumbnail with each tile filled in its score's colour, a colour bar with units, and a title with the
    slide, target, the slide's prediction and its true value."""
    use_agg()
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    norm = Normalize(style.centre - style.half_range, style.centre + style.half_range)
    cmap = colormaps[COLOUR_MAP]
    height, width = thumbnail.shape[:2]
    figure, ax = plt.subplots(figsize=(5.2, 5.2 * height / width + 1.0), layout="constrained")
    ax.imshow(thumbnail)
    scale = (slide.record.mpp.value if slide.record.mpp else thumb_mpp) / thumb_mpp
    side = float(slide.record.tile.level0_px if slide.record.tile else 0) * scale
    colours = cmap(norm(slide.scores[:, index]))
    for (x, y), colour in zip(slide.coords * scale, colours):
        ax.add_patch(plt.Rectangle((x, y), side, side, facecolor=colour, alpha=TILE_ALPHA, linewidth=0))
    ax.set_axis_off()
    bar = figure.colorbar(ScalarMappable(norm, cmap), ax=ax, shrink=0.8, pad=0.02)
    bar.set_label(f"tile score ({style.units}); centre: cohort mean", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    gene, task = style.target.rsplit(".", 1)
    truth = slide.truth[index]
    true_text = (
        "unknown"
        if not np.isfinite(truth)
        else (f"{truth:.3g}" if task == "expression" else ("mutated" if truth > 0 else "not mutated"))
    )
    part = "" if style.mean_only else " (mean part; the other statistics add one value per slide)"
    ax.set_title(
        f"{slide.slide}: {gene} {task}, {style.model}\n"
        f"prediction {slide.prediction[index]:.3g}, true {true_text}; {len(slide.scores)} tiles\n"
        f"tile scores{part} average exactly to the prediction",
        fontsize=8,
    )
    save_figure(figure, path, style.warnings, dpi=DPI, palette=True)
