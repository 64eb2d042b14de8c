"""Paper experiment 1: features, repeated cross-validation, paired comparison, outputs, untrained flags."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pathwsi.demo.labelled_tiles import CLASSES, write_tile_set
from pathwsi.features.backbones import ModelSpec, build_backbone, save_weights
from pathwsi.finetune.tissue_experiment import (
    ExperimentError,
    ExperimentSettings,
    confusion,
    fit_predict,
    model_flag,
    per_repeat_accuracy,
    repeated_splits,
    run_tissue_experiment,
    run_tissue_experiment_from_config,
    write_experiment_page,
)
from pathwsi.finetune.train import FinetuneSettings, StepSettings, finetune
from pathwsi.stats import paired_test

pytestmark = [
    pytest.mark.filterwarnings("ignore:model '.*' uses UNTRAINED weights"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_fitting_in_the_span_of_the_training_rows_changes_nothing():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 12)
    x = rng.standard_normal((48, 300)) + y[:, None] * rng.standard_normal(300) * 0.3
    train, test = np.arange(48) % 4 != 0, np.arange(48) % 4 == 0
    predicted, stopped = fit_predict(x[train], y[train], x[test], c=0.1, max_iter=1000)
    scaler = StandardScaler().fit(x[train])
    direct = LogisticRegression(C=0.1, max_iter=5000, tol=1e-8).fit(scaler.transform(x[train]), y[train])
    assert not stopped and np.array_equal(predicted, direct.predict(scaler.transform(x[test])))


def test_splits_are_seeded_stratified_and_cover_every_tile_once_per_repeat():
    labels = np.repeat(np.arange(3), 10)
    splits = repeated_splits(labels, folds=5, repeats=4, seed=1)
    assert len(splits) == 4 and all(len(repeat) == 5 for repeat in splits)
    for repeat in splits:
        tested = np.concatenate([test for _, test in repeat])
        assert sorted(tested) == list(range(30))
        assert all(np.bincount(labels[test], minlength=3).tolist() == [2, 2, 2] for _, test in repeat)
    again = repeated_splits(labels, folds=5, repeats=4, seed=1)
    assert all(np.array_equal(a[1], b[1]) for r, s in zip(splits, again) for a, b in zip(r, s))
    assert not np.array_equal(splits[0][0][1], splits[1][0][1])


def test_accuracy_confusion_and_paired_test():
    labels = np.array([0, 0, 1, 1])
    predictions = np.array([[0, 0, 1, 0], [0, 1, 1, 1]])
    accuracy = per_repeat_accuracy(predictions, labels, 2)
    assert accuracy.tolist() == [[0.75, 1.0, 0.5], [0.75, 0.5, 1.0]]
    assert confusion(predictions, labels, 2).tolist() == [[3, 1], [1, 3]]
    assert paired_test(np.ones(5), np.ones(5)) == (pytest.approx(np.nan, nan_ok=True), 1.0)
    statistic, p = paired_test(np.full(8, 0.5), np.linspace(0.6, 0.9, 8))
    assert p < 0.01


def test_settings_and_model_errors_are_clear(tmp_path):
    with pytest.raises(ExperimentError, match="unknown key.*fold"):
        ExperimentSettings.from_config({"tissue_experiment": {"fold": 5}, "seed": 0})
    config = {
        "models": {
            "allow_network": False,
            "backbones": {"imgnet": {"arch": "legacy_xception", "weights": "untrained"}},
        },
        "tissue_experiment": {"test_dir": str(tmp_path), "models": ["imgnet", "ftx"]},
        "seed": 0,
    }
    with pytest.raises(ExperimentError, match="ftx not in models.backbones"):
        run_tissue_experiment_from_config(config, out_dir=tmp_path / "out")


@pytest.fixture(scope="module")
def test_tiles(tmp_path_factory) -> Path:
    return write_tile_set(tmp_path_factory.mktemp("tiles") / "test", n_per_class=4, seed=2, tile_px=48)


def test_experiment_writes_tables_and_figure_and_flags_untrained_models(tmp_path, test_tiles):
    specs = [ModelSpec("a", input_px=48, seed=1), ModelSpec("b", input_px=48, seed=2)]
    settings = ExperimentSettings(folds=2, repeats=3, batch_size=16, num_workers=0)
    summary = run_tissue_experiment(specs, test_tiles, tmp_path, settings, device="cpu")
    accuracy = read_tsv(tmp_path / "accuracy.tsv")
    assert [(r["model"], r["class"]) for r in accuracy[:2]] == [("a", "overall"), ("a", "ADI")] and len(
        accuracy
    ) == 2 * (1 + len(CLASSES))
    assert all(r["flag"] == "untrained" and "UNTRAINED" in r["note"] for r in accuracy)
    assert 0 <= float(accuracy[0]["mean"]) <= 1 and float(accuracy[0]["std"]) >= 0
    comparison = read_tsv(tmp_path / "comparison.tsv")
    assert len(comparison) == 1 + len(CLASSES) and comparison[0]["model_a"] == "a" and comparison[0]["model_b"] == "b"
    assert 0 <= float(comparison[0]["wilcoxon_p"]) <= 1
    assert float(comparison[0]["mean_a_minus_b"]) == pytest.approx(
        float(comparison[0]["mean_a"]) - float(comparison[0]["mean_b"]), abs=1e-5
    )  # the same columns, and direction, as the predictors' comparison.tsv
    assert len(read_tsv(tmp_path / "repeats.tsv")) == 2 * 3
    counts = read_tsv(tmp_path / "confusion_b.tsv")
    corner = "true\\predicted (summed over 3 repeats)"  # says that the counts pool the repeats
    assert sum(int(v) for row in counts for k, v in row.items() if k != corner) == 3 * 4 * len(CLASSES)
    assert (tmp_path / "tissue_experiment.png").read_bytes()[:4] == b"\x89PNG"
    page = write_experiment_page(tmp_path).read_text()  # the tables as one page for the report
    assert "Every pair of models, paired over repeats" in page and page.count("<table") == 2 + len(summary["models"])
    assert summary["models"]["a"]["untrained"] is True and summary["tiles"]["ADI"] == 4
    with pytest.raises(ExperimentError, match="fewer than tissue_experiment.folds"):
        run_tissue_experiment(specs, test_tiles, tmp_path, replace(settings, folds=5), device="cpu")


def test_a_model_fine_tuned_from_untrained_weights_is_flagged(tmp_path):
    base = build_backbone(ModelSpec("imgnet", input_px=48))
    path = tmp_path / "ftx.safetensors"
    save_weights(base.net.state_dict(), path, {"untrained_base": True})
    flag, note = model_flag(build_backbone(ModelSpec("ftx", weights=str(path), input_px=48)))
    assert flag == "untrained_base" and "fine-tuned from UNTRAINED" in note
    save_weights(base.net.state_dict(), path, {"untrained_base": False})
    assert model_flag(build_backbone(ModelSpec("ftx", weights=str(path), input_px=48))) == ("", "")


@pytest.mark.slow
def test_fine_tuned_features_classify_held_out_tiles_clearly_better_than_untrained_ones(tmp_path):
    """What must hold even from untrained weights: fine-tuning on the synthetic classes helps."""
    px = 64
    train = write_tile_set(tmp_path / "train", n_per_class=24, seed=11, tile_px=px)
    test = write_tile_set(tmp_path / "test", n_per_class=16, seed=12, tile_px=px)
    base = ModelSpec("imgnet", input_px=px)
    settings = FinetuneSettings(
        batch_size=16,
        num_workers=0,
        step1=StepSettings(epochs=1, lr=1e-3),
        step2=StepSettings(
            epochs=4, lr=1e-3, optimizer="adam", schedule="cosine", unfreeze_from="block1", train_batchnorm=True
        ),
    )
    finetune(base, settings, train, None, tmp_path / "ftx.safetensors", tmp_path / "work", device="cpu", progress=False)
    ftx = ModelSpec("ftx", weights=str(tmp_path / "ftx.safetensors"), input_px=px)
    run_tissue_experiment(
        [ftx, base], test, tmp_path / "experiment", ExperimentSettings(repeats=5, num_workers=0), device="cpu", jobs=2
    )
    overall = {
        r["model"]: float(r["mean"])
        for r in read_tsv(tmp_path / "experiment" / "accuracy.tsv")
        if r["class"] == "overall"
    }
    row = next(r for r in read_tsv(tmp_path / "experiment" / "comparison.tsv") if r["class"] == "overall")
    assert overall["ftx"] >= overall["imgnet"] + 0.10, overall
    assert row["model_a"] == "ftx" and int(row["repeats_a_higher"]) == 5, row
