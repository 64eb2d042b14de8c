"""The per-cohort prediction job as the workflow runs it: patient features + target tables ->
cross-validated expression and mutation predictors and the model comparison.

Targets are matched to the patients that have image features; the mismatches (patients without
targets, targets without slides, genes missing or constant) are logged and written to
`targets.json` in the output folder, never raised unless too few patients are left.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pathwsi.predict.aggregate import read_features
from pathwsi.predict.evaluate import EvaluationError, EvaluationSettings, run_evaluation
from pathwsi.predict.targets import load_gene_list, match, read_expression, read_mutations
from pathwsi.runtime.outputs import write_json

log = logging.getLogger(__name__)
ALL_GENES = "all"


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
    feature_files: dict[str, Path],
    cohort: CohortTargets,
    targets: TargetSettings,
    settings: EvaluationSettings,
    sites: dict[str, str],
    out_dir: Path,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """Cross-validate every task the cohort has targets for; write tables, figures and summaries to `out_dir`, all
    headed by `warnings` about the features (the aggregate provenance's: untrained weights)."""
    for warning in warnings:
        log.warning("%s", warning)
    features = {model: read_features(path) for model, path in feature_files.items()}
    patients = list(next(iter(features.values())).index)
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
    summary = run_evaluation(
        features,
        out_dir,
        settings,
        expression=tables.get("expression"),
        mutations=tables.get("mutations"),
        sites=site_of,
        warnings=warnings,
        planted=cohort.planted,
    )
    for task, counts in summary["tasks"].items():
        log.info("%s: %s", task, {k: v for k, v in counts.items() if k != "paper"})
    return summary


def _matched(
    patients: list[str], table: pd.DataFrame, genes: list[str] | None, min_patients: int, name: str
) -> tuple[pd.DataFrame, dict[str, Any]]:
    aligned, report = match(patients, table, genes, min_patients)
    for line in report.lines():
        log.info("%s targets: %s", name, line)
    return aligned, report.to_dict()
