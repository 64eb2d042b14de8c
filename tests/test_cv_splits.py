"""Repeated K-fold splits: grouped, site-grouped, stratified, seeded, and saved as TSV."""

from __future__ import annotations

import numpy as np
import pytest

from pathwsi.predict.splits import make_splits, read_splits, split_groups, write_splits


def groups_of(sizes: list[int]) -> np.ndarray:
    return np.repeat([f"P{i}" for i in range(len(sizes))], sizes)


def test_rows_of_one_group_share_a_fold_and_folds_are_balanced():
    sizes = list(np.random.default_rng(0).integers(1, 4, 40))
    groups = groups_of(sizes)
    fold_of = make_splits(groups, folds=5, repeats=3, seed=1)
    assert fold_of.shape == (3, len(groups))
    for row in fold_of:
        for group in np.unique(groups):
            assert len(np.unique(row[groups == group])) == 1
        counts = np.bincount(row, minlength=5)
        assert counts.min() > 0 and counts.max() - counts.min() <= max(sizes)


def test_one_row_per_patient_is_plain_shuffled_k_fold():
    fold_of = make_splits(np.arange(60), folds=5, repeats=3, seed=0)
    assert all(np.bincount(row).tolist() == [12] * 5 for row in fold_of)
    assert not np.array_equal(fold_of[0], fold_of[1])  # each repeat reshuffles


def test_grouping_by_site_keeps_each_site_within_one_fold():
    rng = np.random.default_rng(3)
    patients = np.array([f"TCGA-{s:02d}-{i:04d}" for i, s in enumerate(rng.integers(0, 12, 90))])
    sites = np.array([p.split("-")[1] for p in patients])
    fold_of = make_splits(split_groups(patients, sites), folds=5, repeats=4, seed=0)
    for row in fold_of:
        for site in np.unique(sites):
            assert len(np.unique(row[sites == site])) == 1
    assert split_groups(patients).tolist() == patients.tolist()


def test_a_patient_at_two_sites_and_too_few_groups_are_errors():
    with pytest.raises(ValueError, match="P1"):
        split_groups(np.array(["P1", "P1", "P2"]), np.array(["A", "B", "B"]))
    with pytest.raises(ValueError, match="3 group"):
        make_splits(np.array(["a", "b", "c", "a"]), folds=5)


def test_splits_are_seeded():
    groups = groups_of([2] * 30)
    same = make_splits(groups, 5, 4, seed=7), make_splits(groups, 5, 4, seed=7)
    assert np.array_equal(*same)
    assert not np.array_equal(same[0], make_splits(groups, 5, 4, seed=8))


def test_stratification_spreads_the_positives_of_every_label_column():
    rng = np.random.default_rng(0)
    labels = np.zeros((60, 2))
    labels[rng.choice(60, 12, replace=False), 0] = 1
    labels[rng.choice(60, 7, replace=False), 1] = 1
    labels[5, 1] = np.nan  # unknown counts as not positive
    fold_of = make_splits(np.arange(60), folds=5, repeats=10, seed=0, labels=labels)
    for row in fold_of:
        assert set(np.bincount(row[labels[:, 0] == 1], minlength=5)) <= {2, 3}
        assert set(np.bincount(row[labels[:, 1] == 1], minlength=5)) <= {1, 2}
        assert set(np.bincount(row, minlength=5)) == {12}
    unstratified = make_splits(np.arange(60), folds=5, repeats=10, seed=0)
    assert any(np.bincount(row[labels[:, 1] == 1], minlength=5).min() == 0 for row in unstratified)


def test_splits_round_trip_through_tsv(tmp_path):
    ids = np.array([f"TCGA-05-{i:04d}" for i in range(20)])
    fold_of = make_splits(ids, folds=4, repeats=3, seed=2)
    write_splits(fold_of, ids, tmp_path / "splits.tsv")
    back, back_ids = read_splits(tmp_path / "splits.tsv")
    assert np.array_equal(back, fold_of) and back_ids.tolist() == ids.tolist()
    assert (tmp_path / "splits.tsv").read_text().splitlines()[0].split("\t") == [
        "patient_id",
        "repeat_0",
        "repeat_1",
        "repeat_2",
    ]
