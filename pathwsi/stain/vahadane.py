"""Vahadane stain vectors (Vahadane et al., IEEE TMI 2016) in pathwsi's Macenko stain model.

Vahadane's sparse non-negative factorization OD ≈ C · D (pixels as samples, D: two non-negative unit stain
vectors, C: non-negative, L1-sparse concentrations, λ = 0.1 as in the paper and StainTools), learned with
scikit-learn's MiniBatchDictionaryLearning on at most `MAX_DICTIONARY_PIXELS` of the sample's tissue
optical densities, evenly strided, seeded. Everything else is pathwsi.stain.macenko's: the tissue mask
(OD >= beta), the maximum concentrations (the percentile over the stained pixels), the plausibility checks
and fallback, and the log-affine apply (numpy and torch).

Not tiatoolbox's `VahadaneExtractor`: tiatoolbox 2.1.3 learns its dictionary with the three colour channels
as the samples (`fit_transform(X=od.T)`) and takes the unconstrained code as the stain matrix, so its eosin
vector has negative optical densities (tests/test_stain_methods.py measures it against ours; docs/stain.md).
"""

from __future__ import annotations

import warnings

import numpy as np

from pathwsi.stain.macenko import (
    MIN_RANK_DEG,
    StainFitError,
    StainParams,
    StainSettings,
    angle_deg,
    max_concentrations,
    od_masks,
    optical_density,
    require_tissue,
)

SPARSITY = 0.1  # λ, the L1 weight on the concentrations (Vahadane et al. 2016; StainTools)
MAX_DICTIONARY_PIXELS = 50_000  # tissue pixels the dictionary is learned on (evenly strided)
DICTIONARY_SEED = 0


def fit_vahadane(rgb: np.ndarray, settings: StainSettings | None = None) -> StainParams:
    """Fit a Vahadane stain model to uint8 RGB pixels (any shape ending in 3); StainFitError when impossible."""
    pixels = np.asarray(rgb)
    if pixels.dtype != np.uint8 or pixels.ndim < 1 or pixels.shape[-1] != 3:
        raise TypeError(f"expected uint8 RGB pixels with a last axis of 3, got {pixels.dtype} {pixels.shape}")
    settings = settings or StainSettings(method="vahadane", min_od_pixels=3)
    return fit_pixels(np.ascontiguousarray(pixels.reshape(-1, 3).T), settings)


def fit_pixels(rgb: np.ndarray, settings: StainSettings) -> StainParams:
    """`fit_vahadane` on channel-first uint8 RGB (3, N)."""
    tissue, stained = od_masks(rgb, settings.io, settings.beta)
    require_tissue(tissue, settings.min_od_pixels, settings.beta)
    tissue_rgb = np.compress(tissue, rgb, axis=1)
    step = -(-tissue_rgb.shape[1] // MAX_DICTIONARY_PIXELS)
    matrix = stain_vectors(optical_density(tissue_rgb[:, ::step], settings.io).T)
    return StainParams(matrix, max_concentrations(rgb, stained, matrix, settings.io, settings.percentile))


def stain_vectors(od: np.ndarray) -> np.ndarray:
    """H and E as unit columns (3, 2) of the non-negative sparse dictionary of tissue optical densities (N, 3);
    hematoxylin is the one with the larger red OD (Macenko's rule)."""
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.exceptions import ConvergenceWarning

    learner = MiniBatchDictionaryLearning(
        n_components=2,
        alpha=SPARSITY,
        batch_size=256,
        max_iter=5,
        fit_algorithm="cd",
        transform_algorithm="lasso_cd",
        positive_dict=True,
        positive_code=True,
        random_state=DICTIONARY_SEED,
    )
    state = np.random.get_state()  # scikit-learn's solver draws from numpy's global random state: put it back
    try:
        with warnings.catch_warnings():  # one per pixel batch; the dictionary agrees with the converged batch
            warnings.simplefilter("ignore", ConvergenceWarning)  # solver's within 2° (tests/test_stain_methods.py)
            rows = learner.fit(np.asarray(od, dtype=np.float64)).components_
    finally:
        np.random.set_state(state)
    norms = np.linalg.norm(rows, axis=1)
    if not np.all(np.isfinite(rows)) or np.any(norms < 1e-6):
        raise StainFitError(f"vahadane: degenerate dictionary {np.round(rows, 4).tolist()}: no two stains")
    matrix = (rows / norms[:, None]).T
    if angle_deg(matrix[:, 0], matrix[:, 1]) < MIN_RANK_DEG:
        raise StainFitError("vahadane: hematoxylin and eosin directions coincide: a single stain")
    return matrix if matrix[0, 0] >= matrix[0, 1] else matrix[:, ::-1].copy()
