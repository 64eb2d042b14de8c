"""Benchmark of the prediction protocol (pathwsi.predict.evaluate) on the CPU.

The full protocol on a synthetic cohort: 500 patients × 2048 features per model, 200 expression
genes and 9 mutations, 5 folds × 50 repeats, two models. Features carry a planted rank-10 signal:
model `ftx` sees it with noise, `imgnet` with twice the noise. 60 % of the genes depend on the
signal (the rest are noise), and so do the mutations (prevalence 10–50 %). Prints the wall time per
task and in total, the peak RSS, and the paper's counts. Target on 2 CPU cores: < 10 minutes.

    python benchmarks/bench_evaluate.py [--patients 500] [--repeats 50]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_info

from pathwsi.predict.evaluate import EvaluationSettings, run_evaluation


def cohort(
    patients: int, features: int, genes: int, mutations: int, seed: int = 0
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, pd.DataFrame]:
    """Features of two models, expression and mutation tables sharing a planted rank-10 signal."""
    rng = np.random.default_rng(seed)
    ids = [f"TCGA-{i // 100:02d}-{i:04d}" for i in range(patients)]
    signal = rng.standard_normal((patients, 10))
    loading = rng.standard_normal((10, features)) * 0.05
    models = {
        name: pd.DataFrame(signal @ loading + noise * rng.standard_normal((patients, features)), index=ids)
        for name, noise in (("ftx", 1.0), ("imgnet", 2.0))
    }
    effect = rng.standard_normal((10, genes)) * 0.25
    effect[:, int(0.6 * genes) :] = 0.0
    expression = pd.DataFrame(
        signal @ effect + rng.standard_normal((patients, genes)),
        index=ids,
        columns=[f"GENE{j:03d}" for j in range(genes)],
    )
    liability = signal @ rng.standard_normal((10, mutations)) * 0.3 + rng.standard_normal((patients, mutations))
    prevalence = np.linspace(0.1, 0.5, mutations)
    mutated = (liability > np.diag(np.quantile(liability, 1 - prevalence, axis=0))).astype(float)
    return models, expression, pd.DataFrame(mutated, index=ids, columns=[f"MUT{j}" for j in range(mutations)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=500)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--mutations", type=int, default=9)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    blas = ", ".join(sorted({f"{i['internal_api']} ({i['num_threads']} threads)" for i in threadpool_info()}))
    print(
        f"CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; BLAS {blas}; the fits run on 1 BLAS thread"
    )
    features, expression, mutations = cohort(args.patients, args.features, args.genes, args.mutations)
    settings = EvaluationSettings(folds=args.folds, repeats=args.repeats)
    print(
        f"cohort: {args.patients} patients × {args.features} features × 2 models; {args.genes} genes, {args.mutations} mutations; {args.folds} folds × {args.repeats} repeats"
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        summary, _ = run_evaluation(features, Path(folder), settings, expression=expression, mutations=mutations)
    total = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for task, counts in summary["tasks"].items():
        print(
            f"{task:>10}: {counts['seconds']:7.1f} s  ({counts['seconds'] / (2 * args.folds * args.repeats) * 1000:.0f} ms per model and outer fold)"
        )
    print(f"     total: {total:7.1f} s wall (cross-validation, metrics, tables, figures; target < 600 s)")
    print(f"  peak RSS: {peak:7.0f} MiB")
    e, m = summary["tasks"]["expression"], summary["tasks"]["mutation"]
    print(
        f"expression: significant ftx {e['significant_a']}, imgnet {e['significant_b']}, either {e['significant_either']} of {e['genes']} ({int(0.6 * args.genes)} planted); higher r with ftx {e['higher_with_a']} ({e['higher_with_a_significant']} Wilcoxon q < 0.05), with imgnet {e['higher_with_b']}"
    )
    print(
        f"  mutation: higher AUROC with ftx {m['higher_with_a']} of {m['genes']} ({m['higher_with_a_significant']} Wilcoxon q < 0.05), with imgnet {m['higher_with_b']}"
    )


if __name__ == "__main__":
    main()
