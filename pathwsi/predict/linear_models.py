"""Penalised linear models for n ≪ d, fitted through the n × n Gram matrix of the standardized training rows.

Features are standardized with the training rows' mean and standard deviation (constant features
are left at 0); K = A·Aᵀ for the standardized training rows A, Kₜ = T·Aᵀ for the test rows T.
By the representer theorem an L2-penalised linear model with an unpenalised intercept has its
coefficients in the span of the training rows, so these two products are all a fit needs:
exact, and with no d × d or n × d work after them.

Penalties are relative (OUR choice): a factor times the scale s = trace(K)/n of the centred
Gram matrix (its mean eigenvalue; the number of non-constant features), so one grid suits any
feature dimension.
- ridge: α = factor · s, objective ‖y − b − Aβ‖² + α‖β‖² (scikit-learn's Ridge);
- logistic: C = 1 / (factor · s), objective C·Σᵢ wᵢ·logloss + ½‖β‖² with balanced class weights
  wᵢ = n / (2·n_class(yᵢ)) (scikit-learn's LogisticRegression(class_weight="balanced")).

Penalty choice per target (OUR choice): leave-one-out within the training rows, on the
features as standardized for the outer fold. Ridge: exact leave-one-out squared error from the
eigendecomposition of K (one decomposition serves every penalty and target). Logistic:
approximate leave-one-out (ALO, Rad & Maleki 2020: one Newton step from the full fit, exact
for quadratic losses and close for the logistic), class-weighted log loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_factor, cho_solve, lapack
from scipy.special import expit

EIGEN_FLOOR = 1e-10  # eigenvalues of K below this share of the largest are treated as 0 (rank ≤ n − 1)


def training_scale(x: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (1 for constant features) of rows `train` of `x`, in float64."""
    rows = np.asarray(x[train], dtype=np.float64)
    std = rows.std(axis=0)
    std[std == 0] = 1.0
    return rows.mean(axis=0), std


def standardized_gram(x: np.ndarray, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K (n, n), Kₜ (m, n)) of `x` standardized with the statistics of rows `train`, in float64."""
    mean, std = training_scale(x, train)
    rows = np.asarray(x[np.concatenate([train, test])], dtype=np.float64)
    rows -= mean
    rows /= std
    gram = rows @ rows[: len(train)].T
    return gram[: len(train)], gram[len(train) :]


def center_gram(k: np.ndarray, k_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K and Kₜ of the same features re-centred on these training rows' mean (a no-op when already centred)."""
    column = k.mean(axis=0)
    centred = k - column[None, :] - column[:, None] + column.mean()
    return centred, k_test - k_test.mean(axis=1, keepdims=True) - column[None, :] + column.mean()


def penalty_scale(k: np.ndarray) -> float:
    """trace(K)/n of a centred Gram matrix: the unit of the relative penalty factors."""
    return float(np.trace(k)) / len(k)


def ridge_loo(k: np.ndarray, k_test: np.ndarray, y: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge for every column of `y` (n, g), penalty per column by exact leave-one-out.

    k, k_test: centred Gram matrices. Returns test predictions (m, g) and the chosen index into `factors` (g,).
    """
    dual, intercept, chosen = ridge_dual(k, y, factors)
    return k_test @ dual + intercept, chosen


def ridge_dual(k: np.ndarray, y: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge for every column of `y` (n, g) on the centred Gram matrix `k`, penalty per column by exact
    leave-one-out: (dual coefficients a (n, g), intercepts (g,), chosen index into `factors` (g,)), so that
    a row with centred kernel row kₜ is predicted as kₜ·a + intercept."""
    values, vectors = np.linalg.eigh(k)
    keep = values > EIGEN_FLOOR * values.max()
    values, vectors = values[keep], vectors[:, keep]
    alphas = np.asarray(factors) * penalty_scale(k)
    mean = y.mean(axis=0)
    centred = y - mean
    projected = vectors.T @ centred  # (r, g)
    shrink = values[None, :] / (values[None, :] + alphas[:, None])  # (penalties, r)
    fitted = vectors @ (shrink[:, :, None] * projected[None]).transpose(1, 0, 2).reshape(
        len(values), -1
    )  # (n, penalties·g)
    leverage = 1.0 / len(k) + (vectors**2) @ shrink.T  # (n, penalties), the intercept's 1/n included
    residual = (np.tile(centred, len(alphas)) - fitted) / np.repeat(1.0 - leverage, y.shape[1], axis=1)
    errors = np.mean(residual**2, axis=0).reshape(len(alphas), y.shape[1])
    chosen = np.argmin(errors, axis=0)
    coefficients = projected / (values[:, None] + alphas[chosen][None, :])
    return vectors @ coefficients, mean, chosen


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """n / (2 · n_class) per row: scikit-learn's class_weight="balanced" for 0/1 labels."""
    positives = y.sum()
    return np.where(y, len(y) / (2.0 * positives), len(y) / (2.0 * (len(y) - positives)))


@dataclass(frozen=True)
class LogisticFit:
    """f(x) = intercept + C · Σᵢ dualᵢ · k(x, xᵢ); `loo` holds the ALO leave-one-out decision values."""

    intercept: float
    dual: np.ndarray
    c: float
    loo: np.ndarray
    iterations: int
    converged: bool

    def decision(self, k_rows: np.ndarray) -> np.ndarray:
        """Decision values of rows given their kernel against the training rows."""
        return self.intercept + self.c * (k_rows @ self.dual)


def fit_logistic(
    k: np.ndarray, y: np.ndarray, c: float, start: LogisticFit | None = None, tol: float = 1e-7, max_iter: int = 300
) -> LogisticFit:
    """L2 logistic regression with balanced class weights and an unpenalised intercept, by Newton's method in the dual.

    A Newton step is a weighted kernel ridge problem, solved with the Cholesky factor of
    M = I + C·√W·K·√W (W the logistic curvature). The factor is reused for further steps while
    they shrink f's change at least twofold each (chord steps: exact gradient, curvature of an
    earlier iterate) and refreshed otherwise; a halving line search keeps the objective falling.
    Converged when a step from a fresh factor moves f by less than tol·(1 + max|f|); that
    factor also gives the ALO leave-one-out values.
    """
    y = np.asarray(y, bool)
    weights = balanced_weights(y)
    intercept, dual = (start.intercept, start.dual) if start is not None else (0.0, np.zeros(len(y)))
    f = intercept + c * (k @ dual)
    objective = _objective(f, y, weights, c, k, dual)
    system: tuple[np.ndarray, tuple[np.ndarray, bool]] | None
    system, last_move = None, np.inf
    for iteration in range(1, max_iter + 1):
        fresh = system is None
        if system is None:
            system = _newton_system(f, weights, c, k)
        root_w, factor = system
        p, q = expit(f), expit(-f)
        target = root_w * f - weights * np.where(y, -q, p) / root_w  # √W·z, z the working response
        solved = cho_solve(factor, np.column_stack([target, root_w]), check_finite=False)
        u = solved[:, 1]
        new_intercept = float(u @ target / (root_w @ u))
        new_dual = root_w * (solved[:, 0] - new_intercept * u)
        new_f = new_intercept + c * (k @ new_dual)
        move = float(np.max(np.abs(new_f - f)))
        if move < tol * (1.0 + np.max(np.abs(f))):
            if fresh:
                return LogisticFit(intercept, dual, c, _alo(f, y, p, q, root_w, factor, u), iteration, True)
            system = None
            continue
        step = 1.0
        while (
            trial := _objective(f + step * (new_f - f), y, weights, c, k, dual + step * (new_dual - dual))
        ) > objective and step > 1e-6:
            step /= 2
        if step < 1.0 or move > 0.5 * last_move:
            system = None
        last_move = move * step
        intercept, dual, f, objective = (
            intercept + step * (new_intercept - intercept),
            dual + step * (new_dual - dual),
            f + step * (new_f - f),
            trial,
        )
    root_w, factor = _newton_system(f, weights, c, k)
    p, q = expit(f), expit(-f)
    return LogisticFit(
        intercept,
        dual,
        c,
        _alo(f, y, p, q, root_w, factor, cho_solve(factor, root_w, check_finite=False)),
        max_iter,
        False,
    )


def _objective(f: np.ndarray, y: np.ndarray, weights: np.ndarray, c: float, k: np.ndarray, dual: np.ndarray) -> float:
    """Σ wᵢ·logloss(yᵢ, fᵢ) + ‖β‖²/(2C), with ‖β‖² = C²·aᵀKa."""
    return float(weights @ (np.logaddexp(0.0, f) - y * f) + 0.5 * c * dual @ (k @ dual))


def _newton_system(
    f: np.ndarray, weights: np.ndarray, c: float, k: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, bool]]:
    """√W at f and the Cholesky factor of I + C·√W·K·√W."""
    f = np.clip(f, -500.0, 500.0)
    root_w = np.sqrt(weights * expit(f) * expit(-f))
    system = k * np.outer(root_w, c * root_w)
    system[np.diag_indices_from(system)] += 1.0
    return root_w, cho_factor(system, lower=True, overwrite_a=True, check_finite=False)


def _alo(
    f: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    q: np.ndarray,
    root_w: np.ndarray,
    factor: tuple[np.ndarray, bool],
    u: np.ndarray,
) -> np.ndarray:
    """ALO leave-one-out decision values: fᵢ + (ℓ′ᵢ/Wᵢ)·Hᵢᵢ/(1 − Hᵢᵢ), H the weighted hat matrix.

    With M = I + C·√W·K·√W, v = √W and u = M⁻¹v: Hᵢᵢ = 1 − (M⁻¹)ᵢᵢ + uᵢ²/(vᵀu).
    """
    inverse_factor, info = lapack.dtrtri(np.tril(factor[0]), lower=1)
    if info:
        raise np.linalg.LinAlgError(f"dtrtri failed with info={info}")
    diagonal = np.einsum("ij,ij->j", inverse_factor, inverse_factor)  # diag(M⁻¹) = column sums of L⁻¹ squared
    remaining = diagonal - u**2 / (root_w @ u)  # 1 − Hᵢᵢ
    return f + np.where(y, -1.0 / p, 1.0 / q) * (1.0 - remaining) / remaining


def logistic_loo(k: np.ndarray, k_test: np.ndarray, y: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Logistic decision values for the test rows with C chosen by ALO weighted log loss (`logistic_path`).

    Returns (test decision values, chosen factor index, unconverged fits).
    """
    fit, chosen, unconverged = logistic_path(k, y, factors)
    return fit.decision(k_test), chosen, unconverged


def logistic_path(k: np.ndarray, y: np.ndarray, factors: np.ndarray) -> tuple[LogisticFit, int, int]:
    """The logistic fit whose C is chosen by ALO weighted log loss, its factor index and the unconverged fits.

    k: centred Gram matrix; factors: relative penalties, fitted strongest first, each fit
    warm-started from the previous. The path stops at the first penalty whose loss is not
    lower than the previous one's (the loss is taken to be unimodal in the penalty): weak
    penalties cost the most Newton steps and would not be chosen.
    """
    y = np.asarray(y, bool)
    weights = balanced_weights(y)
    scale = penalty_scale(k)
    best: tuple[float, int, LogisticFit] | None = None
    unconverged = 0
    for index in np.argsort(factors)[::-1]:
        fit = fit_logistic(k, y, 1.0 / (factors[index] * scale), start=best[2] if best else None)
        unconverged += not fit.converged
        loss = float(weights @ (np.logaddexp(0.0, fit.loo) - y * fit.loo))
        if best is not None and loss >= best[0]:
            break
        best = (loss, int(index), fit)
    assert best is not None, "no penalty factors"  # the settings' penalty grids are checked to be non-empty
    return best[2], best[1], unconverged
