"""The per-cohort prediction job as the workflow runs it: aggregated features + target tables ->
cross-validated expression and mutation predictors, the model comparison, and the tile models that
the heatmaps apply.

Targets are matched to the patients that have image features; the mismatches (patients without
targets, targets without slides, genes missing or constant) are logged and written to
`targets.json` in the output folder, never raised unless too few patients are left. With
`predict.unit: slide` each used slide is a row with its patient's targets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pathwsi.predict.aggregate import AggregateOutputs, read_features
from pathwsi.predict.evaluate import EvaluationError, EvaluationSettings, run_evaluation
from pathwsi.predict.heatmap_job import heatmap_link
from pathwsi.predict.targets import load_gene_list, match, read_expression, read_mutations
from pathwsi.predict.tile_models import SLIDE_PREDICTIONS, TILE_MODELS, HeatmapSettings, TileModels, fit_tile_models
from pathwsi.runtime.outputs import write_frame, write_json, write_text
from pathwsi.runtime.report_page import write_markdown_page

log = logging.getLogger(__name__)
ALL_GENES = "all"
TOP_SLIDES = 3  # slides linked per target in summary.md


@dataclass(frozen=True)
class CohortTargets:
    """One cohort's target tables (either may be absent) and how to read them."""

    expression: str | None = None
    mutations: str | None = None
    id_column: str | None = None
    planted: tuple[str, ...] = ()  # genes known to carry signal: the summary says whether each was recovered

    def __post_init__(self) -> None:
        object.__setattr__(self, "planted", tuple(self.planted))  # a YAML list


@dataclass(frozen=True)
class TargetSettings:
    """Config section `targets` (less `cohorts`): gene lists and the expression transform."""

    expression_genes: str | list[str] = "default"
    expression_transform: str = "log2p1"
    mutation_genes: str | list[str] = ALL_GENES

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TargetSettings:
        """From a validated config's `targets` section (its `cohorts` name each cohort's tables: CohortTargets)."""
        return cls(**{key: value for key, value in config["targets"].items() if key != "cohorts"})


def gene_list(spec: str | list[str]) -> list[str] | None:
    """None for 'all' (every column of the table), else the symbols the spec names."""
    return None if spec == ALL_GENES else load_gene_list(spec)


def run_predict_job(
    aggregate: AggregateOutputs,
    models: list[str],
    cohort: CohortTargets,
    targets: TargetSettings,
    settings: EvaluationSettings,
    sites: dict[str, str],
    out_dir: Path,
    heatmaps: HeatmapSettings | None = None,
) -> dict[str, Any]:
    """Cross-validate every task the cohort has targets for, on the features of `settings.unit`; write tables,
    figures and summaries to `out_dir`, all headed by the aggregate provenance's warnings (untrained weights);
    with `heatmaps`, the tile models and every used slide's prediction by the model that held its patient out."""
    warnings = aggregate.warnings()
    for warning in warnings:
        log.warning("%s", warning)
    level = "patients" if settings.unit == "patient" else "slides"
    features = {model: read_features(aggregate.features(model, level)) for model in models}
    slides = _used_slides(aggregate)
    rows = list(next(iter(features.values())).index)
    patient_of = slides.reindex(rows) if settings.unit == "slide" else None
    patients = sorted(set(patient_of.dropna())) if patient_of is not None else rows
    min_patients = 2 * settings.folds
    tables: dict[str, pd.DataFrame] = {}
    report: dict[str, Any] = {}
    if cohort.expression:
        genes = gene_list(targets.expression_genes)
        raw = read_expression(Path(cohort.expression), genes, targets.expression_transform, cohort.id_column)
        tables["expression"], report["expression"] = _matched(patients, raw, genes, min_patients, "expression")
    if cohort.mutations:
        genes = gene_list(targets.mutation_genes)
        raw = read_mutations(Path(cohort.mutations), genes, cohort.id_column)
        tables["mutations"], report["mutations"] = _matched(patients, raw, genes, min_patients, "mutations")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(report, out_dir / "targets.json")
    site_of = pd.Series(sites).reindex(patients) if settings.group_by_site else None
    if site_of is not None and site_of.isna().any():
        missing = list(site_of[site_of.isna()].index[:5])
        raise EvaluationError(
            f"predict.group_by_site is true but patient(s) {', '.join(missing)} have no 'site' in the sample sheet; fill the column or set group_by_site: false"
        )
    if patient_of is not None:
        tables = {name: _per_slide(table, patient_of.dropna()) for name, table in tables.items()}
    summary, results = run_evaluation(
        features,
        out_dir,
        settings,
        expression=tables.get("expression"),
        mutations=tables.get("mutations"),
        sites=site_of,
        warnings=warnings,
        planted=cohort.planted,
        patient_of=patient_of.dropna() if patient_of is not None else None,
    )
    for task, counts in summary["tasks"].items():
        log.info("%s: %s", task, {k: v for k, v in counts.items() if k != "paper"})
    if heatmaps is not None and results:
        tile_models = fit_tile_models(results, features[str(heatmaps.model)], heatmaps, settings)
        tile_models.save(out_dir / TILE_MODELS)
        predictions = slide_predictions(
            tile_models, read_features(aggregate.features(tile_models.model, "slides")), slides
        )
        write_frame(predictions, out_dir / SLIDE_PREDICTIONS, sep="\t")
        markdown = (out_dir / "summary.md").read_text()
        write_text(markdown + top_slides_markdown(predictions, tile_models.model, out_dir.name), out_dir / "summary.md")
    if (out_dir / "summary.md").exists():
        title = f"pathwsi: molecular prediction, cohort {out_dir.name}"
        write_markdown_page((out_dir / "summary.md").read_text(), title, out_dir / "summary.html")
    return summary


def _used_slides(aggregate: AggregateOutputs) -> pd.Series:
    """Slide id -> patient id of the slides aggregation used."""
    table = pd.read_csv(aggregate.slides, sep="\t", dtype={"slide_id": str, "patient_id": str})
    used = table[table["status"] == "used"]
    return pd.Series(used["patient_id"].to_numpy(), index=pd.Index(used["slide_id"], name="slide_id"))


def _per_slide(table: pd.DataFrame, patient_of: pd.Series) -> pd.DataFrame:
    """Patient targets as rows per slide (each slide with its patient's values), for the slides whose patient has some."""
    slides = patient_of[patient_of.isin(table.index)]
    return table.loc[slides.to_numpy()].set_axis(pd.Index(slides.index, name="slide_id"))


def slide_predictions(models: TileModels, features: pd.DataFrame, slides: pd.Series) -> pd.DataFrame:
    """Each used slide's prediction of every heatmap target by the fold model that held its patient out, with the
    row's true value; columns slide_id, patient_id, target, fold, prediction, truth."""
    rows = {row: i for i, row in enumerate(models.rows)}
    frames = []
    for slide, patient in slides.items():
        if patient not in models.patients or slide not in features.index:
            continue
        folds = models.held_out(patient)
        row = rows.get(str(slide if models.unit == "slide" else patient))
        truth = models.truth[row] if row is not None else np.full(len(models.targets), np.nan)
        frames.append(
            pd.DataFrame(
                {
                    "slide_id": slide,
                    "patient_id": patient,
                    "target": models.targets,
                    "fold": folds,
                    "prediction": models.score(features.loc[[slide]].to_numpy(), folds)[0],
                    "truth": truth,
                }
            )
        )
    columns = ["slide_id", "patient_id", "target", "fold", "prediction", "truth"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def top_slides_markdown(predictions: pd.DataFrame, model: str, cohort: str) -> str:
    """summary.md's heatmap section: per target, the slides with the highest predictions, linked to their heatmaps
    (made by rule heatmaps under results/heatmaps/)."""
    lines = [
        "## Where the predictions come from: tile heatmaps",
        "",
        f"Per target, the {TOP_SLIDES} slides with the highest prediction by {model}'s out-of-fold model (the one that "
        "held the slide's patient out); each heatmap's tile scores average exactly to that prediction.",
        "",
    ]
    for target, rows in predictions.groupby("target", sort=False):
        top = rows.nlargest(TOP_SLIDES, "prediction")
        links = ", ".join(
            f"[{r.slide_id}]({heatmap_link(cohort, model, str(target), str(r.slide_id))}) ({r.prediction:.3g}; true {r.truth:.3g})"
            for r in top.itertuples()
        )
        lines.append(f"- {target}: {links}")
    return "\n".join(lines) + "\n"


def _matched(
    patients: list[str], table: pd.DataFrame, genes: list[str] | None, min_patients: int, name: str
) -> tuple[pd.DataFrame, dict[str, Any]]:
    aligned, report = match(patients, table, genes, min_patients)
    for line in report.lines():
        log.info("%s targets: %s", name, line)
    return aligned, report.to_dict()
