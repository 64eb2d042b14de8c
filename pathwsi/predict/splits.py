"""Repeated K-fold splits of patients, grouped (by patient or tissue source site) and optionally stratified.

A split set is a plain int array `fold_of[repeat, row]`: the fold (0..K-1) that row is tested in.
Every model is evaluated on the same split set, so models are compared pairwise per repeat.

Assignment (OUR choice): in each repeat the groups are shuffled by a numpy Generator made from
the seed, then taken largest first (group size plus, when stratifying, each label's share of
its positives) and each is put in the fold where it adds least to the squared fill of the
folds (rows, and each label's positives, each relative to its total). Without labels and with
one row per group this is a shuffled round robin: plain K-fold. With binary labels (one or
several columns; NaN counts as not positive) positives are spread evenly over the folds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pathwsi.errors import PathwsiError
from pathwsi.runtime.outputs import write_frame


class SplitError(PathwsiError, ValueError):
    """Patients, sites or folds that cannot be split as configured; the message says which and what to change."""


def split_groups(patients: np.ndarray, sites: np.ndarray | None = None) -> np.ndarray:
    """Group key of each row: its site when `sites` is given (each patient must have one site), else its patient."""
    patients = np.asarray(patients).astype(str)
    if sites is None:
        return patients
    sites = np.asarray(sites).astype(str)
    pairs = pd.DataFrame({"patient": patients, "site": sites}).drop_duplicates()
    split = pairs[pairs["patient"].duplicated(keep=False)]
    if len(split):
        raise SplitError(
            f"patient(s) {', '.join(split['patient'].unique()[:5])} have rows at more than one site; a patient must belong to one site to group by site"
        )
    return sites


def make_splits(
    groups: np.ndarray, folds: int = 5, repeats: int = 50, seed: int = 0, labels: np.ndarray | None = None
) -> np.ndarray:
    """`fold_of[repeat, row]` (int16): rows of one group share a fold; positives of each `labels` column are balanced."""
    keys, group_of = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    if len(keys) < folds:
        raise SplitError(
            f"{len(keys)} group(s) cannot fill {folds} folds; lower folds or group by patient instead of site"
        )
    load = _group_load(group_of, len(keys), labels)
    rng = np.random.default_rng(seed)
    fold_of = np.empty((repeats, len(group_of)), np.int16)
    for repeat in range(repeats):
        fold_of[repeat] = _assign(load, folds, rng)[group_of]
    return fold_of


def _group_load(group_of: np.ndarray, n_groups: int, labels: np.ndarray | None) -> np.ndarray:
    """(groups, 1 + labels): rows and positives per group, each divided by its total."""
    columns = np.ones((len(group_of), 1))
    if labels is not None:
        positive = np.nan_to_num(np.asarray(labels, float).reshape(len(group_of), -1)) > 0
        columns = np.hstack([columns, positive[:, positive.any(axis=0)]])
    load = np.zeros((n_groups, columns.shape[1]))
    np.add.at(load, group_of, columns)
    return load / load.sum(axis=0)


def _assign(load: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold of each group: shuffled, heaviest first, each into the fold it fills least (lowest index on ties)."""
    order = rng.permutation(len(load))
    order = order[np.argsort(-load[order].sum(axis=1), kind="stable")]
    filled = np.zeros((folds, load.shape[1]))
    fold = np.empty(len(load), np.int16)
    for group in order:
        best = int(np.argmin(filled @ load[group]))
        fold[group] = best
        filled[best] += load[group]
    return fold


def write_splits(fold_of: np.ndarray, ids: pd.Index, path: Path, index: str = "patient_id") -> None:
    """TSV, atomically: the ids' column `index` (patient_id or slide_id), then `repeat_0` … with each row's test fold."""
    columns = {index: np.asarray(ids).astype(str), **{f"repeat_{r}": fold_of[r] for r in range(len(fold_of))}}
    write_frame(pd.DataFrame(columns), Path(path), sep="\t")


def read_splits(path: Path) -> tuple[np.ndarray, pd.Index]:
    """`fold_of[repeat, row]` and the row ids of a file written by `write_splits`."""
    frame = pd.read_csv(path, sep="\t", dtype=str)
    frame = frame.set_index(frame.columns[0])
    return frame.to_numpy(np.int16).T.copy(), frame.index
