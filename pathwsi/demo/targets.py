"""Demo expression and mutation tables whose signal is planted in what the demo slides show.

Each demo-luad patient's slides are drawn with a lymphocyte density d (share of nuclear sites
holding a small dark lymphocyte). From d (standardised to z over the cohort) and a seeded
generator:

- expression (TPM-like, so the default log2(x+1) transform applies): `PLANTED_EXPRESSION` genes
  are 2^(6 + slope * z + noise) - 1, slopes from strong to weak; `NOISE_EXPRESSION` genes carry
  no signal at all (the controls a predictor must not "recover");
- mutations (0/1): STK11 is mutated in immune-cold tumours (low d; the real STK11/LUAD
  association, here made strong), with a few labels flipped; the other genes are controls, mutated
  at their own prevalence evenly over the density order, so they carry no density signal.

Everything here is synthetic, and the README.txt written beside the tables says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pathwsi.runtime.outputs import write_text

PLANTED_EXPRESSION = {"PTPRC": 1.6, "CD3E": 1.4, "CD8A": 1.2, "GZMB": 1.0, "MS4A1": 0.8}  # gene: slope per z
NOISE_EXPRESSION = ("FOXP3", "CD68", "CD163", "KLRD1", "TPSAB1", "CEACAM3", "XCL1", "CD19")
EXPRESSION_NOISE = 0.5  # SD of the log2 noise
MUTATION_PREVALENCE = {
    "TP53": 0.45,
    "KRAS": 0.3,
    "KEAP1": 0.2,
    "LRP1B": 0.35,
    "NF1": 0.15,
    "FAT1": 0.15,
    "EGFR": 0.15,
    "SMARCA4": 0.1,
}
PLANTED_MUTATION = "STK11"  # mutated when the tumour is immune-cold
STK11_COLD_QUANTILE = 0.35  # patients below this quantile of d are STK11-mutated ...
STK11_FLIP = 0.1  # ... except for this share of flipped labels
NOTE = "SYNTHETIC demo targets written by `pathwsi demo`: their signal is planted in the demo slides' lymphocyte density (pathwsi/demo/targets.py). Not real data.\n"


def expression_table(density: dict[str, float], seed: int = 404) -> tuple[list[str], np.ndarray]:
    """Genes and a (patients, genes) TPM-like matrix, patients in sorted order."""
    rng = np.random.default_rng(seed)
    z = _standardised(density)
    genes = [*PLANTED_EXPRESSION, *NOISE_EXPRESSION]
    slopes = np.array([*PLANTED_EXPRESSION.values(), *[0.0] * len(NOISE_EXPRESSION)])
    log2 = 6.0 + z[:, None] * slopes[None, :] + rng.normal(0, EXPRESSION_NOISE, (len(z), len(genes)))
    return genes, np.round(2.0**log2 - 1.0, 3)


def mutation_table(density: dict[str, float], seed: int = 505) -> tuple[list[str], np.ndarray]:
    """Genes and a (patients, genes) 0/1 matrix, patients in sorted order."""
    rng = np.random.default_rng(seed)
    d = np.array([density[p] for p in sorted(density)])
    cold = (d < np.quantile(d, STK11_COLD_QUANTILE)).astype(np.int64)
    flip = rng.random(len(d)) < STK11_FLIP
    columns = [np.where(flip, 1 - cold, cold)]
    columns += [_balanced_control(d, p, rng) for p in MUTATION_PREVALENCE.values()]
    return [PLANTED_MUTATION, *MUTATION_PREVALENCE], np.stack(columns, axis=1)


def _balanced_control(density: np.ndarray, prevalence: float, rng: np.random.Generator) -> np.ndarray:
    """0/1 at `prevalence`, spread evenly over the density order (one positive at a random place in
    each run of about 1/prevalence patients), so a control carries no density signal even by chance."""
    order = np.argsort(density)
    block = max(2, round(1 / prevalence))
    mutated = np.zeros(len(density), np.int64)
    for start in range(0, len(order), block):
        members = order[start : start + block]
        if len(members) == block or rng.random() < len(members) / block:
            mutated[rng.choice(members)] = 1
    return mutated


def write_demo_targets(folder: Path, density: dict[str, float]) -> tuple[Path, Path]:
    """Write `expression.tsv` and `mutations.tsv` (patient_id first, one column per gene) and a README."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.txt").write_text(NOTE)
    patients = sorted(density)
    paths = []
    for name, (genes, values) in (
        ("expression.tsv", expression_table(density)),
        ("mutations.tsv", mutation_table(density)),
    ):
        rows = ["\t".join(["patient_id", *genes])] + [
            "\t".join([p, *(f"{v:g}" for v in row)]) for p, row in zip(patients, values)
        ]
        path = folder / name
        write_text("\n".join(rows) + "\n", path)
        paths.append(path)
    return paths[0], paths[1]


def _standardised(density: dict[str, float]) -> np.ndarray:
    d = np.array([density[p] for p in sorted(density)])
    return (d - d.mean()) / d.std()
