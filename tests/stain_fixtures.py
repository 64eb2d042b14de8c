"""H&E-like test images made by Beer–Lambert synthesis from known stain vectors (never downloaded).

Concentration maps: a tissue region with soft edges on glass, hematoxylin-dense nuclei (round
blobs) in eosin-stained stroma with a fibre texture, and a little counterstain everywhere, so
the image holds near-pure pixels of each stain as real H&E does. Intensities follow
I + 1 = (glass + 1) * exp(-S @ C), plus Gaussian sensor noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Macenko's reference stain vectors (the shipped default target), columns H, E.
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX_CONC = np.array([1.9705, 1.0308])
# A second "lab": Ruifrok & Johnston's H and E vectors (more purple H, pinker E).
RUIFROK_STAINS = np.array([[0.650, 0.072], [0.704, 0.990], [0.286, 0.105]])


def unit_columns(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    return matrix / np.linalg.norm(matrix, axis=0)


def rotate_stains(stains: np.ndarray, degrees: float, seed: int) -> np.ndarray:
    """Each stain vector tilted by `degrees` towards a random direction (a lab-to-lab shift)."""
    rng = np.random.default_rng(seed)
    out = []
    for vector in unit_columns(stains).T:
        normal = np.cross(vector, rng.normal(size=3))
        normal /= np.linalg.norm(normal)
        angle = np.radians(degrees)
        out.append(np.cos(angle) * vector + np.sin(angle) * normal)
    return np.stack(out, axis=1)


def he_concentrations(size: int = 192, seed: int = 0, tissue: float = 0.8) -> np.ndarray:
    """(size, size, 2) concentrations on a 0..1 scale of each stain's maximum: H, E."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 8)
    edge = np.quantile(smooth, 1 - tissue) if tissue < 1 else -np.inf
    inside = np.clip((smooth - edge) / (smooth.std() * 0.1 + 1e-9), 0, 1) if tissue < 1 else np.ones((size, size))
    yy, xx = np.mgrid[0:size, 0:size]
    nuclei = np.zeros((size, size))
    for _ in range(size * size // 300):
        cy, cx, radius = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2.5, 6.0)
        disk = np.clip(radius - np.hypot(yy - cy, xx - cx), 0, 1) * rng.uniform(0.6, 1.0)
        nuclei = np.maximum(nuclei, disk)
    angle = rng.uniform(0, np.pi)
    fibres = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / 7 + 3 * smooth / smooth.std())
    stroma = np.clip(0.35 + 0.5 * fibres + 0.2 * ndimage.gaussian_filter(rng.normal(size=(size, size)), 3), 0, 1)
    h = 0.04 + 0.95 * nuclei
    e = stroma * (1 - 0.9 * nuclei)
    return np.stack([h, e], axis=-1) * inside[..., None]


def synth_he(
    size: int = 192,
    stains: np.ndarray = REFERENCE_STAINS,
    max_conc: np.ndarray | tuple[float, float] = REFERENCE_MAX_CONC,
    seed: int = 0,
    tissue: float = 0.8,
    glass: float = 243.0,
    noise: float = 1.5,
) -> np.ndarray:
    """An H&E-like uint8 RGB image (size, size, 3) stained with `stains` (3×2, columns H, E)."""
    conc = he_concentrations(size, seed, tissue) * np.asarray(max_conc, dtype=np.float64)
    od = conc @ unit_columns(stains).T
    rgb = (glass + 1.0) * np.exp(-od) - 1.0
    rgb += np.random.default_rng(seed + 1000).normal(0, noise, rgb.shape)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise cosine similarity of two 3×2 stain matrices."""
    return np.sum(unit_columns(a) * unit_columns(b), axis=0)


LAB_B_STAINS = rotate_stains(REFERENCE_STAINS, 8.0, seed=3)  # another lab's H and E, 8° off
