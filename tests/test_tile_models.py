"""Tile scores of the out-of-fold predictors: they average exactly to the out-of-fold prediction at both units,
no heatmap uses a model that saw the patient, and a patient's slides never straddle a split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pathwsi.predict.evaluate import EvaluationSettings, evaluate_task
from pathwsi.predict.heatmap_job import qupath_geojson
from pathwsi.predict.tile_models import REPEAT, HeatmapSettings, TileModels, fit_tile_models

DIM = 12
SETTINGS = EvaluationSettings(repeats=4, bootstrap=20, seed=3)
SLIDES_OF = {"P00": 3, "P01": 2}  # the other patients have one slide


def synthetic_cohort(seed: int = 0, patients: int = 30) -> dict:
    """Tiles per slide; slide and patient features as aggregation makes them (mean and std over the tiles, the
    patient's over its pooled tiles); an expression and a mutation target that follow the first feature."""
    rng = np.random.default_rng(seed)
    ids = [f"P{i:02d}" for i in range(patients)]
    level = {p: rng.normal() for p in ids}
    tiles, patient_of = {}, {}
    for p in ids:
        for k in range(SLIDES_OF.get(p, 1)):
            slide = f"{p}-DX{k + 1}"
            patient_of[slide] = p
            tiles[slide] = rng.normal(size=(int(rng.integers(4, 15)), DIM)) + level[p] * np.eye(DIM)[0]
    columns = [f"{s}_{i:04d}" for s in ("mean", "std") for i in range(DIM)]

    def features(groups: dict[str, np.ndarray]) -> pd.DataFrame:
        rows = {key: np.r_[t.mean(axis=0), t.std(axis=0)] for key, t in groups.items()}
        return pd.DataFrame.from_dict(rows, orient="index", columns=columns)

    pooled = {p: np.concatenate([tiles[s] for s in tiles if patient_of[s] == p]) for p in ids}
    truth = np.array([level[p] for p in ids])
    targets = {
        "expression": pd.DataFrame(
            {"G1": 2 * truth + rng.normal(0, 0.5, patients), "G2": rng.normal(size=patients)}, ids
        ),
        "mutation": pd.DataFrame({"M1": (truth + rng.normal(0, 0.5, patients) > 0).astype(float)}, ids),
    }
    return {
        "tiles": tiles,
        "patient_of": pd.Series(patient_of),
        "slides": features(tiles),
        "patients": features(pooled),
        "targets": targets,
    }


def cross_validate(cohort: dict, unit: str) -> tuple[list, TileModels]:
    """Both tasks at `unit` (two feature models, ftx drawn) and the tile models of ftx."""
    rows = cohort["slides"] if unit == "slide" else cohort["patients"]
    patient_of = cohort["patient_of"] if unit == "slide" else None
    features = {"ftx": rows, "imgnet": rows + np.random.default_rng(1).normal(size=rows.shape)}
    results = []
    for task, targets in cohort["targets"].items():
        if unit == "slide":
            targets = targets.loc[patient_of.to_numpy()].set_axis(patient_of.index)
        results.append(evaluate_task(task, features, targets, SETTINGS, patient_of=patient_of))
    return results, fit_tile_models(results, rows, HeatmapSettings("ftx", "all", 2), SETTINGS)


@pytest.fixture(scope="module")
def cohort() -> dict:
    return synthetic_cohort()


@pytest.mark.parametrize("unit", ["patient", "slide"])
def test_tile_scores_average_to_the_out_of_fold_prediction(cohort, unit):
    results, models = cross_validate(cohort, unit)
    assert models.targets == ["G1.expression", "G2.expression", "M1.mutation"] and not models.mean_only
    row_of = {row: i for i, row in enumerate(models.rows)}
    pooled: dict[str, list[np.ndarray]] = {}
    for slide, tiles in cohort["tiles"].items():
        patient = cohort["patient_of"][slide]
        scores = models.tile_scores(tiles, cohort["slides"].loc[slide].to_numpy(), models.held_out(patient))
        pooled.setdefault(patient, []).append(scores)
        if unit == "slide":  # the slide's out-of-fold prediction, before any link function
            np.testing.assert_allclose(scores.mean(axis=0), models.oof[row_of[slide]], rtol=1e-9, atol=1e-9)
    if unit == "patient":  # the mean part pools every tile of the patient once; one-slide patients have no other part
        for patient, parts in pooled.items():
            if len(parts) == 1:
                np.testing.assert_allclose(parts[0].mean(axis=0), models.oof[row_of[patient]], rtol=1e-9, atol=1e-9)
    oof = {r.task: r.predictions["ftx"][REPEAT] for r in results}
    np.testing.assert_allclose(models.oof[:, :2], oof["expression"][:, :2])  # the same models as the cross-validation
    np.testing.assert_allclose(models.oof[:, 2], oof["mutation"][:, 0])


def test_only_the_mean_part_varies_between_tiles():
    cohort = synthetic_cohort(seed=5)
    _, models = cross_validate(cohort, "slide")
    slide = "P00-DX1"
    tiles, row = cohort["tiles"][slide], cohort["slides"].loc[slide].to_numpy()
    folds = models.held_out("P00")
    shifted = row.copy()
    shifted[DIM:] += 1.0  # another std part: every tile's score moves by the same amount
    change = models.tile_scores(tiles, shifted, folds) - models.tile_scores(tiles, row, folds)
    np.testing.assert_allclose(change, np.broadcast_to(change[0], change.shape))
    assert np.abs(change).max() > 0


@pytest.mark.parametrize("unit", ["patient", "slide"])
def test_no_heatmap_uses_a_model_that_saw_the_patient(cohort, unit):
    results, models = cross_validate(cohort, unit)
    fold_of = {r.task: r.fold_of[REPEAT] for r in results}
    for i in range(len(models.rows)):  # each target's fold is the one that tests the patient in that task's split
        for t, target in enumerate(models.targets):
            assert models.folds[i, t] == fold_of[models.task(target)][i]
    # changing the patient's features and expression leaves the models that score its slides as they were and
    # changes the others (its mutation label stays: the mutation split is stratified on the labels)
    patient = "P00"
    changed = {**cohort, "targets": {task: t.copy() for task, t in cohort["targets"].items()}}
    changed["targets"]["expression"].loc[patient] += 50.0
    for level in ("slides", "patients"):
        changed[level] = cohort[level].copy()
        changed[level].loc[changed[level].index.str.startswith(patient)] += 5.0
    _, refitted = cross_validate(changed, unit)
    folds = models.held_out(patient)
    for t in range(len(models.targets)):
        own = folds[t]
        np.testing.assert_array_equal(refitted.weights[t, own], models.weights[t, own])
        others = [f for f in range(SETTINGS.folds) if f != own]
        assert not np.allclose(refitted.weights[t, others], models.weights[t, others])


def test_a_patient_with_three_slides_never_straddles_a_split(cohort):
    results, _ = cross_validate(cohort, "slide")
    slides = cohort["patient_of"]
    for result in results:
        for patient in SLIDES_OF:
            rows = np.flatnonzero(result.patients.isin(slides[slides == patient].index))
            assert len(rows) == SLIDES_OF[patient]
            assert (result.fold_of[:, rows] == result.fold_of[:, rows[:1]]).all()  # every repeat


def test_tile_models_read_back(cohort, tmp_path):
    _, models = cross_validate(cohort, "slide")
    models.save(tmp_path / "tile_models.npz")
    back = TileModels.load(tmp_path / "tile_models.npz")
    assert back.targets == models.targets and back.rows == models.rows and back.unit == "slide"
    np.testing.assert_array_equal(back.weights, models.weights)
    np.testing.assert_array_equal(back.folds, models.folds)


def test_the_geojson_has_one_qupath_detection_per_tile_with_its_scores():
    coords = np.array([[0, 0], [448, 0]])
    collection = qupath_geojson(coords, 448.0, ["STK11.mutation"], np.array([[0.5], [-1.0]]))
    first, second = collection["features"]
    assert collection["type"] == "FeatureCollection" and first["properties"]["objectType"] == "detection"
    assert first["geometry"]["coordinates"][0] == [[0, 0], [448.0, 0], [448.0, 448.0], [0, 448.0], [0, 0]]
    assert second["properties"]["measurements"] == {"STK11.mutation": -1.0}
