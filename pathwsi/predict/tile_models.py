"""The out-of-fold linear predictors as tile scorers, for heatmaps that add up to the prediction.

A predictor is linear in the standardized features, f(x) = b + wᵀ(z − m) with z = (x − μ)/σ, so in
the raw features it is f(x) = c + vᵀx (v = w/σ, c = b − vᵀμ − wᵀm). A slide's mean-pooled features
are the mean of its tiles' features, so applying v to each tile (the mean part of the features)
and c plus the other statistics' part (std, max, quantiles: one value per slide) gives tile scores
whose mean is exactly f(slide). Scores are in the prediction's units: log-odds (decision values)
for mutations, transformed expression for genes.

The models are those of one cross-validation repeat (`REPEAT`), refitted fold by fold exactly as
the cross-validation fits them (same standardization, penalty choice and solver), so every slide is
scored by the model of the fold that held its patient out: no heatmap uses a model that saw the
patient.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pathwsi.errors import PathwsiError
from pathwsi.predict.evaluate import EvaluationSettings, TaskResult, fittable_columns
from pathwsi.predict.linear_models import center_gram, logistic_path, ridge_dual, standardized_gram, training_scale
from pathwsi.runtime.outputs import atomic_path

REPEAT = 0  # the cross-validation repeat whose fold models score the tiles
UNITS = {"mutation": "log-odds", "expression": "predicted expression"}
TILE_MODELS = "tile_models.npz"  # in results/predict/{cohort}/
SLIDE_PREDICTIONS = "slide_predictions.tsv"  # each used slide's prediction by the model that held its patient out
MEAN_PREFIX = "mean_"  # aggregate feature columns of the mean statistic: mean_0000, ...


class TileModelError(PathwsiError, ValueError):
    """Tile models that cannot be built or read; the message says which and what to do."""


@dataclass(frozen=True)
class HeatmapSettings:
    """Config section `predict.heatmaps`: which predictors are drawn on the tiles."""

    model: str | None = None  # None: the first compared model
    mutations: str | list[str] = "all"
    top_genes: int = 3

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HeatmapSettings:
        """From a validated config; the model defaults to `predict.compare[0]`."""
        section = dict(config["predict"]["heatmaps"])
        section["model"] = section.get("model") or config["predict"]["compare"][0]
        return cls(**section)


@dataclass(frozen=True)
class TileModels:
    """One feature model's fold predictors for the heatmap targets, in raw feature units.

    weights [target, fold, feature], offsets [target, fold]; rows are the cross-validation's rows
    (patients or slides) with their patient and, per target, their repeat-`REPEAT` test fold (each task has
    its own split set), their true value and the cross-validation's out-of-fold prediction [row, target].
    """

    model: str
    unit: str
    columns: list[str]
    targets: list[str]  # "{gene}.{task}"
    weights: np.ndarray
    offsets: np.ndarray
    rows: list[str]
    patients: list[str]
    folds: np.ndarray
    truth: np.ndarray
    oof: np.ndarray

    def task(self, target: str) -> str:
        return target.rsplit(".", 1)[1]

    def held_out(self, patient: str) -> np.ndarray:
        """Per target, the fold that held the patient out (all its slides share one)."""
        matches = np.flatnonzero(np.asarray(self.patients) == patient)
        if not len(matches):
            raise TileModelError(
                f"patient {patient} was not cross-validated for model {self.model}; rerun rule predict"
            )
        return self.folds[matches[0]]

    def _fold_models(self, folds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weights [target, feature] and offsets [target] of each target's fold in `folds`."""
        targets = np.arange(len(self.targets))
        return self.weights[targets, folds], self.offsets[targets, folds]

    def score(self, features: np.ndarray, folds: np.ndarray) -> np.ndarray:
        """Predictions [row, target] of feature rows (in `columns` order) by each target's model of fold `folds`."""
        weights, offsets = self._fold_models(folds)
        return np.asarray(features, np.float64) @ weights.T + offsets

    def tile_scores(self, tiles: np.ndarray, slide: np.ndarray, folds: np.ndarray) -> np.ndarray:
        """Scores [tile, target] of one slide's tile features (the mean part) given its slide feature row: the
        other statistics' part is the same for every tile, so the scores' mean is the slide's prediction."""
        mean = np.array([c.startswith(MEAN_PREFIX) for c in self.columns])
        if int(mean.sum()) != tiles.shape[1]:
            raise TileModelError(
                f"model {self.model}: {tiles.shape[1]} features per tile, but the predictors have {int(mean.sum())} mean features; aggregate with the mean statistic"
            )
        weights, offsets = self._fold_models(folds)
        rest = np.asarray(slide, np.float64)[~mean] @ weights[:, ~mean].T
        return np.asarray(tiles, np.float64) @ weights[:, mean].T + offsets + rest

    @property
    def mean_only(self) -> bool:
        """Whether the features are the mean alone (else the heatmap shows the mean part)."""
        return all(c.startswith(MEAN_PREFIX) for c in self.columns)

    def save(self, path: Path) -> None:
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            np.savez_compressed(
                handle,
                model=self.model,
                unit=self.unit,
                columns=np.asarray(self.columns),
                targets=np.asarray(self.targets),
                weights=self.weights,
                offsets=self.offsets,
                rows=np.asarray(self.rows),
                patients=np.asarray(self.patients),
                folds=self.folds,
                truth=self.truth,
                oof=self.oof,
            )

    @classmethod
    def load(cls, path: Path) -> TileModels:
        try:
            with np.load(path) as data:
                return cls(
                    model=str(data["model"]),
                    unit=str(data["unit"]),
                    columns=[str(c) for c in data["columns"]],
                    targets=[str(t) for t in data["targets"]],
                    weights=data["weights"],
                    offsets=data["offsets"],
                    rows=[str(r) for r in data["rows"]],
                    patients=[str(p) for p in data["patients"]],
                    folds=data["folds"],
                    truth=data["truth"],
                    oof=data["oof"],
                )
        except (OSError, KeyError, ValueError) as err:
            raise TileModelError(f"{path}: not a tile-model file of this pathwsi ({err}); rerun rule predict") from err


def heatmap_genes(result: TaskResult, settings: HeatmapSettings) -> list[str]:
    """The task's genes to draw: the listed (or all) mutations, or the top expression genes by mean r."""
    assert settings.model is not None, "HeatmapSettings.from_config fills the model"
    if result.task == "mutation":
        wanted = result.genes if settings.mutations == "all" else list(settings.mutations)
        return [g for g in wanted if g in result.genes]
    table = result.tables[settings.model].sort_values("r_mean", ascending=False, na_position="last")
    return [str(g) for g in table["gene"].head(settings.top_genes)]


def fit_tile_models(
    results: list[TaskResult], features: pd.DataFrame, settings: HeatmapSettings, evaluation: EvaluationSettings
) -> TileModels:
    """The fold predictors of `settings.model` for each result's heatmap genes, refitted for repeat `REPEAT` with
    the penalty grids of `evaluation`; features: the model's feature table, rows as in the results."""
    assert settings.model is not None, "HeatmapSettings.from_config fills the model"
    first = results[0]
    rows = first.patients
    x = features.loc[rows].to_numpy(np.float64)
    n_folds = int(first.fold_of.max()) + 1
    weights, offsets, targets, folds, truth, oof = [], [], [], [], [], []
    for result in results:
        if not result.patients.equals(rows):
            raise TileModelError("the tasks were cross-validated on different rows; heatmaps need the same rows")
        for gene in heatmap_genes(result, settings):
            y = result.targets[gene].to_numpy(np.float64)
            fold_row = result.fold_of[REPEAT]
            w, c = fold_predictors(result.task, x, y, fold_row, evaluation.penalties(result.task))
            weights.append(w)
            offsets.append(c)
            targets.append(f"{gene}.{result.task}")
            folds.append(fold_row)
            truth.append(y)
            oof.append(result.predictions[settings.model][REPEAT][:, result.genes.index(gene)])
    patient_of = first.patient_of
    patients = rows if patient_of is None else pd.Index(patient_of.reindex(rows))
    return TileModels(
        model=settings.model,
        unit=first.unit,
        columns=list(features.columns),
        targets=targets,
        weights=np.stack(weights) if weights else np.zeros((0, n_folds, x.shape[1])),
        offsets=np.stack(offsets) if offsets else np.zeros((0, n_folds)),
        rows=[str(r) for r in rows],
        patients=[str(p) for p in patients],
        folds=_by_row(folds, len(rows)).astype(np.int16),
        truth=_by_row(truth, len(rows)),
        oof=_by_row(oof, len(rows)),
    )


def _by_row(per_target: list[np.ndarray], rows: int) -> np.ndarray:
    """[row, target] from one array per target."""
    return np.stack(per_target, axis=1) if per_target else np.zeros((rows, 0))


def fold_predictors(
    task: str, x: np.ndarray, y: np.ndarray, folds: np.ndarray, factors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per fold, (v, c) with f(x) = c + vᵀx: the predictor the cross-validation fits on the fold's training rows
    with a known target (NaN where a fold cannot be fitted)."""
    n_folds = int(folds.max()) + 1
    weights, offsets = np.full((n_folds, x.shape[1]), np.nan), np.full(n_folds, np.nan)
    known = np.isfinite(y)
    for fold in range(n_folds):
        train, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        used = known[train]
        target = y[train[used]]
        if not fittable_columns(task, target[:, None])[0]:
            continue
        k, k_test = standardized_gram(x, train, test)
        kc, _ = center_gram(k[np.ix_(used, used)], k_test[:, used])
        if task == "expression":
            dual, intercept, _ = ridge_dual(kc, target[:, None], factors)
            alpha, b = dual[:, 0], float(intercept[0])
        else:
            fit, _, _ = logistic_path(kc, target > 0, factors)
            alpha, b = fit.c * fit.dual, fit.intercept
        mean, std = training_scale(x, train)
        z = (x[train[used]] - mean) / std
        centre = z.mean(axis=0)
        w = (z - centre).T @ alpha
        weights[fold] = w / std
        offsets[fold] = b - weights[fold] @ mean - w @ centre
    return weights, offsets
