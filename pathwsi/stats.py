"""Statistics shared by the tissue experiment and the predictors: paired comparison of models over repeats,
Pearson r, ranks and AUROC over the known rows of each gene, Benjamini-Hochberg q-values, bootstrap CIs."""

from __future__ import annotations

import warnings
import zlib
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats


def paired_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Wilcoxon signed-rank statistic and two-sided p-value of b − a over repeats (p = 1 when they never differ)."""
    from scipy.stats import wilcoxon

    if np.allclose(a, b):
        return float("nan"), 1.0
    result = wilcoxon(b, a)
    return float(result.statistic), float(result.pvalue)


def pearson(values: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r over the rows where `y` is known, per gene (last axis); NaN if a value there is NaN or constant."""
    known = np.isfinite(y)
    count = known.sum(axis=0)
    v, t = np.where(known, values, 0.0), np.where(known, y, 0.0)
    v = np.where(known, v - v.sum(axis=-2, keepdims=True) / count, 0.0)
    t = np.where(known, t - t.sum(axis=0) / count, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (v * t).sum(axis=-2) / np.sqrt((v**2).sum(axis=-2) * (t**2).sum(axis=0))


def ranks(values: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Average ranks over the rows where `y` is known (NaN elsewhere); a NaN value there stays NaN."""
    ranked = stats.rankdata(np.where(np.isfinite(y), values, np.nan), axis=-2, nan_policy="omit")
    return np.where(np.isnan(values), np.nan, ranked)


def auroc(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUROC (ties count half) over the rows where `y` is known, per gene; NaN if a score there is NaN or one class only."""
    ranked = ranks(scores, y)
    positive = np.isfinite(y) & (y > 0)
    n_pos, n_neg = positive.sum(axis=0), (np.isfinite(y) & (y == 0)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(positive, ranked, 0.0).sum(axis=-2) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values of the finite p-values (NaN stays NaN)."""
    q = np.full(len(p), np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = stats.false_discovery_control(p[finite])
    return q


def bootstrap_ci(
    predictions: dict[str, np.ndarray], targets: pd.DataFrame, n: int, seed: int, level: float = 0.95
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per model and gene: percentile CI of the AUROC of the repeat-averaged scores, over stratified bootstraps of patients.

    Positives and negatives are resampled separately (so each resample has both); the resamples
    are the same for every model and are seeded by (seed, gene name).
    """
    averaged = {name: mean_over_repeats(p) for name, p in predictions.items()}
    out = {name: (np.full(targets.shape[1], np.nan), np.full(targets.shape[1], np.nan)) for name in predictions}
    for j, gene in enumerate(targets.columns):
        y = targets[gene].to_numpy()
        usable = np.isfinite(y) & np.all([np.isfinite(a[:, j]) for a in averaged.values()], axis=0)
        positives, negatives = np.flatnonzero(usable & (y == 1)), np.flatnonzero(usable & (y == 0))
        if not len(positives) or not len(negatives):
            continue
        rng = np.random.default_rng([seed, zlib.crc32(str(gene).encode())])
        rows = np.concatenate([rng.choice(positives, (len(positives), n)), rng.choice(negatives, (len(negatives), n))])
        labels = np.r_[np.ones(len(positives)), np.zeros(len(negatives))][:, None]
        for name, a in averaged.items():
            out[name][0][j], out[name][1][j] = np.quantile(
                auroc(a[rows, j], labels), [(1 - level) / 2, (1 + level) / 2]
            )
    return out


def mean_over_repeats(values: np.ndarray) -> np.ndarray:
    return over_repeats(np.nanmean, values)


def over_repeats(reduce: Any, values: np.ndarray, **kwargs: Any) -> np.ndarray:
    """A numpy nan-reduction over axis 0, NaN (without a warning) where every value is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return reduce(values, axis=0, **kwargs)
