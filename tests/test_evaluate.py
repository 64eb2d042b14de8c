"""Prediction experiments: planted and permuted targets, paired comparison, missing values, failed folds, outputs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from pathwsi.predict.evaluate import EvaluationSettings, align, compare, counts, evaluate_task, run_evaluation

N, D = 60, 50
SETTINGS = EvaluationSettings(folds=5, repeats=3, bootstrap=200, compare=("a", "b"))
IDS = pd.Index([f"TCGA-{i % 7:02d}-{i:04d}" for i in range(N)], name="patient_id")


@pytest.fixture(scope="module")
def cohort():
    """Features x, expression with 4 planted and 4 permuted genes, mutations with 2 planted and 2 permuted."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((N, 3))  # a planted low-rank signal, seen by the features and driving the targets
    x = latent @ rng.standard_normal((3, D)) + rng.standard_normal((N, D))
    weights = rng.standard_normal((3, 4))
    planted = latent @ (weights / np.linalg.norm(weights, axis=0)) + 0.5 * rng.standard_normal((N, 4))
    permuted = np.column_stack([rng.permutation(planted[:, j]) for j in range(4)])
    expression = pd.DataFrame(
        np.hstack([planted, permuted]), index=IDS, columns=[f"S{j}" for j in range(4)] + [f"N{j}" for j in range(4)]
    )
    liability = latent[:, :2] + 0.5 * rng.standard_normal((N, 2))
    mutated = (liability > np.quantile(liability, [0.6, 0.7], axis=0).diagonal()).astype(float)
    permuted_mutations = np.column_stack([rng.permutation(mutated[:, j]) for j in range(2)])
    mutations = pd.DataFrame(np.hstack([mutated, permuted_mutations]), index=IDS, columns=["M0", "M1", "R0", "R1"])
    return x, expression, mutations


def frames(*arrays: np.ndarray) -> dict[str, pd.DataFrame]:
    return {name: pd.DataFrame(values, index=IDS) for name, values in zip("ab", arrays)}


def test_planted_expression_is_recovered_and_permuted_is_not(cohort):
    x, expression, _ = cohort
    result = evaluate_task("expression", frames(x, x), expression, SETTINGS)
    table = result.tables["a"].set_index("gene")
    planted, permuted = table.loc[["S0", "S1", "S2", "S3"]], table.loc[["N0", "N1", "N2", "N3"]]
    assert (
        (planted["r_mean"] > 0.5).all()
        and (planted["spearman_mean"] > 0.4).all()
        and (planted["q_value"] < 1e-3).all()
        and planted["significant"].all()
    )
    assert (
        (permuted["r_mean"].abs() < 0.35).all()
        and abs(permuted["r_mean"].mean()) < 0.25
        and not permuted["significant"].any()
    )
    assert (permuted["q_value"] > 0.05).all()
    assert result.predictions["a"].shape == (3, N, 8) and np.isfinite(result.predictions["a"]).all()


def test_planted_mutation_is_recovered_and_permuted_is_not(cohort):
    x, _, mutations = cohort
    result = evaluate_task("mutation", frames(x, x), mutations, SETTINGS)
    table = result.tables["a"].set_index("gene")
    assert (table.loc[["M0", "M1"], "auroc_mean"] > 0.8).all()
    assert (table.loc[["M0", "M1"], "ci_low"] > 0.6).all()
    assert (table.loc[["R0", "R1"], "auroc_mean"].sub(0.5).abs() < 0.2).all()
    assert (table["ci_low"] < table["auroc_averaged"]).all() and (table["auroc_averaged"] < table["ci_high"]).all()
    positives = result.targets.to_numpy() == 1
    for row in result.fold_of:  # stratified: each fold gets its share of each mutation's positives
        assert all(np.ptp(np.bincount(row[positives[:, j]], minlength=5)) <= 1 for j in range(4))


def test_identical_models_get_identical_predictions_and_tie_everywhere(cohort):
    x, expression, mutations = cohort
    for task, targets in (("expression", expression), ("mutation", mutations)):
        result = evaluate_task(task, frames(x, x.copy()), targets, SETTINGS)
        assert np.array_equal(result.predictions["a"], result.predictions["b"], equal_nan=True)
        comparison = compare(result, "a", "b")
        assert (comparison["repeats_tied"] == 3).all() and (comparison["wilcoxon_p"] == 1.0).all()
        summary = counts(comparison, 0.05)
        assert summary["higher_with_a"] == summary["higher_with_b"] == 0


def test_a_noisier_copy_loses_the_comparison(cohort):
    x, expression, mutations = cohort
    noisy = x + 1.5 * np.random.default_rng(1).standard_normal(x.shape)
    settings = EvaluationSettings(folds=5, repeats=8, bootstrap=100, compare=("a", "b"))
    expression_result = evaluate_task("expression", frames(noisy, x), expression, settings)
    summary = counts(compare(expression_result, "a", "b"), settings.fdr)
    assert summary["significant_b"] == 4 and summary["significant_either"] >= 4
    assert (
        summary["higher_with_b"] >= 4
        and summary["higher_with_b_significant"] >= 3
        and summary["higher_with_a"] <= summary["significant_either"] - 4
    )
    assert summary["higher_with_a_significant"] == 0
    mutation_result = evaluate_task("mutation", frames(noisy, x), mutations[["M0", "M1"]], settings)
    comparison = compare(mutation_result, "a", "b")
    assert (comparison["mean_b"] > comparison["mean_a"]).all() and (comparison["repeats_b_higher"] >= 6).all()
    assert counts(comparison, settings.fdr)["higher_with_b"] == 2
    chance = evaluate_task(
        "mutation",
        frames(noisy, x),
        mutations[["M0"]].sample(frac=1, random_state=1).set_axis(mutations.index),
        settings,
    )
    left_out = counts(compare(chance, "a", "b"), settings.fdr)  # a permuted mutation: neither model predicts it
    assert left_out["above_chance_either"] == 0 and left_out["higher_with_a"] == left_out["higher_with_b"] == 0


def test_missing_targets_drop_those_patients_for_that_gene_only(cohort):
    x, expression, mutations = cohort
    gappy = expression.copy()
    gappy.iloc[:10, 0] = np.nan
    gappy.iloc[5:12, 1] = np.nan
    result = evaluate_task("expression", frames(x, x), gappy, SETTINGS)
    table = result.tables["a"].set_index("gene")
    assert (
        table.loc["S0", "patients"] == N - 10
        and table.loc["S1", "patients"] == N - 7
        and table.loc["S2", "patients"] == N
    )
    assert np.isnan(result.predictions["a"][:, :10, 0]).all() and np.isfinite(result.predictions["a"][:, 10:, 0]).all()
    assert (table.loc[["S0", "S1"], "r_mean"] > 0.5).all() and (table["failed_folds"] == 0).all()
    complete = evaluate_task("expression", frames(x, x), expression, SETTINGS).predictions["a"]
    assert np.allclose(result.predictions["a"][..., 2:], complete[..., 2:])  # the other genes are untouched
    gappy_mutations = mutations.copy()
    gappy_mutations.iloc[:6, 0] = np.nan
    mutation = evaluate_task("mutation", frames(x, x), gappy_mutations, SETTINGS).tables["a"].set_index("gene")
    assert mutation.loc["M0", "patients"] == N - 6 and mutation.loc["M0", "auroc_mean"] > 0.8


def test_a_training_fold_with_one_class_gives_nan_not_a_crash(cohort, caplog):
    x, _, mutations = cohort
    rng = np.random.default_rng(1)
    rare = mutations[["M0"]].copy()
    rare["ONE"] = 0.0
    rare.iloc[3, 1] = 1.0  # one positive: the fold that tests it trains on negatives only
    with caplog.at_level(logging.WARNING, logger="pathwsi.predict.evaluate"):
        result = evaluate_task("mutation", frames(x, x + rng.standard_normal(x.shape)), rare, SETTINGS)
    table = result.tables["a"].set_index("gene")
    assert (
        table.loc["ONE", "failed_folds"] == 3
        and table.loc["ONE", "repeats_valid"] == 0
        and np.isnan(table.loc["ONE", "auroc_mean"])
    )
    assert table.loc["M0", "failed_folds"] == 0 and table.loc["M0", "auroc_mean"] > 0.8
    assert "failed_folds" in caplog.text
    comparison = compare(result, "a", "b")
    assert np.isnan(comparison.set_index("gene").loc["ONE", "wilcoxon_p"])
    summary = counts(comparison, 0.05)  # ONE has no AUROC: left out, not counted for either model
    assert summary["above_chance_either"] == summary["genes"] - 1 and summary["not_compared"] == 0


def test_alignment_follows_patient_ids_and_rejects_mismatches(cohort):
    x, expression, _ = cohort
    shuffled = np.random.default_rng(2).permutation(N)
    features = {"a": pd.DataFrame(x, index=IDS).iloc[shuffled], "b": pd.DataFrame(x, index=IDS)}
    extra = pd.concat([expression, expression.iloc[:2].set_axis(["X1", "X2"])])
    arrays, targets = align(features, extra)
    assert targets.index.tolist() == IDS[shuffled].tolist() and np.array_equal(arrays["a"], arrays["b"])
    with pytest.raises(ValueError, match=r"'a' and 'b'.*TCGA-03-0003"):
        align({"a": features["a"], "b": features["b"].drop(IDS[3])}, expression)
    with pytest.raises(ValueError, match="repeat"):
        align({"a": pd.concat([features["a"], features["a"].iloc[:1]])}, expression)


def test_grouping_by_site_keeps_sites_within_folds(cohort):
    x, expression, _ = cohort
    sites = pd.Series([p.split("-")[1] for p in IDS], index=IDS)
    settings = EvaluationSettings(folds=5, repeats=3, group_by_site=True, compare=("a", "b"))
    result = evaluate_task("expression", frames(x, x), expression, settings, sites=sites)
    for row in result.fold_of:
        assert all(len(np.unique(row[(sites == s).to_numpy()])) == 1 for s in sites.unique())
    with pytest.raises(ValueError, match="site"):
        evaluate_task("expression", frames(x, x), expression, settings)


def test_run_evaluation_writes_tables_figures_and_summary(cohort, tmp_path):
    x, expression, mutations = cohort
    noisy = x + np.random.default_rng(1).standard_normal(x.shape)
    summary, results = run_evaluation(frames(x, noisy), tmp_path, SETTINGS, expression=expression, mutations=mutations)
    assert [r.task for r in results] == ["expression", "mutation"]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(
        [f"{task}_{m}{suffix}.tsv" for task in ("expression", "mutation") for m in "ab" for suffix in ("", "_oof")]
        + [
            "expression_splits.tsv",
            "mutation_splits.tsv",
            "comparison.tsv",
            "repeats.tsv",
            "summary.json",
            "summary.md",
            "expression_r_scatter.png",
            "mutation_roc.png",
            "mutation_auroc.png",
        ]
    )
    assert json.loads((tmp_path / "summary.json").read_text())["tasks"] == json.loads(json.dumps(summary["tasks"]))
    assert summary["tasks"]["expression"]["significant_either"] >= 4 and summary["tasks"]["mutation"]["genes"] == 4
    repeats = pd.read_csv(tmp_path / "repeats.tsv", sep="\t")
    assert list(repeats.columns) == ["task", "model", "gene", "repeat", "metric", "value"]
    assert len(repeats) == 2 * 3 * 8 * 2 + 2 * 3 * 4  # models × repeats × genes × (r, spearman) + the AUROCs
    comparison = pd.read_csv(tmp_path / "comparison.tsv", sep="\t")
    assert len(comparison) == 12 and set(comparison["metric"]) == {"r", "auroc"}
    oof = pd.read_csv(tmp_path / "mutation_a_oof.tsv", sep="\t", index_col="patient_id")
    assert oof.index.tolist() == IDS.tolist() and list(oof.columns) == ["M0", "M1", "R0", "R1"]
    assert (tmp_path / "mutation_roc.png").read_bytes()[:4] == b"\x89PNG"
    assert "higher mean r with a" in (tmp_path / "summary.md").read_text()
    with pytest.raises(ValueError, match="missing"):
        run_evaluation(frames(x, x), tmp_path, EvaluationSettings(), expression=expression)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="folds"):
        EvaluationSettings(folds=1)
    with pytest.raises(ValueError, match="penalty"):
        EvaluationSettings(ridge_penalties=())
    with pytest.raises(ValueError, match="compare"):
        EvaluationSettings(compare=("ftx", "ftx"))
