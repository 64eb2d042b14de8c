"""Labelled synthetic H&E tiles in the nine NCT-CRC-HE-100K classes, for demos and tests.

Each tile shows a 112 µm field (NCT: 224 px at 0.5 µm/px) rendered at `tile_px`, so a
smaller tile is a downscaled view of the same kind of tissue, not a crop. Classes differ
the way the real ones do, in structure and texture as much as in colour: fat cells with
thin membranes (ADI), glass (BACK), necrotic debris with nuclear fragments (DEB), packed
lymphocytes (LYM), pale mucus (MUC), smooth-muscle bundles (MUS), glands with basal nuclei
(NORM), wavy collagen with spindle cells (STR), crowded pleomorphic nuclei (TUM). Stain
vectors, stain amounts, brightness and focus vary per tile, and some classes overlap on
purpose (STR/MUS, DEB/TUM), so colour alone does not classify them.

Colours follow Beer–Lambert: RGB = I0 · exp(−(h·H + e·E + g·G)) with hematoxylin H, eosin E
and a neutral grey G. Every tile is a pure function of (seed, class, index).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import overload

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from pathwsi import __version__
from pathwsi.demo.slides import EOSIN, HEMATOXYLIN
from pathwsi.runtime.outputs import atomic_path

log = logging.getLogger(__name__)
CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
FIELD_UM = 112.0  # NCT-CRC-HE-100K: 224 px at 0.5 µm/px
GREY = np.full(3, 1 / np.sqrt(3))
MANIFEST = "tile_set.json"
Fields = tuple[np.ndarray, np.ndarray, np.ndarray]  # hematoxylin, eosin, grey optical densities


class _Canvas:
    """Pixel grid of one tile with its scale (px per µm) and the tile's random generator."""

    def __init__(self, tile_px: int, rng: np.random.Generator):
        self.n = tile_px
        self.s = tile_px / FIELD_UM
        self.rng = rng
        centres = (np.arange(tile_px, dtype=np.float32) + 0.5) / self.s
        self.x, self.y = centres[None, :], centres[:, None]

    def full(self, value: float) -> np.ndarray:
        return np.full((self.n, self.n), value, np.float32)

    def noise(self, scale_um: float) -> np.ndarray:
        """Smooth noise, roughly N(0, 1), with feature size `scale_um`."""
        span = FIELD_UM / scale_um  # noise cells across the tile
        coarse = self.rng.standard_normal((int(span) + 4,) * 2).astype(np.float32)
        x0, y0 = self.rng.uniform(1, 2, 2)
        box = (x0, y0, x0 + span, y0 + span)
        return np.asarray(
            Image.fromarray(coarse).resize((self.n, self.n), Image.Resampling.BICUBIC, box=box)
        ) / np.float32(0.8)

    @overload
    def uniform(self, low: float, high: float, size: None = None) -> float: ...

    @overload
    def uniform(self, low: float, high: float, size: int) -> np.ndarray: ...

    def uniform(self, low: float, high: float, size: int | None = None) -> np.ndarray | float:
        """One draw (a float) without `size`, else an array of `size` draws."""
        return self.rng.uniform(low, high, size)

    def grid_points(self, spacing_um: float, keep: float, jitter: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
        """Jittered grid of points (µm) over the field plus a margin; each kept with probability `keep`."""
        ticks = np.arange(-spacing_um, FIELD_UM + spacing_um, spacing_um)
        gx, gy = (g.ravel() for g in np.meshgrid(ticks, ticks))
        gx = gx + self.rng.uniform(-jitter, jitter, gx.size) * spacing_um
        gy = gy + self.rng.uniform(-jitter, jitter, gy.size) * spacing_um
        kept = self.rng.random(gx.size) < keep
        return gx[kept], gy[kept]

    def random_points(self, count: int | np.integer, margin_um: float = 5.0) -> np.ndarray:
        """(2, count): x and y (µm) of points over the field plus a margin."""
        return self.rng.uniform(-margin_um, FIELD_UM + margin_um, (2, int(count)))

    def at(self, image: np.ndarray, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Values of a tile-sized field at points (µm); points off the tile take the nearest edge value."""
        ix = np.clip((x_um * self.s).astype(np.int64), 0, self.n - 1)
        iy = np.clip((y_um * self.s).astype(np.int64), 0, self.n - 1)
        return image[iy, ix]

    def nuclei(
        self,
        x: np.ndarray,
        y: np.ndarray,
        a: np.ndarray | float,
        b: np.ndarray | float,
        theta: np.ndarray | float,
        dark: np.ndarray | float,
        rough: float = 0.0,
        hollow: float = 0.0,
    ) -> np.ndarray:
        """Soft elliptical nuclei (semi-axes a along theta, b across, µm) composited by maximum.

        rough: amplitude of the irregular outline (0 = ellipse); hollow: vesicular nuclei, paler
        in the centre than at the rim.
        """
        out = self.full(0.0)
        n = len(x)
        if n == 0:
            return out
        a_px = np.broadcast_to(np.asarray(a, np.float32), n) * np.float32(self.s)
        b_px = np.broadcast_to(np.asarray(b, np.float32), n) * np.float32(self.s)
        theta = np.broadcast_to(np.asarray(theta, np.float32), n)
        dark = np.broadcast_to(np.asarray(dark, np.float32), n)
        px, py = (x * self.s - 0.5).astype(np.float32), (y * self.s - 0.5).astype(np.float32)
        half = np.ceil(np.maximum(a_px, b_px) * (1 + rough) + 1.5).astype(np.int64)
        visible = (px > -half) & (px < self.n + half) & (py > -half) & (py < self.n + half)
        if not visible.any():
            return out
        bucket = np.where(visible, -(-half // 2) * 2, 0)  # stamp sizes rounded up to 2 px
        margin = int(bucket.max())
        padded = np.zeros((self.n + 4 * margin + 2,) * 2, np.float32)
        for size in np.unique(bucket[visible]):
            pick = bucket == size
            self._stamp(
                padded,
                2 * margin,
                int(size),
                px[pick],
                py[pick],
                a_px[pick],
                b_px[pick],
                theta[pick],
                dark[pick],
                rough,
                hollow,
            )
        return padded[2 * margin : 2 * margin + self.n, 2 * margin : 2 * margin + self.n].copy()

    def _stamp(
        self,
        padded: np.ndarray,
        offset: int,
        half: int,
        px: np.ndarray,
        py: np.ndarray,
        a_px: np.ndarray,
        b_px: np.ndarray,
        theta: np.ndarray,
        dark: np.ndarray,
        rough: float,
        hollow: float,
    ) -> None:
        """Draw nuclei of at most `half` px radius into `padded` (tile origin at `offset`)."""
        ix, iy = np.rint(px).astype(np.int64), np.rint(py).astype(np.int64)
        offsets = np.arange(-half, half + 1, dtype=np.float32)
        dx = offsets[None, None, :] + (ix - px).astype(np.float32)[:, None, None]
        dy = offsets[None, :, None] + (iy - py).astype(np.float32)[:, None, None]
        cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        u = (dx * cos + dy * sin) / a_px[:, None, None]
        v = (dy * cos - dx * sin) / b_px[:, None, None]
        rho = np.sqrt(u * u + v * v)
        boundary = np.float32(1.0)
        if rough:  # r(φ) = 1 + rough·(0.5 cos(2φ + p) + 0.5 cos(3φ + q)), from cos φ = u/ρ, sin φ = v/ρ
            inv = 1 / np.maximum(rho, 1e-6)
            c, s = u * inv, v * inv
            c2, s2 = c * c - s * s, 2 * c * s
            c3, s3 = c * c2 - s * s2, s * c2 + c * s2
            p, q = self.rng.uniform(0, 2 * np.pi, (2, len(px), 1, 1)).astype(np.float32)
            boundary = 1 + np.float32(rough / 2) * (c2 * np.cos(p) - s2 * np.sin(p) + c3 * np.cos(q) - s3 * np.sin(q))
        stamp = np.clip((boundary - rho) * b_px[:, None, None] + 0.5, 0, 1)
        if hollow:
            stamp *= 1 - np.float32(hollow) * np.clip(1 - (rho / boundary) ** 2, 0, 1)
        stamp *= dark[:, None, None]
        side = 2 * half + 1
        for row, col, patch in zip(iy + offset - half, ix + offset - half, stamp):
            window = padded[row : row + side, col : col + side]
            np.maximum(window, patch, out=window)

    def fibres(
        self, angle: float, wavelength_um: float, wave_amp_um: float, wave_len_um: float, sharpness: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Parallel wavy fibres along `angle`: intensity in [0, 1] and the local fibre direction."""
        cos, sin = np.cos(angle), np.sin(angle)
        across = -self.x * sin + self.y * cos
        bend = self.noise(wave_len_um)
        phase = (across + wave_amp_um * bend) * (2 * np.pi / wavelength_um)
        intensity = np.clip(0.5 + sharpness * (np.sin(phase) + 0.2 * self.noise(wavelength_um)), 0, 1)
        gy, gx = np.gradient(bend)
        local = angle + np.arctan(wave_amp_um * (gx * cos + gy * sin) * self.s)
        return intensity.astype(np.float32), local.astype(np.float32)


def _adipose(c: _Canvas) -> Fields:
    spacing = c.uniform(45, 85)
    sx, sy = c.grid_points(spacing, keep=1.0, jitter=0.35)
    # candidate cells from a 3.5 µm grid (the 3 nearest seeds there), exact distances per pixel
    coarse = np.linspace(0, FIELD_UM, 33, dtype=np.float32)
    near = np.argsort((coarse[None, :, None] - sx) ** 2 + (coarse[:, None, None] - sy) ** 2, axis=-1)[..., :3]
    cell = np.minimum((np.arange(c.n) / c.s / (FIELD_UM / 32) + 0.5).astype(np.int64), 32)
    near = near[cell[:, None], cell[None, :]]
    d = np.sqrt((c.x[..., None] - sx[near]) ** 2 + (c.y[..., None] - sy[near]) ** 2)
    nearest, farthest = d.min(axis=-1), d.max(axis=-1)
    gap = (
        d.sum(axis=-1) - farthest - 2 * nearest
    ) / 2  # (second nearest − nearest) / 2: distance to a cell boundary, µm
    width = c.uniform(0.35, 0.8) * (1 + 1.5 * np.clip(c.noise(40), 0, None))
    membrane = np.clip((width - gap) * c.s + 0.5, 0, 1)
    e = membrane * c.uniform(0.35, 0.6) * (0.85 + 0.15 * c.noise(6)) + 0.02
    ny, nx = np.nonzero(membrane > 0.8)
    pick = c.rng.integers(0, max(1, len(nx)), int(c.rng.integers(0, 4)))
    h = (
        c.nuclei(
            (nx[pick] + 0.5) / c.s,
            (ny[pick] + 0.5) / c.s,
            c.uniform(3, 5, len(pick)),
            1.0,
            c.uniform(0, np.pi, len(pick)),
            0.7,
        )
        if len(nx)
        else c.full(0.0)
    )
    return h + 0.04 * membrane, e, c.full(c.uniform(0.0, 0.04))


def _background(c: _Canvas) -> Fields:
    grey = c.uniform(0.2, 0.45) if c.rng.random() < 0.1 else c.uniform(0.01, 0.12)
    g = grey * (1 + 0.15 * c.noise(60)) + 0.01 * c.noise(3)
    haze = np.clip(c.noise(50) - 1.2, 0, None) * c.uniform(0, 0.06)  # a faint smear of stain on some
    sx, sy = c.random_points(c.rng.integers(0, 6))
    specks = c.nuclei(
        sx, sy, c.uniform(0.5, 2.5, len(sx)), c.uniform(0.5, 1.5, len(sx)), c.uniform(0, np.pi, len(sx)), 0.8, rough=0.3
    )
    return 0.02 + 0.3 * haze + 0.5 * specks, 0.02 + haze, np.clip(g + specks, 0, None)


def _debris(c: _Canvas, tumour_share: float | None = None) -> Fields:
    granular = 1 + 0.35 * c.noise(1.5) + 0.2 * c.noise(8)
    holes = np.clip(1.5 - np.clip(c.noise(15) - 0.6, 0, None) * 3, 0, 1)
    e = c.uniform(0.35, 0.6) * granular * holes
    h = c.uniform(0.08, 0.2) * (1 + 0.5 * c.noise(5)) * holes
    centres = c.random_points(c.rng.integers(4, 12))
    per = int(c.rng.integers(8, 16))
    fx = np.repeat(centres[0], per) + c.rng.normal(0, 6, per * len(centres[0]))
    fy = np.repeat(centres[1], per) + c.rng.normal(0, 6, per * len(centres[1]))
    fragments = c.nuclei(
        fx,
        fy,
        c.uniform(0.6, 2.0, len(fx)),
        c.uniform(0.5, 1.6, len(fx)),
        c.uniform(0, np.pi, len(fx)),
        c.uniform(0.7, 1.0, len(fx)),
        rough=0.3,
    )
    px, py = c.random_points(c.rng.integers(5, 20))
    pyknotic = c.nuclei(px, py, c.uniform(1.8, 3.0, len(px)), c.uniform(1.6, 2.8, len(px)), 0.0, 1.0)
    share = c.uniform(0.0, 0.7) if tumour_share is None else tumour_share
    tx, ty = c.random_points(round(share * 60))
    tumour = _pleomorphic(c, tx, ty)
    return h + np.maximum.reduce([fragments, pyknotic, tumour]), e, c.full(0.0)


def _pleomorphic(c: _Canvas, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Large, irregular, vesicular tumour nuclei of varied size and darkness, with nucleoli."""
    n = len(x)
    a = c.uniform(4.0, 7.5, n)
    b = a / c.uniform(1.2, 2.2, n)
    nuclei = c.nuclei(
        x,
        y,
        a,
        b,
        c.uniform(0, np.pi, n),
        c.uniform(0.5, 0.95, n),
        rough=c.uniform(0.08, 0.25),
        hollow=c.uniform(0.2, 0.5),
    )
    pick = c.rng.random(n) < 0.4
    nucleoli = c.nuclei(
        x[pick], y[pick], c.uniform(0.7, 1.2, int(pick.sum())), c.uniform(0.7, 1.2, int(pick.sum())), 0.0, 1.0
    )
    return np.maximum(nuclei, nucleoli)


def _lymphocytes(c: _Canvas) -> Fields:
    x, y = c.grid_points(c.uniform(6.5, 8.5), keep=c.uniform(0.75, 0.95))
    r = c.uniform(2.6, 3.6, len(x))
    nuclei = c.nuclei(
        x, y, r, r / c.uniform(1.0, 1.2, len(x)), c.uniform(0, np.pi, len(x)), c.uniform(0.85, 1.05, len(x)), rough=0.05
    )
    bx, by = c.random_points(c.rng.integers(0, 6))
    big = c.nuclei(
        bx, by, c.uniform(4.5, 6, len(bx)), c.uniform(3.5, 5, len(bx)), c.uniform(0, np.pi, len(bx)), 0.6, hollow=0.3
    )
    e = c.uniform(0.1, 0.25) * (1 + 0.2 * c.noise(10))
    return 0.08 + np.maximum(nuclei, big), e, c.full(0.0)


def _mucus(c: _Canvas) -> Fields:
    wisps, _ = c.fibres(c.uniform(0, np.pi), c.uniform(10, 20), c.uniform(4, 12), c.uniform(15, 40), sharpness=0.6)
    amount = np.clip((0.55 + 0.45 * wisps) * (1 + 0.3 * c.noise(15)), 0, None)
    cracks = np.clip(2.5 - np.clip(c.noise(25) - 0.8, 0, None) * 5, 0, 1)
    x, y = c.random_points(c.rng.integers(0, 7))
    cells = c.nuclei(x, y, c.uniform(3, 4.5, len(x)), c.uniform(2.5, 4, len(x)), c.uniform(0, np.pi, len(x)), 0.8)
    halo = c.nuclei(x, y, 7.0, 6.0, 0.0, 1.0)
    h = c.uniform(0.08, 0.22) * amount * cracks + cells
    e = c.uniform(0.05, 0.18) * amount * cracks + 0.3 * halo
    return h, e, c.full(0.0)


def _spindles(
    c: _Canvas,
    local: np.ndarray,
    count: int,
    length: tuple[float, float],
    width: tuple[float, float],
    dark: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elongated nuclei aligned with the local fibre direction; returns nuclei, halos and positions."""
    x, y = c.random_points(count)
    theta = c.at(local, x, y) + c.rng.normal(0, 0.12, len(x))
    a = c.uniform(*length, len(x))
    b = c.uniform(*width, len(x))
    return (
        c.nuclei(x, y, a, b, theta, c.uniform(*dark, len(x)), rough=0.04),
        c.nuclei(x, y, a * 1.15, b * 1.8, theta, 1.0),
        np.stack([x, y]),
    )


def _muscle(c: _Canvas) -> Fields:
    angle = c.uniform(0, np.pi)
    cleft: np.ndarray | float
    striation, local = c.fibres(angle, c.uniform(4, 7), c.uniform(0, 2.5), 40.0, sharpness=0.5)
    if c.rng.random() < 0.5:  # a second bundle at another angle, behind a pale cleft
        other, other_local = c.fibres(
            angle + c.uniform(0.6, 1.6), c.uniform(4, 7), c.uniform(0, 2.5), 40.0, sharpness=0.5
        )
        side = c.noise(80) + c.uniform(-0.5, 0.5)
        striation, local = np.where(side > 0, striation, other), np.where(side > 0, local, other_local)
        cleft = np.clip(1 - np.exp(-((side / 0.08) ** 2)) + 0.2, 0, 1)
    else:
        cleft = 1.0
    e = c.uniform(0.45, 0.75) * (0.88 + 0.24 * striation) * (1 + 0.1 * c.noise(20)) * cleft
    nuclei, halos, _ = _spindles(c, local, int(c.rng.integers(10, 35)), (6, 12), (1.4, 2.4), (0.6, 0.9))
    return 0.05 + nuclei, e * (1 - 0.4 * halos), c.full(0.0)


def _stroma(c: _Canvas) -> Fields:
    fibres, local = c.fibres(
        c.uniform(0, np.pi), c.uniform(3.5, 7), c.uniform(1, 5), c.uniform(12, 35), sharpness=c.uniform(0.5, 1.1)
    )
    loose = np.clip(c.uniform(0.6, 1.1) + 0.6 * c.noise(20), 0.15, 1)  # dense on some tiles, loose on others
    e = c.uniform(0.4, 0.7) * (0.3 + 0.7 * fibres) * (1 + 0.15 * c.noise(10)) * loose
    nuclei, _, _ = _spindles(c, local, int(c.rng.integers(5, 25)), (5, 10), (1.0, 2.0), (0.7, 1.0))
    lx, ly = c.random_points(c.rng.integers(0, 8))
    lymph = c.nuclei(lx, ly, 3.0, 2.8, 0.0, 0.9)
    return 0.04 + np.maximum(nuclei, lymph), e, c.full(0.0)


def _normal_mucosa(c: _Canvas) -> Fields:
    count = int(c.rng.integers(1, 4))
    gx, gy = c.random_points(count, margin_um=-10)
    ga, gb, gt = c.uniform(24, 42, count), c.uniform(20, 34, count), c.uniform(0, np.pi, count)
    inner = c.uniform(0.45, 0.65)  # lumen radius, as a share of the gland radius
    rho = np.full((c.n, c.n), np.inf, np.float32)
    # (x, y, radial angle) of nuclei near the base, goblet cells nearer the lumen
    basal: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    apical: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for k in range(count):
        cos, sin = np.cos(gt[k]), np.sin(gt[k])
        u, v = (c.x - gx[k]) * cos + (c.y - gy[k]) * sin, (c.y - gy[k]) * cos - (c.x - gx[k]) * sin
        rho = np.minimum(rho, np.sqrt((u / ga[k]) ** 2 + (v / gb[k]) ** 2))
        m = int(np.pi * (ga[k] + gb[k]) * (inner + 1) / 2 / c.uniform(4.5, 5.5))
        phi = np.arange(m) * 2 * np.pi / m + c.uniform(0, 1)
        for out, depth, angles in (
            (basal, inner + 0.75 * (1 - inner), phi),
            (apical, inner + 0.35 * (1 - inner), phi[::3] + np.pi / m),
        ):
            ru, rv = depth * ga[k] * np.cos(angles), depth * gb[k] * np.sin(angles)
            out.append(
                (
                    gx[k] + ru * cos - rv * sin,
                    gy[k] + ru * sin + rv * cos,
                    gt[k] + np.arctan2(np.sin(angles) / gb[k], np.cos(angles) / ga[k]),
                )
            )
    bx, by, bt = (np.concatenate(parts) for parts in zip(*basal))
    ax, ay, _ = (np.concatenate(parts) for parts in zip(*apical))
    nuclei = c.nuclei(
        bx, by, c.uniform(3.5, 4.5, len(bx)), c.uniform(1.5, 2.0, len(bx)), bt, c.uniform(0.7, 0.9, len(bx))
    )
    epithelium = np.clip((rho - inner) * 20, 0, 1) * np.clip((1 - rho) * 20 + 0.5, 0, 1)
    goblets = c.nuclei(ax, ay, c.uniform(2.8, 4.2, len(ax)), c.uniform(2.5, 3.8, len(ax)), 0.0, 1.0) * epithelium
    lx, ly = c.grid_points(c.uniform(10, 14), keep=0.5)
    outside = c.at(rho, lx, ly) > 1.08
    lamina = c.nuclei(lx[outside], ly[outside], 2.8, 2.5, 0.0, c.uniform(0.75, 0.95, int(outside.sum())))
    lumen = rho < inner
    e = np.where(lumen, 0.03, np.where(epithelium > 0, 0.3 * epithelium * (1 - 0.8 * goblets), c.uniform(0.25, 0.4)))
    h = np.where(lumen, 0.02, 0.06 + 0.06 * epithelium + 0.08 * goblets)
    return (
        (h + np.maximum(nuclei, lamina)).astype(np.float32),
        (e * (1 + 0.15 * c.noise(8))).astype(np.float32),
        c.full(0.0),
    )


def _tumour(c: _Canvas) -> Fields:
    e = c.uniform(0.25, 0.45) * (1 + 0.2 * c.noise(10))
    h = c.full(c.uniform(0.12, 0.25))
    lumen = c.noise(18) > c.uniform(0.5, 2.0)
    x, y = c.grid_points(c.uniform(8, 11), keep=c.uniform(0.85, 1.0), jitter=0.45)
    inside = ~c.at(lumen, x, y)
    nuclei = _pleomorphic(c, x[inside], y[inside])
    if c.rng.random() < 0.6:  # dirty necrosis in the lumens
        dh, de, _ = _debris(c, tumour_share=0.0)
        return np.where(lumen, dh, h + nuclei), np.where(lumen, de, e), c.full(0.0)
    return np.where(lumen, 0.02, h + nuclei), np.where(lumen, 0.03, e), c.full(0.0)


RENDERERS: dict[str, Callable[[_Canvas], Fields]] = {
    "ADI": _adipose,
    "BACK": _background,
    "DEB": _debris,
    "LYM": _lymphocytes,
    "MUC": _mucus,
    "MUS": _muscle,
    "NORM": _normal_mucosa,
    "STR": _stroma,
    "TUM": _tumour,
}


def render_tile(label: str, index: int, seed: int, tile_px: int = 224) -> np.ndarray:
    """One tile of class `label` (one of CLASSES) as an HxWx3 uint8 RGB array."""
    if label not in RENDERERS:
        raise ValueError(f"unknown tissue class {label!r}; expected one of {', '.join(CLASSES)}")
    rng = np.random.default_rng([seed, CLASSES.index(label), index])
    c = _Canvas(tile_px, rng)
    h, e, g = (np.asarray(f, np.float32) for f in RENDERERS[label](c))
    stains = np.stack([HEMATOXYLIN, EOSIN]) + rng.normal(0, 0.05, (2, 3))
    stains = np.clip(stains, 0.02, None)
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    h = h * rng.lognormal(0, 0.2)
    e = e * rng.lognormal(0, 0.2)
    sigma = rng.uniform(0.15, 0.45) * c.s  # focus: 0.15–0.45 µm
    h, e = gaussian_filter(h, sigma, truncate=2.5), gaussian_filter(e, sigma, truncate=2.5)
    od = np.stack([h, e, g], axis=-1) @ np.vstack([stains, GREY]).astype(np.float32)
    rgb = np.exp(-od, out=od)
    rgb *= np.float32(rng.uniform(225, 252))
    rgb += _pixel_noise(tile_px, rng) * np.float32(rng.uniform(1.5, 3.5))
    return np.clip(rgb, 0, 255).astype(np.uint8)


@cache
def _noise_bank(tile_px: int) -> np.ndarray:
    """Fixed per-pixel N(0, 1) noise, twice the tile size; tiles take seeded crops of it (fast)."""
    return np.random.default_rng(0).standard_normal((2 * tile_px, 2 * tile_px, 3), dtype=np.float32)


def _pixel_noise(tile_px: int, rng: np.random.Generator) -> np.ndarray:
    row, col = rng.integers(0, tile_px, 2)
    return _noise_bank(tile_px)[row : row + tile_px, col : col + tile_px]


def write_tile_set(out_dir: Path, n_per_class: int, seed: int, tile_px: int = 224, force: bool = False) -> Path:
    """Write `out_dir/<CLASS>/<CLASS>-<i>.png` for every class (NCT-CRC-HE-100K layout).

    The folder appears complete or not at all (written under a `.partial` name, then renamed),
    with `tile_set.json` recording how it was made. An existing folder is kept unless `force`.
    Use different seeds for a training and a test set.
    """
    out_dir = Path(out_dir)
    if out_dir.is_dir() and not force:
        log.info("tile set %s exists; kept", out_dir)
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    with atomic_path(out_dir) as partial:
        for label in CLASSES:
            (partial / label).mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(render_tile(label, i, seed, tile_px)).save(
                    partial / label / f"{label}-{i}.png", compress_level=1
                )
        manifest = {
            "classes": list(CLASSES),
            "n_per_class": n_per_class,
            "seed": seed,
            "tile_px": tile_px,
            "field_um": FIELD_UM,
            "pathwsi_version": __version__,
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir
