"""Gram-matrix ridge and logistic regression against scikit-learn and brute-force leave-one-out."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from pathwsi.predict.linear_models import (
    balanced_weights,
    center_gram,
    fit_logistic,
    logistic_loo,
    penalty_scale,
    ridge_loo,
    standardized_gram,
)

FACTORS = np.logspace(-2, 3, 11)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 50)) * rng.uniform(0.5, 3.0, 50) + rng.uniform(-2, 2, 50)
    x[:, 7] = 1.5  # a constant feature
    train, test = np.arange(60)[np.arange(60) % 5 != 0], np.arange(60)[np.arange(60) % 5 == 0]
    scaler = StandardScaler().fit(x[train])
    k, k_test = center_gram(*standardized_gram(x, train, test))
    return x, train, test, scaler.transform(x[train]), scaler.transform(x[test]), k, k_test


def test_gram_matrices_are_those_of_the_training_standardized_features(data):
    x, train, test, a, t, k, k_test = data
    assert np.allclose(k, a @ a.T) and np.allclose(k_test, t @ a.T)
    assert penalty_scale(k) == pytest.approx(49.0)  # the non-constant features
    subset = train[::2]  # re-centring on a subset equals centring those rows' features on their own mean
    sub, sub_test = center_gram(k[np.ix_(np.arange(0, len(train), 2), np.arange(0, len(train), 2))], k_test[:, ::2])
    mean = a[::2].mean(axis=0)
    assert (
        len(subset) == len(sub)
        and np.allclose(sub, (a[::2] - mean) @ (a[::2] - mean).T)
        and np.allclose(sub_test, (t - mean) @ (a[::2] - mean).T)
    )


def test_ridge_equals_scikit_learn_for_a_given_penalty(data):
    _, train, _, a, t, k, k_test = data
    y = np.random.default_rng(1).standard_normal((len(train), 4)) + a[:, :4] + 3.0
    for factor in (0.01, 1.0, 100.0):
        predicted, chosen = ridge_loo(k, k_test, y, np.array([factor]))
        expected = Ridge(alpha=factor * penalty_scale(k)).fit(a, y).predict(t)
        assert np.all(chosen == 0) and np.allclose(predicted, expected, atol=1e-8)


def test_ridge_penalty_choice_equals_brute_force_leave_one_out(data):
    _, train, _, a, _, k, k_test = data
    rng = np.random.default_rng(2)
    y = np.column_stack(
        [a[:, :3] @ rng.standard_normal(3) + rng.standard_normal(len(train)) * s for s in (0.1, 1.0, 3.0)]
        + [rng.standard_normal(len(train))]
    )
    _, chosen = ridge_loo(k, k_test, y, FACTORS)
    errors = np.zeros((len(FACTORS), y.shape[1]))
    for i, factor in enumerate(FACTORS):
        for row in range(len(train)):
            keep = np.arange(len(train)) != row
            fitted = Ridge(alpha=factor * penalty_scale(k)).fit(a[keep], y[keep])
            errors[i] += (fitted.predict(a[row : row + 1])[0] - y[row]) ** 2
    assert chosen.tolist() == np.argmin(errors, axis=0).tolist()
    assert len(set(chosen.tolist())) > 1  # the targets call for different penalties


@pytest.mark.parametrize("c", [1e-3, 1e-2, 0.3])
def test_logistic_equals_scikit_learn_balanced_logistic_regression(data, c):
    _, train, _, a, t, k, k_test = data
    y = a[:, 0] + 0.5 * a[:, 1] + np.random.default_rng(3).standard_normal(len(train)) > 0.9  # about a quarter positive
    fit = fit_logistic(k, y, c)
    expected = LogisticRegression(C=c, class_weight="balanced", tol=1e-12, max_iter=100_000).fit(a, y)
    assert fit.converged
    assert fit.intercept == pytest.approx(expected.intercept_[0], abs=1e-5)
    assert np.allclose(c * a.T @ fit.dual, expected.coef_[0], atol=1e-5)  # β = C·Aᵀ·dual
    assert np.allclose(fit.decision(k_test), expected.decision_function(t), atol=1e-5)


def test_logistic_converges_on_separable_data_and_warm_starts_to_the_same_fit(data):
    _, train, _, a, _, k, _ = data
    y = a[:, 0] > 0  # separable: only the penalty keeps β finite
    cold = fit_logistic(k, y, 10.0)
    warm = fit_logistic(k, y, 10.0, start=fit_logistic(k, y, 0.01))
    expected = LogisticRegression(C=10.0, class_weight="balanced", tol=1e-12, max_iter=100_000).fit(a, y)
    assert cold.converged and warm.converged
    assert np.allclose(cold.decision(k), expected.decision_function(a), atol=1e-4)
    assert np.allclose(warm.decision(k), cold.decision(k), atol=1e-5)


def test_approximate_leave_one_out_is_close_to_refitting(data):
    _, train, _, a, _, k, _ = data
    y = a[:, 0] - a[:, 2] + np.random.default_rng(4).standard_normal(len(train)) > 0
    c = 0.01
    fit = fit_logistic(k, y, c)
    weights = balanced_weights(y)  # ALO keeps the fold's class weights: so does the refit
    left_out = np.arange(0, len(y), 3)
    refit = np.array(
        [
            LogisticRegression(C=c, tol=1e-8, max_iter=10_000)
            .fit(a[np.arange(len(y)) != i], y[np.arange(len(y)) != i], sample_weight=weights[np.arange(len(y)) != i])
            .decision_function(a[i : i + 1])[0]
            for i in left_out
        ]
    )
    assert np.max(np.abs(fit.loo[left_out] - refit)) < 0.01 * np.ptp(refit)
    assert np.max(np.abs(fit.decision(k)[left_out] - refit)) > 0.05 * np.ptp(refit)  # leaving out matters


def test_logistic_penalty_choice_prefers_strong_penalties_for_noise(data):
    _, train, _, a, _, k, k_test = data
    rng = np.random.default_rng(5)
    signal = a[:, 0] + a[:, 1] + 0.3 * rng.standard_normal(len(train)) > 0
    noise = rng.random(len(train)) < 0.4
    factors = np.array([0.1, 1.0, 10.0, 100.0, 1000.0])
    _, strong_signal_choice, unconverged = logistic_loo(k, k_test, signal, factors)
    _, noise_choice, _ = logistic_loo(k, k_test, noise, factors)
    assert unconverged == 0 and strong_signal_choice < noise_choice
