"""Paper experiments 2 and 3: cross-validated prediction of gene expression and mutation status from
patient-level image features, and the paired comparison of two feature sets (FTX vs IMGNET).

Protocol (docs/evaluate.md lists every default as OUR choice; the paper publishes no models):
repeated K-fold cross-validation (5 folds × 50 repeats), grouped by patient or by tissue source
site, one split set per task shared by every model. In each outer fold the features are
standardized on the training rows and a penalised linear model is fitted per gene with its
penalty chosen by leave-one-out within the training rows (pathwsi.predict.linear_models): ridge for
expression, class-balanced L2 logistic regression for mutation (splits stratified on all
mutation columns). Out-of-fold predictions give, per gene, model and repeat, Pearson and
Spearman r (expression) or AUROC (mutation).

Per gene and model: mean ± std over repeats; expression: a one-sided Pearson test of the truth
against the out-of-fold prediction averaged over repeats, Benjamini–Hochberg q across genes;
mutation: a stratified bootstrap 95 % CI of the AUROC of the repeat-averaged scores. Models are
compared per gene by a Wilcoxon signed-rank test paired over repeats (BH q across genes).

A target value that is missing (NaN) drops that patient for that gene only: genes are grouped by
their pattern of missing values and each group is fitted on its own rows. A fold that cannot be
fitted (fewer than 3 training rows, or one class only) gives NaN for its test rows, which makes
that repeat's metric NaN; such folds are counted in `failed_folds` and logged.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from pathwsi import __version__
from pathwsi.errors import PathwsiError
from pathwsi.predict.linear_models import center_gram, logistic_loo, ridge_loo, standardized_gram
from pathwsi.predict.splits import make_splits, split_groups, write_splits
from pathwsi.runtime.outputs import write_frame, write_json, write_text
from pathwsi.stats import auroc, bh, bootstrap_ci, mean_over_repeats, over_repeats, paired_test, pearson, ranks

log = logging.getLogger(__name__)
TASKS = ("expression", "mutation")
METRIC = {"expression": "r", "mutation": "auroc"}  # the per-repeat metric models are compared on
PAPER = {
    "expression": "TCGA LUAD: 171 immune genes significant, 139 of them better with FTX-2048",
    "mutation": "TCGA LUAD: FTX-2048 better for 5 of the 9 most frequently mutated genes (STK11, TP53, LRP1B, NF1, FAT1)",
}
MIN_TRAIN_ROWS = 3
UNITS = ("patient", "slide")
UNIT_LINE = {
    "patient": "One sample per patient: the features of all its slides' tiles pooled.",
    "slide": "One sample per slide, with its patient's targets; a patient's slides always share a fold, so no patient is on both sides of a split. Slide-level CIs treat a patient's slides as independent.",
}

# 10^-3 ... 10^4 in half decades, written out as the schema's default is (np.logspace differs in one last digit)
RIDGE_PENALTIES = (0.001, 0.0031622776601683794, 0.01, 0.03162277660168379, 0.1, 0.31622776601683794, 1.0, 3.1622776601683795, 10.0, 31.622776601683793, 100.0, 316.22776601683796, 1000.0, 3162.2776601683795, 10000.0)  # fmt: skip


class EvaluationError(PathwsiError, ValueError):
    """Settings, features or targets that cannot be cross-validated; the message says what to change."""


@dataclass(frozen=True)
class EvaluationSettings:
    """Defaults are OUR choices except folds and repeats (the paper's 5 × 50); docs/evaluate.md explains each."""

    folds: int = 5
    repeats: int = 50
    seed: int = 0
    group_by_site: bool = False  # keep each tissue source site within one fold
    stratify_mutations: bool = True  # balance each mutation's positives over the folds
    ridge_penalties: tuple[float, ...] = RIDGE_PENALTIES  # × trace(K)/n
    logistic_penalties: tuple[float, ...] = (0.03, 0.3, 3.0, 30.0, 300.0)  # 1/C = factor × trace(K)/n
    fdr: float = 0.05  # q threshold for "significant"
    bootstrap: int = 2000  # resamples for the AUROC confidence interval
    compare: tuple[str, str] = ("ftx", "imgnet")  # (a, b): differences are a − b
    unit: str = "patient"  # or "slide": one row per slide, folds grouped by patient

    def __post_init__(self) -> None:
        for name in ("ridge_penalties", "logistic_penalties", "compare"):  # lists from a YAML config
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        if self.folds < 2 or self.repeats < 1:
            problems.append("folds >= 2 and repeats >= 1")
        if (
            not self.ridge_penalties
            or not self.logistic_penalties
            or min(self.ridge_penalties + self.logistic_penalties) <= 0
        ):
            problems.append("non-empty penalty grids of positive factors")
        if not 0 < self.fdr < 1 or self.bootstrap < 1:
            problems.append("0 < fdr < 1 and bootstrap >= 1")
        if len(self.compare) != 2 or self.compare[0] == self.compare[1]:
            problems.append("compare: two different model names")
        if self.unit not in UNITS:
            problems.append(f"unit: one of {', '.join(UNITS)}")
        if problems:
            raise EvaluationError(f"evaluation settings need {'; '.join(problems)} (got {self})")

    def penalties(self, task: str) -> np.ndarray:
        """The task's penalty grid: ridge for expression, logistic for mutation."""
        return np.asarray(self.ridge_penalties if task == "expression" else self.logistic_penalties)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EvaluationSettings:
        """From a validated config's `predict` section (less `heatmaps`: HeatmapSettings) and its `seed`."""
        return cls(**{k: v for k, v in config["predict"].items() if k != "heatmaps"}, seed=config["seed"])


@dataclass
class TaskResult:
    """One task's cross-validation: arrays are indexed [repeat, row, gene] or [repeat, gene]."""

    task: str
    targets: pd.DataFrame  # rows (patients, or slides with their patient's targets) × genes, aligned with the features
    fold_of: np.ndarray  # [repeat, row]
    predictions: dict[str, np.ndarray]  # model -> out-of-fold predictions or decision values [repeat, row, gene]
    per_repeat: dict[str, dict[str, np.ndarray]]  # model -> metric -> [repeat, gene]
    tables: dict[str, pd.DataFrame]  # model -> per-gene metrics
    seconds: float
    notes: dict[str, int]  # counts of failed folds and unconverged fits per model
    patient_of: pd.Series | None = None  # row (slide) id -> patient id when the rows are slides

    @property
    def unit(self) -> str:
        return "patient" if self.patient_of is None else "slide"

    @property
    def patients(self) -> pd.Index:
        """The row ids: patients, or slides when `unit` is slide."""
        return self.targets.index

    @property
    def genes(self) -> list[str]:
        return list(self.targets.columns)

    def averaged(self, model: str) -> pd.DataFrame:
        """Out-of-fold predictions averaged over repeats, rows × genes."""
        return pd.DataFrame(
            mean_over_repeats(self.predictions[model]), index=self.patients, columns=self.targets.columns
        )


# -- cross-validation ---------------------------------------------------------------------------


def evaluate_task(
    task: str,
    features: dict[str, pd.DataFrame],
    targets: pd.DataFrame,
    settings: EvaluationSettings = EvaluationSettings(),
    sites: pd.Series | None = None,
    patient_of: pd.Series | None = None,
) -> TaskResult:
    """Cross-validate every model on `targets` (rows × genes; mutation: 0/1) and compute per-gene metrics.

    features: model -> rows × features, the rows patients or, with `patient_of` (slide id -> patient id), slides,
    whose folds are then grouped by patient; sites: patient -> tissue source site (needed when group_by_site).
    """
    if task not in TASKS:
        raise EvaluationError(f"task must be one of {', '.join(TASKS)}, not '{task}'")
    started = time.perf_counter()
    arrays, targets = align(features, targets)
    y = targets.to_numpy(np.float64)
    if task == "mutation" and not np.isin(y[np.isfinite(y)], (0.0, 1.0)).all():
        raise EvaluationError("mutation targets must be 0 (not mutated), 1 (mutated) or missing")
    patients = targets.index if patient_of is None else pd.Index(patient_of.reindex(targets.index))
    if patients.hasnans:
        raise EvaluationError(f"no patient for slide(s) {', '.join(map(str, targets.index[patients.isna()][:5]))}")
    groups = patients.to_numpy()
    if settings.group_by_site:
        if sites is None or not patients.isin(sites.index).all():
            raise EvaluationError("group_by_site needs a site for every patient; give `sites` (patient id -> site)")
        groups = split_groups(groups, sites.loc[patients].to_numpy())
    labels = y if task == "mutation" and settings.stratify_mutations else None
    fold_of = make_splits(groups, settings.folds, settings.repeats, settings.seed, labels)
    factors = settings.penalties(task)
    runs = cross_validate(task, arrays, y, fold_of, factors)
    predictions = {name: np.stack([r.predictions for r in run]) for name, run in runs.items()}
    failed = {name: np.stack([r.failed for r in run]).sum(axis=(0, 1)) for name, run in runs.items()}
    notes = {f"{name}_failed_folds": int(f.sum()) for name, f in failed.items()}
    notes |= {f"{name}_unconverged_fits": sum(r.unconverged for r in run) for name, run in runs.items()}
    for name, count in notes.items():
        if count:
            log.warning("%s: %s = %d (see the per-gene tables)", task, name, count)
    penalties = {name: _median_penalty(np.stack([r.chosen for r in run]), factors) for name, run in runs.items()}
    unit = "patient" if patient_of is None else "slide"
    per_repeat, tables = metric_tables(task, predictions, targets, penalties, failed, settings, unit)
    seconds = time.perf_counter() - started
    return TaskResult(task, targets, fold_of, predictions, per_repeat, tables, seconds, notes, patient_of)


def metric_tables(
    task: str,
    predictions: dict[str, np.ndarray],
    targets: pd.DataFrame,
    penalties: dict[str, np.ndarray],
    failed: dict[str, np.ndarray],
    settings: EvaluationSettings,
    unit: str = "patient",
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, pd.DataFrame]]:
    """Per model: the per-repeat metrics and the per-gene table (with the CI or the q-values across genes)."""
    y = targets.to_numpy(np.float64)
    per_repeat = {name: repeat_metrics(task, p, y) for name, p in predictions.items()}
    tables = {
        name: gene_table(
            task, predictions[name], y, per_repeat[name], targets.columns, penalties[name], failed[name], unit
        )
        for name in predictions
    }
    if task == "mutation":
        for name, (low, high) in bootstrap_ci(predictions, targets, settings.bootstrap, settings.seed).items():
            tables[name]["ci_low"], tables[name]["ci_high"] = low, high
    else:
        for table in tables.values():
            table["q_value"] = bh(table["p_value"].to_numpy())
            table["significant"] = table["q_value"] < settings.fdr
    return per_repeat, tables


def by_patient(result: TaskResult, settings: EvaluationSettings) -> TaskResult:
    """A per-slide result seen per patient: each patient's prediction is the mean of its slides' out-of-fold
    predictions (its slides always share a fold), its metrics computed over patients."""
    if result.patient_of is None:
        return result
    patient = result.patient_of.reindex(result.patients).to_numpy()
    ids, row_of = np.unique(patient, return_inverse=True)
    share = np.zeros((len(ids), len(patient)))
    share[row_of, np.arange(len(patient))] = 1.0
    share /= share.sum(axis=1, keepdims=True)
    first = np.array([int(np.flatnonzero(row_of == i)[0]) for i in range(len(ids))])
    targets = result.targets.iloc[first].set_axis(pd.Index(ids, name="patient_id"))
    predictions = {name: np.einsum("ps,rsg->rpg", share, p) for name, p in result.predictions.items()}
    penalties = {name: table["penalty"].to_numpy() for name, table in result.tables.items()}
    failed = {name: table["failed_folds"].to_numpy() for name, table in result.tables.items()}
    per_repeat, tables = metric_tables(result.task, predictions, targets, penalties, failed, settings)
    fold_of = result.fold_of[:, first]
    return TaskResult(result.task, targets, fold_of, predictions, per_repeat, tables, 0.0, result.notes)


def align(features: dict[str, pd.DataFrame], targets: pd.DataFrame) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Feature arrays of every model and the targets, rows = the patients with targets, in the first model's order.

    Every model must have the same patients among those with targets (a paired comparison needs them).
    """
    if not features:
        raise EvaluationError("no feature tables given")
    for name, frame in {**features, "targets": targets}.items():
        if not frame.index.is_unique:
            raise EvaluationError(
                f"{name}: patient id(s) {', '.join(map(str, frame.index[frame.index.duplicated()].unique()[:5]))} repeat; give one row per patient"
            )
    first, *others = features
    patients = features[first].index[features[first].index.isin(targets.index)]
    for name in others:
        have = features[name].index[features[name].index.isin(targets.index)]
        missing, extra = patients.difference(have), have.difference(patients)
        if len(missing) or len(extra):
            raise EvaluationError(
                f"models '{first}' and '{name}' have different patients with targets: only '{first}' has {len(missing)} "
                f"({', '.join(map(str, missing[:5]))}), only '{name}' has {len(extra)} ({', '.join(map(str, extra[:5]))}); give every model the same patients"
            )
    if len(patients) < 2:
        raise EvaluationError(
            f"only {len(patients)} patient(s) have both features and targets (features e.g. {', '.join(map(str, features[first].index[:3]))}; targets e.g. {', '.join(map(str, targets.index[:3]))})"
        )
    return {name: frame.loc[patients].to_numpy() for name, frame in features.items()}, targets.loc[patients].astype(
        np.float64
    )


class RepeatFit(NamedTuple):
    """One model's fits in one repeat."""

    predictions: np.ndarray  # out-of-fold predictions or decision values [row, gene]
    chosen: np.ndarray  # index of the chosen penalty factor [fold, gene], -1 where not fitted
    failed: np.ndarray  # [fold, gene]: too few training rows, or one class only
    unconverged: int  # logistic fits that stopped at max_iter


def cross_validate(
    task: str, arrays: dict[str, np.ndarray], y: np.ndarray, fold_of: np.ndarray, factors: np.ndarray
) -> dict[str, list[RepeatFit]]:
    """Every model on every repeat of `fold_of`, serially on one BLAS thread, with a progress bar.

    One thread: these many small factorizations only slow down with more on 2 shared cores
    (400 × 400 Cholesky factorizations measured 3–10× slower with 2 BLAS threads), and two
    processes over repeats were no faster there either (benchmarks/bench_evaluate.py).
    """
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    runs: dict[str, list[RepeatFit]] = {name: [] for name in arrays}
    with threadpool_limits(1):
        for fold_row in tqdm(fold_of, desc=f"{task}, {len(arrays)} models", unit="repeat"):
            for name, x in arrays.items():
                runs[name].append(_fit_repeat(task, x, y, fold_row, factors))
    return runs


def _fit_repeat(task: str, x: np.ndarray, y: np.ndarray, fold_row: np.ndarray, factors: np.ndarray) -> RepeatFit:
    """One model, one repeat: per fold one Gram matrix, then per pattern of missing targets a ridge for all its genes or a logistic per gene."""
    folds = int(fold_row.max()) + 1
    predictions = np.full(y.shape, np.nan)
    chosen = np.full((folds, y.shape[1]), -1, np.int16)
    failed = np.zeros((folds, y.shape[1]), bool)
    unconverged = 0
    patterns = missing_patterns(y)
    for fold in range(folds):
        train, test = np.flatnonzero(fold_row != fold), np.flatnonzero(fold_row == fold)
        k, k_test = standardized_gram(x, train, test)
        for rows, genes in patterns:
            used = rows[train]
            target = y[train[used]][:, genes]
            fittable = fittable_columns(task, target)
            failed[fold, genes[~fittable]] = True
            if not fittable.any():
                continue
            kc, kc_test = center_gram(k[np.ix_(used, used)], k_test[:, used])
            if task == "expression":
                predictions[np.ix_(test, genes)], chosen[fold, genes] = ridge_loo(kc, kc_test, target, factors)
                continue
            for column in np.flatnonzero(fittable):
                predictions[test, genes[column]], chosen[fold, genes[column]], stopped = logistic_loo(
                    kc, kc_test, target[:, column] > 0, factors
                )
                unconverged += stopped
    predictions[np.isnan(y)] = np.nan
    return RepeatFit(predictions, chosen, failed, unconverged)


def fittable_columns(task: str, target: np.ndarray) -> np.ndarray:
    """Per column: enough training rows, and both classes for a mutation."""
    enough = np.full(target.shape[1], len(target) >= MIN_TRAIN_ROWS)
    if task == "mutation":
        positives = target.sum(axis=0)
        enough &= (positives > 0) & (positives < len(target))
    return enough


def missing_patterns(y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows with values, gene indices) for each distinct pattern of missing values among the columns of `y`."""
    patterns, group = np.unique(np.isfinite(y).T, axis=0, return_inverse=True)
    return [(pattern, np.flatnonzero(group.ravel() == i)) for i, pattern in enumerate(patterns)]


# -- metrics ------------------------------------------------------------------------------------


def repeat_metrics(task: str, predictions: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per repeat and gene: r and spearman (expression) or auroc (mutation); NaN where a fold failed."""
    if task == "expression":
        return {"r": pearson(predictions, y), "spearman": pearson(ranks(predictions, y), ranks(y, y))}
    return {"auroc": auroc(predictions, y)}


def gene_table(
    task: str,
    predictions: np.ndarray,
    y: np.ndarray,
    per_repeat: dict[str, np.ndarray],
    genes: pd.Index,
    penalty: np.ndarray,
    failed: np.ndarray,
    unit: str = "patient",
) -> pd.DataFrame:
    """Per-gene metrics of one model: rows with a value (column `patients` or `slides`), mean and std over repeats,
    the metric of the repeat-averaged prediction, and for expression its p-value."""
    known = np.isfinite(y)
    table = pd.DataFrame({"gene": genes, f"{unit}s": known.sum(axis=0)})
    if task == "mutation":
        table["positives"] = (np.where(known, y, 0) > 0).sum(axis=0)
    for metric, values in per_repeat.items():
        table[f"{metric}_mean"], table[f"{metric}_std"] = (
            mean_over_repeats(values),
            over_repeats(np.nanstd, values, ddof=1),
        )
    averaged = mean_over_repeats(predictions)
    if task == "expression":
        table["r_averaged"] = r = pearson(averaged, y)
        df = table[f"{unit}s"].to_numpy() - 2
        with np.errstate(invalid="ignore", divide="ignore"):
            table["p_value"] = stats.t.sf(r * np.sqrt(df / (1 - r**2)), df)  # one-sided: r > 0
    else:
        table["auroc_averaged"] = auroc(averaged, y)
    table["repeats_valid"] = np.isfinite(next(iter(per_repeat.values()))).sum(axis=0)
    table["failed_folds"] = failed
    table["penalty"] = penalty
    return table


def _median_penalty(chosen: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Median chosen penalty factor per gene over repeats and folds (NaN if never fitted)."""
    values = np.where(chosen >= 0, factors[np.maximum(chosen, 0)], np.nan)
    return over_repeats(np.nanmedian, values.reshape(-1, values.shape[-1]))


# -- comparison, summary, outputs ---------------------------------------------------------------


def compare(result: TaskResult, a: str, b: str) -> pd.DataFrame:
    """Per gene: model `a` vs `b` on the per-repeat metric (r or AUROC), paired over repeats.

    Wilcoxon signed-rank test of a − b over the repeats where both are finite (p = 1 when they
    never differ, NaN when no repeat is); BH q across the genes.
    """
    metric = METRIC[result.task]
    first, second = result.per_repeat[a][metric], result.per_repeat[b][metric]
    paired = np.isfinite(first) & np.isfinite(second)
    tests = [
        paired_test(second[paired[:, j], j], first[paired[:, j], j]) if paired[:, j].any() else (np.nan, np.nan)
        for j in range(first.shape[1])
    ]
    difference = np.where(paired, first - second, np.nan)
    table = pd.DataFrame(
        {
            "task": result.task,
            "gene": result.genes,
            "metric": metric,
            "model_a": a,
            "model_b": b,
            "mean_a": result.tables[a][f"{metric}_mean"].to_numpy(),
            "mean_b": result.tables[b][f"{metric}_mean"].to_numpy(),
            "mean_a_minus_b": mean_over_repeats(difference),
            "repeats_a_higher": (difference > 0).sum(axis=0),
            "repeats_b_higher": (difference < 0).sum(axis=0),
            "repeats_tied": (difference == 0).sum(axis=0),
            "wilcoxon_statistic": [t[0] for t in tests],
            "wilcoxon_p": [t[1] for t in tests],
        }
    )
    table["wilcoxon_q"] = bh(table["wilcoxon_p"].to_numpy())
    if result.task == "expression":
        table["significant_a"] = result.tables[a]["significant"].to_numpy()
        table["significant_b"] = result.tables[b]["significant"].to_numpy()
    else:  # a model predicts a mutation when the bootstrap CI of its AUROC lies above chance
        table["above_chance_a"] = (result.tables[a]["ci_low"] > 0.5).to_numpy()
        table["above_chance_b"] = (result.tables[b]["ci_low"] > 0.5).to_numpy()
    return table


def counts(comparison: pd.DataFrame, fdr: float) -> dict[str, Any]:
    """The paper's summary counts of one task's comparison.

    Expression: among genes significant (q < fdr) with either model; mutation: among genes whose AUROC CI lies above
    chance with either model (the others, which neither model predicts, are left out and counted as such).
    "higher": higher mean metric over repeats; "…_significant": and Wilcoxon q < fdr.
    """
    task = str(comparison["task"].iat[0])
    expression = task == "expression"
    kind = "significant" if expression else "above_chance"
    considered = comparison[f"{kind}_a"] | comparison[f"{kind}_b"]
    higher_a, higher_b = comparison["mean_a"] > comparison["mean_b"], comparison["mean_a"] < comparison["mean_b"]
    differs = comparison["wilcoxon_q"] < fdr
    out: dict[str, Any] = {
        "model_a": comparison["model_a"].iat[0],
        "model_b": comparison["model_b"].iat[0],
        "metric": METRIC[task],
        "genes": len(comparison),
    }
    out |= {
        f"{kind}_a": int(comparison[f"{kind}_a"].sum()),
        f"{kind}_b": int(comparison[f"{kind}_b"].sum()),
        f"{kind}_either": int(considered.sum()),
    }
    return out | {
        "higher_with_a": int((considered & higher_a).sum()),
        "higher_with_a_significant": int((considered & higher_a & differs).sum()),
        "higher_with_b": int((considered & higher_b).sum()),
        "higher_with_b_significant": int((considered & higher_b & differs).sum()),
        "not_compared": int((considered & ~higher_a & ~higher_b).sum()),  # equal means, or NaN
        "paper": PAPER[task],
    }


def run_evaluation(
    features: dict[str, pd.DataFrame],
    out_dir: Path,
    settings: EvaluationSettings = EvaluationSettings(),
    *,
    expression: pd.DataFrame | None = None,
    mutations: pd.DataFrame | None = None,
    sites: pd.Series | None = None,
    warnings: Sequence[str] = (),
    planted: Sequence[str] = (),
    patient_of: pd.Series | None = None,
) -> tuple[dict[str, Any], list[TaskResult]]:
    """Each task given, the comparison of `settings.compare`, every table and figure, and summary.json/.md in `out_dir`;
    `warnings` about the features (untrained weights) head the summary and every figure; for each `planted` gene
    (known to carry signal) the summary says which models recovered it. With `patient_of` (slide id -> patient id)
    the rows are slides (folds grouped by patient) and each result is also written and summarised per patient.

    Returns the summary (settings, and per task the rows, the paper's counts, failure counts and seconds) and the
    task results.
    """
    from pathwsi.predict.plots import plot_task

    bad = [name for name in features if not re.fullmatch(r"[A-Za-z0-9._-]+", name)]
    missing = [name for name in settings.compare if name not in features]
    if bad or missing or (expression is None and mutations is None):
        raise EvaluationError(
            f"evaluation needs model names of [A-Za-z0-9._-] (not {bad}), features of both compared models "
            f"(missing {missing} among {list(features)}), and expression and/or mutation targets"
        )
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "warnings": list(warnings),
        "unit": "patient" if patient_of is None else "slide",
        "settings": asdict(settings),
        "pathwsi_version": __version__,
        "tasks": {},
        "planted": [],
    }
    comparisons, repeats, results = [], [], []
    for task, targets in (("expression", expression), ("mutation", mutations)):
        if targets is None:
            continue
        result = evaluate_task(task, features, targets, settings, sites, patient_of)
        results.append(result)
        comparisons.append(compare(result, *settings.compare))
        repeats.append(long_repeats(result))
        write_task(result, out_dir)
        plot_task(result, comparisons[-1], out_dir, settings.fdr, warnings)
        summary["planted"] += recovered(result, planted)
        summary["tasks"][task] = {
            "rows": len(result.patients),
            **counts(comparisons[-1], settings.fdr),
            **result.notes,
            "seconds": round(result.seconds, 1),
        }
        if result.unit == "slide":
            per_patient = by_patient(result, settings)
            write_task(per_patient, out_dir, suffix="_by_patient")
            summary["planted"] += recovered(per_patient, planted)
            summary["tasks"][task]["by_patient"] = {
                "rows": len(per_patient.patients),
                **counts(compare(per_patient, *settings.compare), settings.fdr),
            }
    write_frame(pd.concat(comparisons, ignore_index=True), out_dir / "comparison.tsv", sep="\t")
    write_frame(pd.concat(repeats, ignore_index=True), out_dir / "repeats.tsv", sep="\t")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_json(summary, out_dir / "summary.json")
    write_text(summary_markdown(summary), out_dir / "summary.md")
    return summary, results


def write_task(result: TaskResult, out_dir: Path, suffix: str = "") -> None:
    """{task}_{model}{suffix}.tsv (per-gene metrics), {task}_{model}_oof{suffix}.tsv (out-of-fold predictions
    averaged over repeats, rows × genes) and {task}_splits{suffix}.tsv (each row's test fold per repeat)."""
    index = f"{result.unit}_id"
    for name, table in result.tables.items():
        write_frame(table, out_dir / f"{result.task}_{name}{suffix}.tsv", sep="\t")
        write_frame(
            result.averaged(name).rename_axis(index).reset_index(),
            out_dir / f"{result.task}_{name}_oof{suffix}.tsv",
            sep="\t",
        )
    write_splits(result.fold_of, result.patients, out_dir / f"{result.task}_splits{suffix}.tsv", index)


def long_repeats(result: TaskResult) -> pd.DataFrame:
    """One row per model, metric, repeat and gene: columns task, model, gene, repeat, metric, value."""
    parts = []
    for name, metrics in result.per_repeat.items():
        for metric, values in metrics.items():
            n_repeats, n_genes = values.shape
            parts.append(
                pd.DataFrame(
                    {
                        "task": result.task,
                        "model": name,
                        "gene": np.tile(result.genes, n_repeats),
                        "repeat": np.repeat(np.arange(n_repeats), n_genes),
                        "metric": metric,
                        "value": values.ravel(),
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


def recovered(result: TaskResult, planted: Sequence[str]) -> list[dict[str, Any]]:
    """Per planted gene of this task: the models that recover it (expression: significant, q < fdr; mutation: the
    AUROC's bootstrap CI above 0.5) and each model's mean metric."""
    metric = METRIC[result.task]
    rows = []
    for gene in (g for g in planted if g in set(result.genes)):
        by_model = {name: table.loc[table["gene"] == gene].iloc[0].to_dict() for name, table in result.tables.items()}
        hit = {
            name: bool(row["significant"]) if result.task == "expression" else bool(row["ci_low"] > 0.5)
            for name, row in by_model.items()
        }
        means = {name: round(float(row[f"{metric}_mean"]), 3) for name, row in by_model.items()}
        rows.append(
            {
                "task": result.task,
                "unit": result.unit,
                "gene": gene,
                "metric": metric,
                "recovered_by": [n for n, h in hit.items() if h],
                "mean": means,
            }
        )
    return rows


def summary_markdown(summary: dict[str, Any]) -> str:
    """The paper's counts in a few lines, for people."""
    settings = summary["settings"]
    fdr = settings["fdr"]
    lines = [
        "# Molecular prediction from image features",
        "",
        *(f"> **WARNING:** {warning}" for warning in summary.get("warnings", [])),
        *([""] if summary.get("warnings") else []),
        f"{settings['folds']}-fold cross-validation × {settings['repeats']} repeats, seed {settings['seed']}; significant: q < {fdr}.",
        UNIT_LINE[summary.get("unit", "patient")],
        "",
    ]
    for task, c in summary["tasks"].items():
        lines.append(f"## {task}: {c['rows']} {summary.get('unit', 'patient')}s, {c['genes']} genes")
        lines += _count_lines(task, c, fdr)
        if "by_patient" in c:
            lines.append(f"- per patient (the mean of its slides' predictions), {c['by_patient']['rows']} patients:")
            lines += ["  " + line for line in _count_lines(task, c["by_patient"], fdr)]
        lines += [f"- paper: {c['paper']}", ""]
    if summary.get("planted"):
        lines += ["## Planted signal: is it found?", ""]
        for row in summary["planted"]:
            means = ", ".join(f"{name} {value}" for name, value in row["mean"].items())
            found = f"recovered by {', '.join(row['recovered_by'])}" if row["recovered_by"] else "NOT recovered"
            lines.append(f"- {row['task']} {row['gene']} (per {row['unit']}): {found} (mean {row['metric']}: {means})")
        lines.append("")
    return "\n".join(lines)


def _count_lines(task: str, c: dict[str, Any], fdr: float) -> list[str]:
    """The counts of one task's comparison, as list items."""
    a, b = c["model_a"], c["model_b"]
    lines = []
    if task == "expression":
        lines.append(
            f"- significant (one-sided Pearson test, BH q < {fdr}): {a} {c['significant_a']}, {b} {c['significant_b']}, either {c['significant_either']}"
        )
    else:
        lines.append(
            f"- predicted above chance (bootstrap 95 % CI of the AUROC above 0.5): {a} {c['above_chance_a']}, {b} {c['above_chance_b']}, "
            f"either {c['above_chance_either']}; the other {c['genes'] - c['above_chance_either']} are not compared"
        )
    lines.append(
        f"- of those, higher mean {c['metric']} with {a}: {c['higher_with_a']} (Wilcoxon q < {fdr}: {c['higher_with_a_significant']}); with {b}: {c['higher_with_b']} ({c['higher_with_b_significant']})"
    )
    return lines
