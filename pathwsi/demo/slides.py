"""Synthetic H&E-like tissue defined in physical units (µm), renderable at any µm/px.

The tissue layout (where tissue is, which parts are cellular, where nuclei sit) is a pure
function of physical position and a seed, so two "scans" of the same tissue at 0.25 and
0.5 µm/px show the same thing. Colours follow Beer–Lambert with H&E stain vectors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])
BLUE_PEN_OD = np.array([1.6, 0.9, 0.25], np.float32)
DEBRIS_OD = np.array([2.2, 2.2, 2.2], np.float32)


def _hash_uniform(ix: np.ndarray, iy: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Deterministic uniform [0, 1) per integer cell (a splitmix64-style mix)."""
    with np.errstate(over="ignore"):
        h = (ix.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            iy.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        )
        h ^= np.uint64((seed * 1_000_003 + salt * 7919) & 0xFFFFFFFFFFFFFFFF)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _cell_uniform(ix: np.ndarray, iy: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """`_hash_uniform` per pixel, computed once per distinct cell and gathered (much faster)."""
    x0, y0 = int(ix.min()), int(iy.min())
    lx = np.arange(x0, int(ix.max()) + 1)
    ly = np.arange(y0, int(iy.max()) + 1)
    table = _hash_uniform(lx[None, :], ly[:, None], seed, salt)
    return table[iy - y0, ix - x0]


def _value_noise(x: np.ndarray, y: np.ndarray, spacing: float, seed: int, salt: int) -> np.ndarray:
    """Smooth value noise in [-1, 1] with feature size `spacing` (same units as x, y)."""
    gx, gy = x / spacing, y / spacing
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = gx - ix, gy - iy
    sx, sy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)

    def corner(dx: int, dy: int) -> np.ndarray:
        return _cell_uniform(ix + dx, iy + dy, seed, salt) * 2 - 1

    top = corner(0, 0) * (1 - sx) + corner(1, 0) * sx
    bottom = corner(0, 1) * (1 - sx) + corner(1, 1) * sx
    return top * (1 - sy) + bottom * sy


@dataclass(frozen=True)
class SyntheticTissue:
    """A seeded H&E-like section of `width_um` × `height_um`.

    tissue_cover: rough fraction of the section covered by tissue (0..1).
    background_band: fraction of the width, on the right, that is kept free of tissue.
    faint: whether part of the tissue is faintly stained.
    pen: whether a blue pen stroke and dark debris specks are drawn (outside the tissue).
    lymphocyte_density: share of nuclear sites holding a small, dark, round lymphocyte-like nucleus
        (present whatever the cellularity, so more lymphocytes mean more hematoxylin).
    infiltrate: rough share of the tissue in lymphocyte aggregates: patches tens of µm wide where
        every nuclear site holds a lymphocyte and eosin fades (a texture stain normalization keeps).
    stain_jitter: per-slide perturbation of the stain vectors (radians-ish scale).
    """

    width_um: float
    height_um: float
    seed: int = 0
    tissue_cover: float = 0.45
    background_band: float = 0.2
    faint: bool = False
    pen: bool = False
    lymphocyte_density: float = 0.2
    infiltrate: float = 0.0
    stain_jitter: float = 0.05
    io: float = 240.0
    _stains: np.ndarray = field(init=False, repr=False, compare=False)
    _level: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        stains = np.stack([HEMATOXYLIN, EOSIN]) + rng.normal(0, self.stain_jitter, (2, 3))
        stains = np.clip(stains, 0.02, None)
        stains /= np.linalg.norm(stains, axis=1, keepdims=True)
        object.__setattr__(self, "_stains", stains.astype(np.float32))
        grid = np.linspace(0, 1, 64)
        gx, gy = np.meshgrid(grid * self.width_um, grid * self.height_um)
        object.__setattr__(self, "_level", float(np.quantile(self._blobs(gx, gy), 1 - self.tissue_cover)))

    # -- geometry ---------------------------------------------------------------------------
    def tissue_field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed field: tissue where > 0. x, y in µm."""
        value = self._blobs(x, y) - self._level
        margin = np.minimum.reduce([x, y, self.width_um - x, self.height_um - y]) - 80.0
        band_edge = self.width_um * (1 - self.background_band)
        value = np.minimum(value, margin / 400.0)
        return np.minimum(value, (band_edge - x) / 400.0)

    def _blobs(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return _value_noise(x, y, 420.0, self.seed, 1) + 0.45 * _value_noise(x, y, 140.0, self.seed, 2)

    def tissue_fraction(self, x_um: float, y_um: float, w_um: float, h_um: float, step_um: float = 4.0) -> float:
        """Ground-truth share of a box that is tissue (pen and debris excluded)."""
        xs = x_um + (np.arange(max(1, int(w_um / step_um))) + 0.5) * (w_um / max(1, int(w_um / step_um)))
        ys = y_um + (np.arange(max(1, int(h_um / step_um))) + 0.5) * (h_um / max(1, int(h_um / step_um)))
        gx, gy = np.meshgrid(xs, ys)
        return float(np.mean(self.tissue_field(gx, gy) > 0))

    def pen_path(self) -> tuple[np.ndarray, np.ndarray]:
        """Start and end (µm) of the pen stroke, inside the tissue-free band."""
        x = self.width_um * (1 - self.background_band / 2)
        return np.array([x, 0.15 * self.height_um]), np.array([x - 0.02 * self.width_um, 0.85 * self.height_um])

    # -- rendering --------------------------------------------------------------------------
    def render(self, x_um: float, y_um: float, width_px: int, height_px: int, mpp: float) -> np.ndarray:
        """Render the region whose top-left corner is (x_um, y_um) at `mpp` µm/px; HxWx3 uint8."""
        xs = (x_um + (np.arange(width_px) + 0.5) * mpp).astype(np.float32)
        ys = (y_um + (np.arange(height_px) + 0.5) * mpp).astype(np.float32)
        tissue, cellular, strength, angle, wobble, pen_dist, debris_dist, aggregate = self._smooth_fields(xs, ys, mpp)
        alpha = np.clip(tissue / 0.04 + 0.5, 0, 1)  # soft edge, a few µm wide
        stain = alpha * strength
        h_conc = stain * (0.06 + 1.2 * self._nuclei(xs, ys, cellular, mpp))
        e_conc = (
            stain
            * (0.28 + 0.22 * self._fibres(xs, ys, angle, wobble, mpp))
            * (1 - 0.35 * cellular)
            * (1 - 0.7 * aggregate)
        )
        concentrations, stains = [h_conc, e_conc], [self._stains[0], self._stains[1]]
        if self.pen:
            edge = max(mpp, 1.0)
            concentrations += [
                np.clip((35.0 - pen_dist) / edge + 0.5, 0, 1),
                np.clip((25.0 - debris_dist) / edge + 0.5, 0, 1),
            ]
            stains += [BLUE_PEN_OD, DEBRIS_OD]
        od = np.stack(concentrations, axis=-1) @ np.stack(stains)
        rng = np.random.default_rng([self.seed, int(x_um * 16), int(y_um * 16), width_px, height_px])
        rgb = np.exp(-od, out=od)
        rgb *= np.float32(self.io)
        rgb += rng.standard_normal(od.shape, dtype=np.float32) * np.float32(2.5)
        return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)

    def _smooth_fields(self, xs: np.ndarray, ys: np.ndarray, mpp: float) -> list[np.ndarray]:
        """Slowly varying fields, evaluated every ~4 µm and linearly interpolated to the pixels."""
        step = max(1, int(4.0 // mpp))
        xc = xs[0] + np.arange(len(xs) // step + 2) * step * mpp
        yc = ys[0] + np.arange(len(ys) // step + 2) * step * mpp
        x, y = np.meshgrid(xc, yc)
        strength = np.ones_like(x)
        if self.faint:
            strength = np.where(_value_noise(x, y, 600.0, self.seed, 4) > 0.15, 0.3, 1.0)
        coarse = [
            self.tissue_field(x, y),
            np.clip(_value_noise(x, y, 200.0, self.seed, 3) * 1.5 + 0.5, 0, 1),
            strength,
            _value_noise(x, y, 300.0, self.seed, 5) * np.pi,
            _value_noise(x, y, 30.0, self.seed, 6),
            *self._pen_and_debris_distance(x, y),
            self._in_aggregate(x, y).astype(np.float32),
        ]
        pos_x, pos_y = np.arange(len(xs)) / step, np.arange(len(ys)) / step
        jx, jy = pos_x.astype(np.int64), pos_y.astype(np.int64)
        tx, ty = (pos_x - jx).astype(np.float32), (pos_y - jy).astype(np.float32)[:, None]
        fields = []
        for grid in coarse:
            grid = grid.astype(np.float32)
            rows = grid[jy] * (1 - ty) + grid[jy + 1] * ty
            fields.append(rows[:, jx] * (1 - tx) + rows[:, jx + 1] * tx)
        return fields

    def lymphocyte_share(self, x_um: float, y_um: float, w_um: float, h_um: float, step_um: float = 4.0) -> float:
        """Ground-truth share of a box's nuclear sites that hold a lymphocyte: every site in an aggregate, and a
        `lymphocyte_density` share of the others."""
        gx, gy = np.meshgrid(np.arange(x_um, x_um + w_um, step_um), np.arange(y_um, y_um + h_um, step_um))
        aggregate = float(np.mean(self._in_aggregate(gx, gy)))
        return self.lymphocyte_density + (1.0 - self.lymphocyte_density) * aggregate

    def _in_aggregate(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether (x, y) µm lies in a lymphocyte aggregate (none when infiltrate is 0)."""
        return _value_noise(x, y, 50.0, self.seed, 15) > 1.0 - 2.0 * self.infiltrate

    def _nuclei(self, xs: np.ndarray, ys: np.ndarray, cellular: np.ndarray, mpp: float) -> np.ndarray:
        """Nuclear hematoxylin density in [0, 1]: jittered-grid nuclei, faded to their mean at coarse mpp."""
        coverage = min(mpp / 6.0, 1.0)
        mean_density = 0.25 + 0.35 * cellular
        if coverage >= 1.0:
            return mean_density
        best = np.zeros(cellular.shape, np.float32)
        cell = 9.0
        ix = np.arange(int(xs[0] // cell) - 1, int(xs[-1] // cell) + 2)
        iy = np.arange(int(ys[0] // cell) - 1, int(ys[-1] // cell) + 2)
        gx, gy = np.meshgrid(ix, iy)
        cx = (gx + 0.2 + 0.6 * _hash_uniform(gx, gy, self.seed, 10)) * cell
        cy = (gy + 0.2 + 0.6 * _hash_uniform(gx, gy, self.seed, 11)) * cell
        lymph = (_hash_uniform(gx, gy, self.seed, 12) < self.lymphocyte_density) | self._in_aggregate(cx, cy)
        radius = np.where(lymph, 2.6, 3.6 + 1.2 * _hash_uniform(gx, gy, self.seed, 13))
        darkness = np.where(lymph, 1.0, 0.65)
        cell_cellularity = np.clip(_value_noise(cx, cy, 200.0, self.seed, 3) * 1.5 + 0.5, 0, 1)
        present = lymph | (
            _hash_uniform(gx, gy, self.seed, 14) < 0.25 + 0.7 * cell_cellularity
        )  # lymphocytes infiltrate everywhere
        x0, y0, edge = xs[0] - 0.5 * mpp, ys[0] - 0.5 * mpp, max(mpp, 0.5)
        for ncx, ncy, r, dark in zip(cx[present], cy[present], radius[present], darkness[present]):
            c0, c1 = max(0, int((ncx - r - x0) / mpp) - 1), min(len(xs), int((ncx + r - x0) / mpp) + 2)
            r0, r1 = max(0, int((ncy - r - y0) / mpp) - 1), min(len(ys), int((ncy + r - y0) / mpp) + 2)
            if c0 >= c1 or r0 >= r1:
                continue
            dist = np.hypot(xs[c0:c1][None, :] - ncx, ys[r0:r1][:, None] - ncy)
            disk = np.clip((r - dist) / edge + 0.5, 0, 1) * dark
            np.maximum(best[r0:r1, c0:c1], disk, out=best[r0:r1, c0:c1])
        return (1 - coverage) * best + coverage * mean_density

    @staticmethod
    def _fibres(xs: np.ndarray, ys: np.ndarray, angle: np.ndarray, wobble: np.ndarray, mpp: float) -> np.ndarray:
        """Stroma fibre texture in [0, 1], fading to its mean where mpp cannot resolve it."""
        fade = min(mpp / 4.0, 1.0)
        if fade >= 1.0:
            return np.full(angle.shape, 0.5, np.float32)
        phase = (xs[None, :] * np.cos(angle) + ys[:, None] * np.sin(angle)) * np.float32(2 * np.pi / 7.0)
        fibres = 0.5 + 0.5 * np.sin(phase + 4 * wobble)
        return (1 - fade) * fibres + fade * 0.5

    def _pen_and_debris_distance(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance (µm) to the pen stroke and to the nearest debris speck (far away when none)."""
        if not self.pen:
            far = np.full(x.shape, 1e6)
            return far, far
        start, end = self.pen_path()
        seg = end - start
        t = np.clip(((x - start[0]) * seg[0] + (y - start[1]) * seg[1]) / (seg @ seg), 0, 1)
        pen_dist = np.hypot(x - start[0] - t * seg[0], y - start[1] - t * seg[1])
        cell = 500.0
        ix, iy = np.floor(x / cell).astype(np.int64), np.floor(y / cell).astype(np.int64)
        cx = (ix + 0.5) * cell + (_cell_uniform(ix, iy, self.seed, 20) - 0.5) * 200
        cy = (iy + 0.5) * cell + (_cell_uniform(ix, iy, self.seed, 21) - 0.5) * 200
        speck = (_cell_uniform(ix, iy, self.seed, 22) < 0.5) & (self.tissue_field(cx, cy) < -0.1)
        return pen_dist, np.where(speck, np.hypot(x - cx, y - cy), 1e6)


SLIDE_FORMATS = ("svs", "tiff")


def write_slide(
    path: Path,
    tissue: SyntheticTissue,
    mpp: float,
    fmt: str = "svs",
    downsamples: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    quality: int = 90,
    level0_render_mpp: float | None = None,
    record_mpp: bool = True,
) -> Path:
    """Write `tissue` scanned at `mpp` µm/px as a JPEG-tiled pyramid.

    Level 0 is rendered; each lower level is an area-average (box) reduction of level 0, as a
    scanner's pyramid is. fmt "svs" writes an Aperio-style SVS (ImageDescription with AppMag
    and MPP, a stripped thumbnail after level 0); "tiff" a generic tiled TIFF whose µm/px is
    only in the TIFF resolution tags. record_mpp=False leaves µm/px out of the file.
    level0_render_mpp renders level 0 coarser and enlarges it (nearest neighbour), which
    makes very large benchmark slides quick to write.
    """
    import tifffile

    if fmt not in SLIDE_FORMATS:
        raise ValueError(f"unknown slide format {fmt!r}; expected one of {SLIDE_FORMATS}")
    width, height = round(tissue.width_um / mpp), round(tissue.height_um / mpp)
    reduced = {ds: np.full((-(-height // ds), -(-width // ds), 3), 255, np.uint8) for ds in downsamples[1:]}
    level0 = _level0_tiles(tissue, width, height, mpp, level0_render_mpp or mpp, tile, reduced)
    levels = [level0] + [_array_tiles(reduced[ds], tile) for ds in downsamples[1:]]
    aperio = (
        f"Aperio Image Library v12.0.15 \n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
    )
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tif:
        for index, (ds, tiles) in enumerate(zip(downsamples, levels)):
            level_w, level_h = -(-width // ds), -(-height // ds)
            tif.write(
                tiles,
                shape=(level_h, level_w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                description=(aperio + f"|AppMag = {10 / mpp:g}" + (f"|MPP = {mpp:g}" if record_mpp else ""))
                if fmt == "svs"
                else None,
                metadata=None,
                resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)) if record_mpp else None,
                resolutionunit="CENTIMETER" if record_mpp else "NONE",
                subfiletype=0 if index == 0 else 1,
            )
            if index == 0 and fmt == "svs":
                thumb = (
                    reduced[downsamples[-1]]
                    if len(downsamples) > 1
                    else tissue.render(0, 0, 256, 256, tissue.width_um / 256)
                )
                tif.write(
                    thumb,
                    photometric="rgb",
                    description=f"Aperio Image Library v12.0.15 \n{width}x{height} -> {thumb.shape[1]}x{thumb.shape[0]}",
                    metadata=None,
                )
    return path


def _level0_tiles(
    tissue: SyntheticTissue,
    width: int,
    height: int,
    mpp: float,
    render_mpp: float,
    tile: int,
    reduced: dict[int, np.ndarray],
) -> Iterator[np.ndarray]:
    """Yield level 0's tiles row by row, rendering a band at a time and filling the reduced levels."""
    from PIL import Image

    band_rows = tile * max([1, *reduced])
    factor = max(1, round(render_mpp / mpp))
    for top in range(0, height, band_rows):
        rows = min(band_rows, height - top)
        band = tissue.render(0.0, top * mpp, -(-width // factor), -(-rows // factor), mpp * factor)
        if factor > 1:
            band = band.repeat(factor, axis=0).repeat(factor, axis=1)[:rows, :width]
        for ds, level in reduced.items():
            padded = band
            if rows % ds or width % ds:
                padded = np.full((-(-rows // ds) * ds, -(-width // ds) * ds, 3), 255, np.uint8)
                padded[:rows, :width] = band
            small = Image.fromarray(padded).resize((padded.shape[1] // ds, padded.shape[0] // ds), Image.Resampling.BOX)
            level[top // ds : top // ds + small.height] = np.asarray(small)
        yield from _array_tiles(band, tile)


def _array_tiles(image: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Yield an image's tiles in row-major order, padding the last row and column with white."""
    height, width = image.shape[:2]
    for top in range(0, height, tile):
        padded = np.full((tile, -(-width // tile) * tile, 3), 255, np.uint8)
        padded[: min(tile, height - top), :width] = image[top : top + tile]
        for left in range(0, width, tile):
            yield padded[:, left : left + tile]
