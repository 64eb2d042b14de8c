"""The training-curve figure of a fine-tuning run (matplotlib, Agg): loss and accuracy per epoch.

Drawn from the rows of `metrics.tsv` (pathwsi.finetune.train): one point per epoch of both steps,
training (solid) and validation (dashed), a vertical line where step 2 starts.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathwsi.runtime.outputs import atomic_path

STEP_NAMES = {1: "step 1: new head, frozen base", 2: "step 2: top of the base unfrozen"}


def untrained_note(base: str) -> str:
    """The figure's warning when the fine-tuned base has untrained weights (the demo, the tests)."""
    return f"base '{base}' has UNTRAINED weights: these curves show the training running, not ImageNet fine-tuning"


def plot_run_curves(metrics: Path, summary: Path, path: Path) -> None:
    """The curves of a finished run, from its metrics.tsv and summary.json, at `path` (rule finetune_curves: a run
    made before fine-tuning drew its own curves gets them without training again)."""
    with metrics.open(newline="") as handle:
        rows = [{k: float(v) if k not in ("step", "epoch") else int(v) for k, v in row.items()} for row in csv.DictReader(handle, delimiter="\t")]  # fmt: skip
    base = json.loads(summary.read_text())["base"]
    plot_curves(path, rows, [untrained_note(base["name"])] if base.get("untrained") else [])


def plot_curves(path: Path, rows: Sequence[dict[str, Any]], warnings: Sequence[str] = ()) -> None:
    """Loss (left) and accuracy (right) per epoch of `rows`, train and val; PNG at `path`, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), layout="constrained")
    x = list(range(1, len(rows) + 1))
    for ax, metric, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        ax.plot(x, [row[f"train_{metric}"] for row in rows], "o-", color="tab:blue", label=f"train {label}")
        ax.plot(x, [row[f"val_{metric}"] for row in rows], "s--", color="tab:orange", label=f"validation {label}")
        ax.set_xlabel("step.epoch")
        ax.set_ylabel(label)
        ax.set_xticks(x, [f"{row['step']}.{row['epoch']}" for row in rows])
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.02, 1.02)
    starts = [i for i in range(1, len(rows)) if rows[i]["step"] != rows[i - 1]["step"]]
    for ax in axes:
        for start in starts:
            ax.axvline(start + 0.5, color="0.4", linewidth=0.8, linestyle=":")
            ax.annotate(
                f"step {rows[start]['step']} →",
                (start + 0.5, 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -10),
                textcoords="offset points",
                fontsize=8,
                color="0.3",
            )
    steps = sorted({row["step"] for row in rows})
    title = "; ".join(STEP_NAMES.get(step, f"step {step}") for step in steps) or "no epoch has run yet"
    figure.suptitle(f"fine-tuning per epoch; {title}", fontsize=9)
    if warnings:
        figure.text(0.5, 1.0, "\n".join(warnings), color="tab:red", fontsize=8, ha="center", va="bottom")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png", bbox_inches="tight")
    plt.close(figure)
