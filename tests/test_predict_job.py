"""The prediction job on the demo's planted targets: planted genes recovered, permuted targets not."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pathwsi.demo.cohort import lymphocyte_densities
from pathwsi.demo.targets import NOISE_EXPRESSION, PLANTED_EXPRESSION, PLANTED_MUTATION, write_demo_targets
from pathwsi.predict.aggregate import AggregateOutputs
from pathwsi.predict.evaluate import EvaluationSettings
from pathwsi.predict.predict_job import CohortTargets, TargetSettings, run_predict_job
from pathwsi.predict.targets import TargetError
from pathwsi.runtime.outputs import write_table

N_FEATURES = 64
SLIDES_OF = {"P00": 3, "P01": 2}  # slides per patient; the others have one


def write_aggregate(
    folder: Path, density: dict[str, float], noise: dict[str, float], seed: int = 0, warnings: Sequence[str] = ()
) -> AggregateOutputs:
    """An aggregate folder whose features follow the lymphocyte density, per model with its noise: slide features
    (the patient's signal plus a little per-slide noise), patient features (the mean of its slides), slides.tsv
    and the provenance with `warnings`."""
    rng = np.random.default_rng(seed)
    patients = sorted(density)
    slides = [(f"{p}-DX{k + 1}", p) for p in patients for k in range(SLIDES_OF.get(p, 1))]
    d = np.array([density[p] for p in patients])
    loadings = rng.normal(size=N_FEATURES)
    outputs = AggregateOutputs(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for model, sd in noise.items():
        patient_values = d[:, None] * loadings[None, :] + rng.normal(0, sd, (len(d), N_FEATURES))
        row_of = {p: i for i, p in enumerate(patients)}
        slide_values = np.stack([patient_values[row_of[p]] + rng.normal(0, sd / 4, N_FEATURES) for _, p in slides])
        patient_values = np.stack(
            [slide_values[[i for i, (_, q) in enumerate(slides) if q == p]].mean(0) for p in patients]
        )
        for level, ids, values in (
            ("patients", patients, patient_values),
            ("slides", [s for s, _ in slides], slide_values),
        ):
            write_table(
                {
                    f"{level[:-1]}_id": np.array(ids),
                    **{f"mean_{i:04d}": values[:, i].astype(np.float32) for i in range(N_FEATURES)},
                },
                outputs.features(model, level),
            )
    pd.DataFrame(
        {
            "slide_id": [s for s, _ in slides],
            "patient_id": [p for _, p in slides],
            "status": "used",
            "reason": "",
            "n_tiles": 10,
        }
    ).to_csv(outputs.slides, sep="\t", index=False)
    outputs.provenance.write_text(json.dumps({"warnings": list(warnings)}))
    return outputs


@pytest.fixture
def cohort(tmp_path):
    density = {f"P{i:02d}": v for i, v in enumerate(lymphocyte_densities(40, seed=9))}
    expression, mutations = write_demo_targets(tmp_path / "targets", density)
    features = write_aggregate(tmp_path / "aggregate", density, {"ftx": 0.05, "imgnet": 0.4})
    return density, expression, mutations, features


def predict(features, expression, mutations, out_dir, sites=None, heatmaps=None, planted=(), **settings):
    config = {"folds": 5, "repeats": 3, "bootstrap": 100, **settings}
    tables = CohortTargets(str(expression), str(mutations) if mutations else None, planted=planted)
    return run_predict_job(
        features,
        ["ftx", "imgnet"],
        tables,
        TargetSettings(),
        EvaluationSettings.from_config({"predict": config, "seed": 1}),
        sites or {},
        out_dir,
        heatmaps,
    )


def test_planted_genes_are_recovered_and_noise_genes_are_not(cohort, tmp_path):
    _, expression, mutations, features = cohort
    out = tmp_path / "predict"
    summary = predict(features, expression, mutations, out)
    table = pd.read_csv(out / "expression_ftx.tsv", sep="\t").set_index("gene")
    strongest = list(PLANTED_EXPRESSION)[:3]
    assert (table.loc[strongest, "r_mean"] > 0.5).all()
    assert table.loc[strongest, "significant"].all()
    assert not table.loc[list(NOISE_EXPRESSION), "significant"].any()
    mutation = pd.read_csv(out / "mutation_ftx.tsv", sep="\t").set_index("gene")
    assert mutation.loc[PLANTED_MUTATION, "auroc_mean"] > 0.75
    assert summary["tasks"]["expression"]["higher_with_a"] >= 3  # ftx carries the signal with less noise
    for name in (
        "comparison.tsv",
        "repeats.tsv",
        "summary.md",
        "summary.html",
        "expression_r_scatter.png",
        "mutation_roc.png",
        "mutation_auroc.png",
        "targets.json",
    ):
        assert (out / name).is_file(), name


def test_permuted_targets_are_not_predicted(cohort, tmp_path):
    _, expression, mutations, features = cohort
    permuted = []
    for path in (expression, mutations):
        table = pd.read_csv(path, sep="\t")
        table["patient_id"] = np.random.default_rng(3).permutation(table["patient_id"].to_numpy())
        permuted.append(tmp_path / f"permuted_{path.name}")
        table.to_csv(permuted[-1], sep="\t", index=False)
    out = tmp_path / "permuted"
    predict(features, *permuted, out)
    table = pd.read_csv(out / "expression_ftx.tsv", sep="\t").set_index("gene")
    assert table["significant"].sum() == 0
    assert abs(table["r_mean"].mean()) < 0.2
    mutation = pd.read_csv(out / "mutation_ftx.tsv", sep="\t").set_index("gene")
    assert mutation.loc[PLANTED_MUTATION, "auroc_mean"] < 0.75


def test_mismatches_are_reported_not_fatal(cohort, tmp_path):
    density, expression, mutations, features = cohort
    table = pd.read_csv(expression, sep="\t")
    table = pd.concat([table.iloc[2:], table.iloc[:1].assign(patient_id="NO-SLIDES")])
    short = tmp_path / "short.tsv"
    table.drop(columns=["CD19"]).to_csv(short, sep="\t", index=False)
    out = tmp_path / "mismatch"
    predict(features, short, None, out)
    report = json.loads((out / "targets.json").read_text())["expression"]
    assert report["patients_with_features_but_no_targets"] == {"count": 2, "first": ["P00", "P01"]}
    assert report["patients_with_targets_but_no_features"]["first"] == ["NO-SLIDES"]
    assert "CD19" in report["genes_missing_from_table"]["first"]


def test_site_grouping_needs_every_site(cohort, tmp_path):
    density, expression, mutations, features = cohort
    with pytest.raises(ValueError, match="no 'site'"):
        predict(features, expression, None, tmp_path / "x", sites={"P00": "A"}, group_by_site=True)


def test_too_few_patients_is_a_clear_error(cohort, tmp_path):
    _, expression, mutations, features = cohort
    table = pd.read_csv(expression, sep="\t").iloc[:6]
    few = tmp_path / "few.tsv"
    table.to_csv(few, sep="\t", index=False)
    with pytest.raises(TargetError, match="only 6 patient"):
        predict(features, few, None, tmp_path / "y")


def test_the_features_warnings_head_the_summaries_the_figures_and_the_log(cohort, tmp_path, caplog):
    _, expression, mutations, features = cohort
    warning = "model 'ftx' was fine-tuned from UNTRAINED base weights: its features are for demos and tests only"
    out = tmp_path / "predict"
    density = {p: 0.5 for p in pd.read_csv(expression, sep="\t")["patient_id"]}
    features = write_aggregate(tmp_path / "warned", density, {"ftx": 0.05, "imgnet": 0.4}, warnings=[warning])
    predict(features, expression, mutations, out)
    assert (out / "summary.md").read_text().splitlines()[2] == f"> **WARNING:** {warning}"
    assert json.loads((out / "summary.json").read_text())["warnings"] == [warning]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"].count(warning) == 1
    plain = tmp_path / "plain"
    predict(cohort[3], expression, None, plain)
    assert "WARNING" not in (plain / "summary.md").read_text()
    figure, plain_figure = (Image.open(folder / "expression_r_scatter.png") for folder in (out, plain))
    assert figure.size[1] > plain_figure.size[1]  # the warning's lines sit above the plot


def test_the_summary_says_whether_each_planted_gene_is_recovered(cohort, tmp_path):
    _, expression, mutations, features = cohort
    out = tmp_path / "predict"
    planted = [*list(PLANTED_EXPRESSION)[:2], PLANTED_MUTATION, "FOXP3"]
    for unit in ("patient", "slide"):
        out = tmp_path / unit
        summary = predict(features, expression, mutations, out, planted=planted, unit=unit)
        found = {(row["gene"], row["unit"]): row["recovered_by"] for row in summary["planted"]}
        units = ["patient"] if unit == "patient" else ["slide", "patient"]  # per slide, and its mean per patient
        assert set(found) == {(gene, u) for gene in planted for u in units}
        for u in units:
            assert found[(list(PLANTED_EXPRESSION)[0], u)] and found[(PLANTED_MUTATION, u)]
            assert found[("FOXP3", u)] == []  # FOXP3: noise
        text = (out / "summary.md").read_text()
        assert "## Planted signal: is it found?" in text and f"- expression FOXP3 (per {unit}): NOT recovered" in text
        assert f"- mutation {PLANTED_MUTATION} (per {unit}): recovered by " in text


def test_the_scatter_names_at_most_the_best_significant_genes():
    from pathwsi.predict.plots import LABELLED, _labelled

    value = np.arange(50, dtype=float)
    chosen = value % 2 == 0
    picked = _labelled(chosen, value)
    assert len(picked) == LABELLED and chosen[picked].all() and list(picked) == sorted(picked, reverse=True)
