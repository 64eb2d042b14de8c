"""Paper experiment 1: how well each model's features classify tissue (CRC-VAL-HE-7K layout).

Features of every tile of a labelled test folder are computed with every configured model
(tiles are read once; each batch goes through all models). Then repeated stratified K-fold
cross-validation (default 5 folds × 50 repeats, seeded) with a linear classifier: the same
splits for every model, so models are compared pairwise per repeat.

Classifier (OUR choice; the paper names only "a linear classifier"): scikit-learn
LogisticRegression (multinomial, L2, lbfgs) on features standardized with the training
fold's mean and standard deviation, C = 0.1 by default: moderate regularization for 2048
standardized features, fixed rather than tuned so that no model gets a nested search the
other lacks. When a fold has fewer training tiles than features, the fit is done on the
coordinates of the training tiles' span (an SVD), which gives exactly the same
L2-penalized solution much faster.

Outputs in `out_dir`: accuracy.tsv (model, class incl. "overall", mean, std over repeats,
with `flag` and `note` columns that flag untrained models and models
fine-tuned from untrained weights), comparison.tsv (every
pair of models, overall and per class: mean difference, repeats won, paired Wilcoxon
signed-rank test), confusion_<model>.tsv (counts summed over repeats), repeats.tsv (one
row per model × repeat), tissue_experiment.png, and summary.json (model provenance,
settings, counts); `write_experiment_page` then adds tables.html (the accuracy, comparison and
confusion tables as one page, for the Snakemake report).

Only feature extraction needs torch, and it is imported there: the cross-validation worker
processes import this module and should not pay for torch (seconds each).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, fields
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathwsi import __version__
from pathwsi.errors import PathwsiError
from pathwsi.runtime.gpu_claim import GpuSettings, claimed_device
from pathwsi.runtime.outputs import atomic_path, write_json, write_text
from pathwsi.runtime.report_page import write_tables_page
from pathwsi.stats import paired_test

if TYPE_CHECKING:
    import torch

    from pathwsi.features.backbones import Backbone, ModelSpec
    from pathwsi.finetune.train import LabelledTiles

log = logging.getLogger(__name__)
OVERALL = "overall"
FIGURE = "tissue_experiment.png"
TABLES_PAGE = "tables.html"  # accuracy, comparison and confusion tables as one page for the Snakemake report


class ExperimentError(PathwsiError):
    """A problem with the experiment's settings or test tiles; the message says what to do."""


@dataclass(frozen=True)
class ExperimentSettings:
    """Config section `tissue_experiment` (test_dir and models are read elsewhere) plus the top-level seed."""

    folds: int = 5  # paper: 5-fold cross-validation
    repeats: int = 50  # paper: repeated 50 times
    batch_size: int = 32
    num_workers: int = 2  # image-loading processes; does not change the result
    C: float = 0.1  # inverse L2 strength of the logistic regression (our default, not the paper's)
    max_iter: int = 1000  # lbfgs iterations per fit; fits that stop there are counted in summary.json
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2 or self.repeats < 1 or self.C <= 0 or self.batch_size < 1 or self.max_iter < 1:
            raise ExperimentError(
                f"tissue_experiment: folds >= 2, repeats >= 1, C > 0, batch_size >= 1 and max_iter >= 1 are required (got {self})"
            )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ExperimentSettings:
        section = {k: v for k, v in config["tissue_experiment"].items() if k not in ("test_dir", "models")}
        unknown = sorted(set(section) - {f.name for f in fields(cls)})
        if unknown:
            raise ExperimentError(f"tissue_experiment: unknown key(s) {', '.join(unknown)}")
        return cls(**section, seed=config.get("seed", 0))


def run_tissue_experiment(
    specs: list[ModelSpec],
    test_dir: Path,
    out_dir: Path,
    settings: ExperimentSettings = ExperimentSettings(),
    *,
    allow_network: bool = False,
    device: str | torch.device = "auto",
    jobs: int = 1,
) -> dict[str, Any]:
    """Features of `test_dir` with every model, repeated cross-validation, tables and figure in `out_dir`.

    jobs: processes for the cross-validation fits (repeats run in parallel).
    Returns the summary written to `out_dir/summary.json`.
    """
    from pathwsi.features.backbones import build_backbone, resolve_device
    from pathwsi.finetune.train import scan_tile_folder

    started = time.perf_counter()
    if len({s.name for s in specs}) != len(specs) or not specs:
        raise ExperimentError(
            f"tissue_experiment.models: give one or more distinct model names (got {[s.name for s in specs]})"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles = scan_tile_folder(test_dir)
    labels = np.asarray(tiles.labels)
    smallest = min(tiles.counts().items(), key=lambda item: item[1])
    if smallest[1] < settings.folds:
        raise ExperimentError(
            f"class '{smallest[0]}' of '{test_dir}' has {smallest[1]} tiles, fewer than tissue_experiment.folds ({settings.folds}); add tiles or lower folds"
        )
    device = resolve_device(device)
    backbones = [build_backbone(spec, allow_network=allow_network, device=device) for spec in specs]
    features = extract_features(backbones, tiles, settings, device)
    splits = repeated_splits(labels, settings.folds, settings.repeats, settings.seed)
    results: dict[str, dict[str, Any]] = {}
    for backbone in backbones:
        name = backbone.spec.name
        fit_started = time.perf_counter()
        predictions, unconverged = cross_validate(features[name], labels, splits, settings, jobs)
        results[name] = {
            "predictions": predictions,
            "unconverged": unconverged,
            "seconds": time.perf_counter() - fit_started,
        }
        log.info("%s: %d folds fitted in %.1f s", name, len(splits) * settings.folds, results[name]["seconds"])
        if unconverged:
            log.warning(
                "%s: %d of %d fits stopped at max_iter=%d before converging",
                name,
                unconverged,
                settings.repeats * settings.folds,
                settings.max_iter,
            )
    notes = {b.spec.name: model_flag(b) for b in backbones}
    accuracy = {name: per_repeat_accuracy(r["predictions"], labels, len(tiles.classes)) for name, r in results.items()}
    _write_accuracy(out_dir / "accuracy.tsv", accuracy, tiles.classes, notes)
    _write_repeats(out_dir / "repeats.tsv", accuracy, tiles.classes, notes)
    _write_comparison(out_dir / "comparison.tsv", accuracy, tiles.classes)
    confusions = {name: confusion(r["predictions"], labels, len(tiles.classes)) for name, r in results.items()}
    for name, counts in confusions.items():
        _write_confusion(out_dir / f"confusion_{name}.tsv", counts, tiles.classes, settings.repeats)
    plot(out_dir / FIGURE, accuracy, confusions, tiles.classes, notes)
    summary = {
        "test_dir": str(test_dir),
        "classes": list(tiles.classes),
        "tiles": tiles.counts(),
        "settings": asdict(settings),
        "models": {
            b.spec.name: {
                **b.provenance(),
                "flag": notes[b.spec.name][0],
                "note": notes[b.spec.name][1],
                "unconverged_fits": results[b.spec.name]["unconverged"],
            }
            for b in backbones
        },
        "overall_accuracy": {
            name: {"mean": float(a[:, 0].mean()), "std": float(a[:, 0].std(ddof=1)) if len(a) > 1 else 0.0}
            for name, a in accuracy.items()
        },
        "pathwsi_version": __version__,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(summary, out_dir / "summary.json")
    return summary


def write_experiment_page(out_dir: Path) -> Path:
    """tables.html: the accuracy, comparison and confusion tables that a run wrote in `out_dir`, as one page for the
    Snakemake report. Its own step (rule tissue_experiment_page), so that a run made before the page existed keeps
    its experiment."""
    summary = json.loads((out_dir / "summary.json").read_text())
    repeats = summary["settings"]["repeats"]
    tables = {"Accuracy per model and class (mean over repeats)": out_dir / "accuracy.tsv"}
    tables["Every pair of models, paired over repeats"] = out_dir / "comparison.tsv"
    tables |= {
        f"Confusion, {name} (summed over {repeats} repeats)": out_dir / f"confusion_{name}.tsv"
        for name in summary["models"]
    }
    write_tables_page(tables, "Tissue classification (paper experiment 1)", out_dir / TABLES_PAGE)
    return out_dir / TABLES_PAGE


def extract_features(
    backbones: list[Backbone], tiles: LabelledTiles, settings: ExperimentSettings, device: torch.device
) -> dict[str, np.ndarray]:
    """(N, D) float32 features per model; tiles are read once and each batch goes through every model."""
    import torch

    from pathwsi.features.backbones import PRECISIONS
    from pathwsi.finetune.train import TileDataset, autocast

    sizes = {b.spec.input_px for b in backbones}
    dataset = TileDataset(tiles, max(sizes))  # each model's prepare() resizes to its own input size
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=settings.batch_size, num_workers=settings.num_workers, pin_memory=device.type == "cuda"
    )
    out: dict[str, list[np.ndarray]] = {b.spec.name: [] for b in backbones}
    for backbone in backbones:
        backbone.net.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for batch, _ in loader:
            batch = batch.to(device, non_blocking=True)
            for backbone in backbones:
                with autocast(device, PRECISIONS[backbone.spec.precision]):
                    out[backbone.spec.name].append(backbone.net(backbone.prepare(batch)).float().cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def repeated_splits(
    labels: np.ndarray, folds: int, repeats: int, seed: int
) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """For each repeat, its `folds` stratified (train, test) index pairs; seeded, shared by every model."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    pairs = list(splitter.split(np.zeros(len(labels)), labels))
    return [pairs[r * folds : (r + 1) * folds] for r in range(repeats)]


def cross_validate(
    features: np.ndarray,
    labels: np.ndarray,
    splits: list[list[tuple[np.ndarray, np.ndarray]]],
    settings: ExperimentSettings,
    jobs: int = 1,
) -> tuple[np.ndarray, int]:
    """Out-of-fold predictions, shape (repeats, N), and how many fits did not converge."""
    from joblib import Parallel, delayed

    x = features.astype(np.float64)
    done = Parallel(n_jobs=jobs)(
        delayed(_one_repeat)(x, labels, repeat, settings.C, settings.max_iter) for repeat in splits
    )
    return np.stack([p for p, _ in done]), sum(u for _, u in done)


def _one_repeat(
    x: np.ndarray, labels: np.ndarray, repeat: list[tuple[np.ndarray, np.ndarray]], c: float, max_iter: int
) -> tuple[np.ndarray, int]:
    """One repeat's folds, on one BLAS thread: these small problems only slow down with more (measured 8×)."""
    from threadpoolctl import threadpool_limits

    predictions, unconverged = np.empty(len(labels), np.int64), 0
    with threadpool_limits(1):
        for train, test in repeat:
            predictions[test], stopped = fit_predict(x[train], labels[train], x[test], c, max_iter)
            unconverged += stopped
    return predictions, unconverged


def fit_predict(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, c: float, max_iter: int
) -> tuple[np.ndarray, bool]:
    """Standardize on the training rows, fit the L2 logistic regression, predict the test rows."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean, std = train_x.mean(0), train_x.std(0)
    std[std == 0] = 1.0
    a, b = (train_x - mean) / std, (test_x - mean) / std
    if a.shape[0] < a.shape[1]:  # the penalized optimum lies in the span of the training rows: fit there
        basis = np.linalg.svd(a, full_matrices=False)[2]
        a, b = a @ basis.T, b @ basis.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(C=c, max_iter=max_iter).fit(a, train_y)
    return model.predict(b), bool(np.max(model.n_iter_) >= max_iter)


def per_repeat_accuracy(predictions: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(repeats, 1 + classes): overall accuracy, then each class's accuracy (recall)."""
    right = predictions == labels[None, :]
    per_class = [right[:, labels == k].mean(axis=1) for k in range(n_classes)]
    return np.column_stack([right.mean(axis=1), *per_class])


def confusion(predictions: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [true, predicted] summed over repeats."""
    counts = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(counts, (np.broadcast_to(labels, predictions.shape), predictions), 1)
    return counts


def model_flag(backbone: Backbone) -> tuple[str, str]:
    """("untrained" or "untrained_base", warning) for features that mean nothing outside demos and tests; else ("", "")."""
    provenance = backbone.provenance()
    if provenance["untrained"]:
        return "untrained", provenance["warning"]
    if provenance.get("untrained_base"):
        return "untrained_base", provenance["warning"]
    return "", ""


# -- tables and figure ----------------------------------------------------------------------------


def _write_tsv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    def cell(value: Any) -> str:
        return f"{value:.6g}" if isinstance(value, float) else str(value)

    write_text("\n".join(["\t".join(header)] + ["\t".join(cell(v) for v in row) for row in rows]) + "\n", path)


def _std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _write_accuracy(
    path: Path, accuracy: dict[str, np.ndarray], classes: tuple[str, ...], notes: dict[str, tuple[str, str]]
) -> None:
    rows = [
        [name, label, float(a[:, j].mean()), _std(a[:, j]), len(a), *notes[name]]
        for name, a in accuracy.items()
        for j, label in enumerate((OVERALL, *classes))
    ]
    _write_tsv(path, ["model", "class", "mean", "std", "repeats", "flag", "note"], rows)


def _write_repeats(
    path: Path, accuracy: dict[str, np.ndarray], classes: tuple[str, ...], notes: dict[str, tuple[str, str]]
) -> None:
    rows = [[name, r, *(float(v) for v in a[r]), notes[name][0]] for name, a in accuracy.items() for r in range(len(a))]
    _write_tsv(path, ["model", "repeat", OVERALL, *classes, "flag"], rows)


def _write_comparison(path: Path, accuracy: dict[str, np.ndarray], classes: tuple[str, ...]) -> None:
    rows = []
    for first, second in combinations(accuracy, 2):
        a, b = accuracy[first], accuracy[second]
        for j, label in enumerate((OVERALL, *classes)):
            statistic, p = paired_test(a[:, j], b[:, j])
            diff = a[:, j] - b[:, j]  # a − b, as in the predictors' comparison.tsv
            rows.append(
                [
                    first,
                    second,
                    label,
                    float(a[:, j].mean()),
                    float(b[:, j].mean()),
                    float(diff.mean()),
                    int((diff > 0).sum()),
                    int((diff < 0).sum()),
                    int((diff == 0).sum()),
                    statistic,
                    p,
                ]
            )
    _write_tsv(
        path,
        [
            "model_a",
            "model_b",
            "class",
            "mean_a",
            "mean_b",
            "mean_a_minus_b",
            "repeats_a_higher",
            "repeats_b_higher",
            "repeats_tied",
            "wilcoxon_statistic",
            "wilcoxon_p",
        ],
        rows,
    )


def _write_confusion(path: Path, counts: np.ndarray, classes: tuple[str, ...], repeats: int) -> None:
    corner = f"true\\predicted (summed over {repeats} repeats)"  # every tile is predicted once per repeat
    _write_tsv(path, [corner, *classes], [[label, *row.tolist()] for label, row in zip(classes, counts)])


def plot(
    path: Path,
    accuracy: dict[str, np.ndarray],
    confusions: dict[str, np.ndarray],
    classes: tuple[str, ...],
    notes: dict[str, tuple[str, str]],
) -> None:
    """Per-class accuracy bars (mean ± std over repeats) per model, and each model's row-normalized confusion matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(accuracy)
    labels = [OVERALL, *classes]
    tags = {
        name: {"untrained": " (UNTRAINED)", "untrained_base": " (from UNTRAINED)"}.get(notes[name][0], "")
        for name in names
    }
    figure = plt.figure(figsize=(max(10, 1.1 * len(labels)), 4 + 4 * ((len(names) + 2) // 3)), layout="constrained")
    grid = figure.add_gridspec(1 + (len(names) + 2) // 3, 3)
    bars = figure.add_subplot(grid[0, :])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        a = accuracy[name]
        stds = [_std(a[:, j]) for j in range(len(labels))]
        bars.bar(
            np.arange(len(labels)) + (i - (len(names) - 1) / 2) * width,
            a.mean(axis=0),
            width,
            yerr=stds,
            capsize=2,
            label=name + tags[name],
        )
    repeats = len(next(iter(accuracy.values())))
    bars.set_xticks(np.arange(len(labels)), labels)
    bars.set_ylabel(f"accuracy (mean ± std, {repeats} repeats)")
    spread = {name: a.std(axis=0, ddof=1 if repeats > 1 else 0) for name, a in accuracy.items()}
    low = min(float((a.mean(axis=0) - spread[name]).min()) for name, a in accuracy.items())
    tops = np.max([a.mean(axis=0) + spread[name] for name, a in accuracy.items()], axis=0)  # per class
    bars.set_ylim(max(0.0, low - 0.1), float(tops.max()) + 0.06)  # whole error bars, and room for the p-values
    if len(names) >= 2:  # the first pair, paired over repeats (comparison.tsv has every pair)
        first, second = accuracy[names[0]], accuracy[names[1]]
        for j in range(len(labels)):
            _, p = paired_test(first[:, j], second[:, j])
            bars.text(j, float(tops[j]) + 0.01, f"p={p:.2g}", ha="center", va="bottom", fontsize=7)
        bars.set_title(f"{names[0]} vs {names[1]}: Wilcoxon signed-rank p over repeats, per class", fontsize=9)
    bars.legend(loc="lower left")
    for i, name in enumerate(names):
        ax = figure.add_subplot(grid[1 + i // 3, i % 3])
        counts = confusions[name]
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        for (row, col), value in np.ndenumerate(share):
            if value >= 0.01:
                ax.text(
                    col,
                    row,
                    f"{100 * value:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > 0.5 else "black",
                )
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}{tags[name]}\n% of true class, {repeats} repeats pooled", fontsize=9)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


# -- config entry point -------------------------------------------------------------------------


def run_tissue_experiment_from_config(
    config: dict[str, Any],
    *,
    out_dir: Path = Path("results/tissue_experiment"),
    test_dir: Path | None = None,
    models: list[str] | None = None,
    device: str = "auto",
    jobs: int = 1,
    gpus: GpuSettings | None = None,
) -> dict[str, Any]:
    """`pathwsi tissue-experiment` and rule `tissue_experiment`.

    config: a validated config (sections models, tissue_experiment, seed); test_dir and
    models override tissue_experiment.test_dir and tissue_experiment.models. On CUDA the run claims
    a GPU of its own for its lifetime (gpus: how; default the config's `gpus` section).
    """
    from pathwsi.features.backbones import resolve_device, specs_from_config

    section = config["tissue_experiment"]
    specs = specs_from_config(config["models"])
    names = list(models or section["models"])
    missing = [n for n in names if n not in specs]
    if missing:
        raise ExperimentError(
            f"tissue_experiment.models: {', '.join(missing)} not in models.backbones ({', '.join(specs)})"
        )
    gpu_settings = gpus or GpuSettings.from_config(config)
    with claimed_device(resolve_device(device), gpu_settings, "tissue_experiment") as (claimed, _):
        return run_tissue_experiment(
            [specs[n] for n in names],
            Path(test_dir or section["test_dir"]),
            out_dir,
            ExperimentSettings.from_config(config),
            allow_network=bool(config["models"].get("allow_network", False)),
            device=claimed,
            jobs=jobs,
        )
