"""Figures of the prediction experiments, drawn from the tables pathwsi.predict.evaluate writes (matplotlib, Agg).

- expression_r_scatter.png: per gene, mean r with model a against model b, the diagonal, genes
  significant with either model highlighted;
- mutation_roc.png: per mutation, the ROC curve of each model's repeat-averaged out-of-fold scores;
- mutation_auroc.png: per mutation, each model's AUROC (mean ± std over repeats).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pathwsi.runtime.outputs import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pathwsi.predict.evaluate import TaskResult

SCATTER, ROC, BARS = "expression_r_scatter.png", "mutation_roc.png", "mutation_auroc.png"
LABELLED = 20  # genes named in the expression scatter


def plot_task(
    result: TaskResult, comparison: pd.DataFrame, out_dir: Path, fdr: float, warnings: Sequence[str] = ()
) -> list[Path]:
    """The task's figures in `out_dir`, each headed by `warnings` (e.g. features of untrained weights); their paths."""
    if result.task == "expression":
        expression_scatter(out_dir / SCATTER, comparison, fdr, warnings)
        return [out_dir / SCATTER]
    roc_curves(out_dir / ROC, {name: result.averaged(name) for name in result.tables}, result.targets, warnings)
    auroc_bars(out_dir / BARS, result.tables, warnings)
    return [out_dir / ROC, out_dir / BARS]


def expression_scatter(path: Path, comparison: pd.DataFrame, fdr: float, warnings: Sequence[str] = ()) -> None:
    """Mean r per gene, model a (y) against model b (x), from an expression comparison table."""
    use_agg()
    import matplotlib.pyplot as plt

    a, b = comparison["model_a"].iat[0], comparison["model_b"].iat[0]
    significant = (comparison["significant_a"] | comparison["significant_b"]).to_numpy(bool)
    x, y = comparison["mean_b"].to_numpy(float), comparison["mean_a"].to_numpy(float)
    figure, ax = plt.subplots(figsize=(5.5, 5.5), layout="constrained")
    ax.scatter(x[~significant], y[~significant], s=10, color="0.7", label=f"not significant ({(~significant).sum()})")
    ax.scatter(
        x[significant],
        y[significant],
        s=14,
        color="tab:red",
        label=f"q < {fdr} with either ({significant.sum()}; {int((y > x)[significant].sum())} above the diagonal)",
    )
    finite = np.isfinite(np.r_[x, y])
    low, high = (float(np.r_[x, y][finite].min()), float(np.r_[x, y][finite].max())) if finite.any() else (0.0, 1.0)
    ax.plot([low, high], [low, high], color="black", linewidth=0.8)
    ax.set_xlabel(f"mean Pearson r over repeats, {b}")
    ax.set_ylabel(f"mean Pearson r over repeats, {a}")
    for i in _labelled(significant, np.fmax(x, y)):
        ax.annotate(str(comparison["gene"].iat[i]), (x[i], y[i]), xytext=(3, 2), textcoords="offset points", fontsize=6)
    ax.set_title(f"gene expression: {a} vs {b} (up to {LABELLED} significant genes named)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    save_figure(figure, path, warnings)


def roc_curves(
    path: Path, scores: dict[str, pd.DataFrame], targets: pd.DataFrame, warnings: Sequence[str] = ()
) -> None:
    """One panel per mutation: ROC of each model's repeat-averaged out-of-fold scores (patients × genes)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    use_agg()
    import matplotlib.pyplot as plt

    genes = list(targets.columns)
    columns = min(3, len(genes))
    rows = -(-len(genes) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.3 * columns, 3.3 * rows + 0.6), sharex=True, sharey=True, squeeze=False
    )
    figure.subplots_adjust(
        left=0.08,
        right=0.98,
        bottom=0.6 / (3.3 * rows + 0.6) + 0.04,
        top=1 - 0.9 / (3.3 * rows + 0.6),  # room for the title above the panels' own
        wspace=0.08,
        hspace=0.25,
    )  # fixed: constrained layout of many panels is slow
    for ax, gene in zip(axes.ravel(), genes):
        known = targets[gene].to_numpy(float)
        known = known[np.isfinite(known)]
        for name, frame in scores.items():
            truth, score = targets[gene].to_numpy(float), frame[gene].to_numpy(float)
            usable = np.isfinite(truth) & np.isfinite(score)
            if len(np.unique(truth[usable])) < 2:
                continue
            fpr, tpr, _ = roc_curve(truth[usable], score[usable])
            ax.plot(fpr, tpr, label=f"{name} {roc_auc_score(truth[usable], score[usable]):.2f}")
        ax.plot([0, 1], [0, 1], color="0.6", linewidth=0.6, linestyle="--")
        ax.set_title(f"{gene}: {int((known > 0).sum())} mutated of {len(known)}", fontsize=9)
        ax.legend(loc="lower right", fontsize=7, title="AUROC of the averaged scores", title_fontsize=7)
    for ax in axes.ravel()[len(genes) :]:
        ax.set_axis_off()
    figure.suptitle(
        "mutation: ROC of out-of-fold scores averaged over repeats (mutation_auroc.png: the mean of each repeat's AUROC)",
        fontsize=10,
    )
    figure.supxlabel("false positive rate", fontsize=9)
    figure.supylabel("true positive rate", fontsize=9)
    save_figure(figure, path, warnings)


def _labelled(chosen: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Indices of at most LABELLED chosen points, highest `value` first (more names would cover the plot)."""
    candidates = np.flatnonzero(chosen & np.isfinite(value))
    return candidates[np.argsort(-value[candidates])][:LABELLED]


def auroc_bars(path: Path, tables: dict[str, pd.DataFrame], warnings: Sequence[str] = ()) -> None:
    """Grouped bars per mutation: each model's AUROC, mean ± std over repeats (per-gene mutation tables)."""
    use_agg()
    import matplotlib.pyplot as plt

    names = list(tables)
    genes = list(tables[names[0]]["gene"])
    width = 0.8 / len(names)
    figure, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(genes) + 1.5), 3.8), layout="constrained")
    for i, name in enumerate(names):
        table = tables[name]
        ax.bar(
            np.arange(len(genes)) + (i - (len(names) - 1) / 2) * width,
            table["auroc_mean"],
            width,
            yerr=table["auroc_std"],
            capsize=2,
            label=name,
        )
    ax.axhline(0.5, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_xticks(np.arange(len(genes)), genes, rotation=45, ha="right")
    ax.set_ylabel("AUROC (mean ± std over repeats)")
    ax.set_ylim(0.0, 1.0)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(names), fontsize=8, frameon=False)
    save_figure(figure, path, warnings)


def use_agg() -> None:
    """Select matplotlib's Agg backend (no display); call it before importing matplotlib.pyplot."""
    import matplotlib

    matplotlib.use("Agg")


def save_figure(
    figure: Figure, path: Path, warnings: Sequence[str] = (), dpi: int = 110, palette: bool = False
) -> None:
    """PNG, atomically, with `warnings` in red above everything else; `palette`: 256 colours (a third of the
    bytes for pictures over photographs, such as heatmaps)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    if warnings:
        figure.text(0.5, 1.0, "\n".join(warnings), color="tab:red", fontsize=8, ha="center", va="bottom")
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(figure)
    with atomic_path(path) as temporary:
        if palette:
            Image.open(buffer).convert("RGB").quantize(256).save(temporary, format="png", optimize=True)
        else:
            temporary.write_bytes(buffer.getvalue())
