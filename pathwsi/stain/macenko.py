"""Macenko stain normalization (Macenko et al., ISBI 2009): fit, plausibility, fallback, apply.

numpy only: the per-slide tiling job fits a slide and draws its QC picture without importing
torch. The apply math (`apply_log_affine`) is written once over an array namespace and runs
unchanged on numpy here and on torch tensors (any device) in `pathwsi.stain.torch_apply`.

This module also holds what every `stain.method` shares (pathwsi.stain.methods dispatches):
the settings, a slide's fit record (`StainFit`), the slide fit with its fallback
(`fit_slide_with`) and target loading (`load_target_with`). Vahadane (pathwsi.stain.vahadane)
fits a `StainParams` too and reuses the plausibility checks and the apply here unchanged;
Reinhard (pathwsi.stain.reinhard) fits `LabStats` instead.

Conventions (those of Macenko's reference code, and of torchstain):
- optical density OD = -ln((I + 1) / io), per channel, for 8-bit intensities I;
- the stain matrix is 3×2 (rows R, G, B; columns hematoxylin, eosin), unit columns in OD space;
- a pixel's concentrations are the least-squares unmixing C = pinv(S) @ OD;
- max_conc is the `percentile`-th percentile of each stain's concentration over stained
  (non-background) pixels.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pathwsi.errors import PathwsiError
from pathwsi.stain.lab import LabStats

FitStatus = Literal["fitted", "fallback"]
FallbackPolicy = Literal["target", "reference"]
FALLBACK_POLICIES: tuple[str, ...] = ("target", "reference")
StainMethod = Literal["macenko", "vahadane", "reinhard"]
METHODS: tuple[str, ...] = ("macenko", "vahadane", "reinhard")
DEFAULT_REFERENCE = "stain_reference.json"

_MIN_EIGEN_RATIO = 1e-6  # λ2/λ1 below this: the OD cloud is a line or a point, no stain plane
MIN_RANK_DEG = 0.1  # H and E closer than this: the stain matrix cannot be inverted
MAX_FIT_PIXELS = 1 << 19  # per pixel set (tissue, stained): larger sets are evenly strided down


class StainSettingsError(PathwsiError, ValueError):
    """A `stain` setting or target that cannot be used; the message names the key."""


class StainFitError(PathwsiError, ValueError):
    """A Macenko fit is impossible on these pixels; `reason` says why in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class StainParams:
    """A Macenko stain model: unit H and E vectors in OD space and their maximum concentrations."""

    stain_matrix: np.ndarray  # (3, 2) float64, columns hematoxylin then eosin
    max_conc: np.ndarray  # (2,) float64, > 0

    def __post_init__(self) -> None:
        matrix = np.array(self.stain_matrix, dtype=np.float64).reshape(3, 2)
        max_conc = np.array(self.max_conc, dtype=np.float64).reshape(2)
        if not (np.all(np.isfinite(matrix)) and np.all(np.isfinite(max_conc))):
            raise ValueError("stain parameters must be finite numbers")
        norms = np.linalg.norm(matrix, axis=0)
        if np.any(norms < 1e-6) or np.any(max_conc <= 0):
            raise ValueError(
                f"stain vectors must be non-zero and max_conc positive, got norms {norms}, max_conc {max_conc}"
            )
        matrix /= norms
        matrix.setflags(write=False)
        max_conc.setflags(write=False)
        object.__setattr__(self, "stain_matrix", matrix)
        object.__setattr__(self, "max_conc", max_conc)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types: {"stain_matrix": 3 rows (R, G, B) of [H, E], "max_conc": [H, E]}."""
        return {"stain_matrix": self.stain_matrix.round(6).tolist(), "max_conc": self.max_conc.round(6).tolist()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StainParams:
        """Inverse of `to_json`; other keys (provenance notes) are ignored."""
        return cls(np.asarray(data["stain_matrix"], dtype=np.float64), np.asarray(data["max_conc"], dtype=np.float64))


StainModel = StainParams | LabStats  # what a slide is normalized from and to: stain vectors, or LAB statistics


@dataclass(frozen=True)
class StainSettings:
    """Every stain-normalization config key, with its default (see docs/stain.md)."""

    method: StainMethod = "macenko"  # macenko | vahadane | reinhard (docs/stain.md, "Methods")
    io: float = 240.0  # background (transmitted light) intensity
    beta: float = 0.15  # OD threshold: tissue is >= beta in every channel; background < beta in all
    alpha: float = 1.0  # angle percentile for the robust extreme stain directions
    percentile: float = 99.0  # concentration percentile taken as the maximum concentration
    sample_tiles: int = 64  # tissue tiles sampled (by the caller, seeded) per slide for the fit
    min_od_pixels: int = 2000  # fewer tissue pixels than this: no fit, fallback
    max_angle_deg: float = 35.0  # fitted H (E) farther than this from the canonical H (E): fallback
    min_separation_deg: float = 8.0  # fitted H and E closer than this to each other: fallback
    fallback: FallbackPolicy = "target"  # what a slide without a usable fit is normalized with
    target: str = "default"  # "default" (shipped reference), a target image, or a params .json

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.io <= 255:
            problems.append(f"io must be in (0, 255], got {self.io}")
        if self.beta <= 0:
            problems.append(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.alpha < 50:
            problems.append(f"alpha must be in [0, 50), got {self.alpha}")
        if not 50 < self.percentile <= 100:
            problems.append(f"percentile must be in (50, 100], got {self.percentile}")
        if self.sample_tiles < 1 or self.min_od_pixels < 3:
            problems.append("sample_tiles must be >= 1 and min_od_pixels >= 3")
        if self.fallback not in FALLBACK_POLICIES:
            problems.append(f"fallback must be one of {', '.join(FALLBACK_POLICIES)}, got {self.fallback!r}")
        if problems:
            raise StainSettingsError("stain settings: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> StainSettings:
        """From a config's `stain` section; unknown keys are an error."""
        section = config["stain"]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise StainSettingsError(
                f"stain settings: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
            )
        return cls(**section)


@dataclass(frozen=True)
class StainFit:
    """A slide's stain fit as used downstream: the params to normalize with, and how they came about."""

    params: StainModel  # what this slide is normalized with (the fit, or the fallback's)
    target: StainModel  # what it is normalized to
    status: FitStatus
    reason: str | None  # why the fit was not used (None when fitted)
    settings: StainSettings
    n_tiles: int
    n_pixels: int
    n_od_pixels: int  # pixels with OD >= beta in every channel
    fitted: StainModel | None = None  # the fit itself, also when it was rejected as implausible
    angles_deg: Mapping[str, float] | None = None  # fitted H, E vs canonical; H-E separation (stain vectors only)

    @property
    def method(self) -> str:
        return self.settings.method

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON record for `results/tiles/{slide_id}.json`."""
        return {
            "method": self.method,
            "status": self.status,
            "reason": self.reason,
            "fallback": self.settings.fallback if self.status == "fallback" else None,
            "params": self.params.to_json(),
            "target": self.target.to_json(),
            "fitted": self.fitted.to_json() if self.fitted is not None else None,
            "angles_deg": dict(self.angles_deg) if self.angles_deg is not None else None,
            "n_tiles": self.n_tiles,
            "n_pixels": self.n_pixels,
            "n_od_pixels": self.n_od_pixels,
            "settings": asdict(self.settings),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StainFit:
        """Inverse of `to_json` (the GPU job reads the tiling job's record with it); a record written before
        `stain.method` existed reads as macenko."""
        method = data.get("method", data["settings"].get("method", "macenko"))
        model = model_from_json(method)
        fitted = data.get("fitted")
        return cls(
            params=model(data["params"]),
            target=model(data["target"]),
            status=data["status"],
            reason=data["reason"],
            settings=StainSettings(**{**data["settings"], "method": method}),
            n_tiles=int(data["n_tiles"]),
            n_pixels=int(data["n_pixels"]),
            n_od_pixels=int(data["n_od_pixels"]),
            fitted=model(fitted) if fitted is not None else None,
            angles_deg=data.get("angles_deg"),
        )


def model_from_json(method: str) -> Callable[[Mapping[str, Any]], StainModel]:
    """How a record of `method` stores its parameters: LAB statistics (reinhard) or stain vectors (the others)."""
    return LabStats.from_json if method == "reinhard" else StainParams.from_json


# -- fitting ------------------------------------------------------------------------------------


def optical_density(rgb: np.ndarray, io: float) -> np.ndarray:
    """OD = -ln((I + 1) / io) of uint8 RGB (any shape), float32, same shape (a table lookup)."""
    return _od_table(float(io))[rgb]


@functools.cache
def _od_table(io: float) -> np.ndarray:
    return np.log(np.float32(io)) - np.log(np.arange(256, dtype=np.float32) + np.float32(1.0))


def fit_macenko(
    rgb: np.ndarray,
    io: float = 240.0,
    beta: float = 0.15,
    alpha: float = 1.0,
    percentile: float = 99.0,
    min_od_pixels: int = 3,
) -> StainParams:
    """Fit a Macenko stain model to uint8 RGB pixels (any shape ending in 3).

    Raises StainFitError when no fit is possible: fewer than `min_od_pixels` pixels with
    OD >= beta in every channel, an OD cloud with no plane (single colour), or coincident
    stain directions. Plausibility (is it H&E?) is `fit_slide`'s job.
    """
    return _fit(_channels_first(_as_pixels(rgb)), io, beta, alpha, percentile, min_od_pixels)


def _as_pixels(rgb: np.ndarray) -> np.ndarray:
    """Validate uint8 RGB and flatten to (N, 3)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim < 1 or rgb.shape[-1] != 3:
        raise TypeError(f"expected uint8 RGB pixels with a last axis of 3, got {rgb.dtype} {rgb.shape}")
    return rgb.reshape(-1, 3)


def _channels_first(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pixels.T)


def od_masks(rgb: np.ndarray, io: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Masks over channel-first uint8 RGB (3, N): OD >= beta in every channel (tissue), in any (stained).

    OD falls as intensity rises, so OD >= beta is intensity <= a threshold: compared on uint8.
    """
    darkest_allowed = int(np.count_nonzero(_od_table(float(io)) >= beta)) - 1
    tissue = np.maximum(np.maximum(rgb[0], rgb[1]), rgb[2]) <= darkest_allowed
    stained = np.minimum(np.minimum(rgb[0], rgb[1]), rgb[2]) <= darkest_allowed
    return tissue, stained


def _fit(rgb: np.ndarray, io: float, beta: float, alpha: float, percentile: float, min_od_pixels: int) -> StainParams:
    """`fit_macenko` on channel-first uint8 RGB (3, N).

    Stain vectors come from the tissue pixels (OD >= beta in every channel, as in Macenko);
    max_conc from every stained pixel (OD >= beta in any channel, i.e. all but background), so
    pale eosin-only stroma counts and the amount of glass in the sample does not. Each set is
    strided down to at most MAX_FIT_PIXELS (percentiles of half a million pixels are stable).
    """
    tissue, stained = od_masks(rgb, io, beta)
    require_tissue(tissue, min_od_pixels, beta)
    stain_matrix = _stain_vectors(
        optical_density(strided(np.compress(tissue, rgb, axis=1)), io).astype(np.float64), alpha
    )
    return StainParams(stain_matrix, max_concentrations(rgb, stained, stain_matrix, io, percentile))


def require_tissue(tissue: np.ndarray, min_od_pixels: int, beta: float) -> None:
    """StainFitError unless the tissue mask holds at least `min_od_pixels` (and 3) pixels."""
    need = max(min_od_pixels, 3)
    if np.count_nonzero(tissue) < need:
        raise StainFitError(
            f"too few tissue pixels: {np.count_nonzero(tissue)} with OD >= {beta} in every channel, need {need}"
        )


def max_concentrations(
    rgb: np.ndarray, stained: np.ndarray, stain_matrix: np.ndarray, io: float, percentile: float
) -> np.ndarray:
    """Each stain's `percentile`-th concentration over the stained pixels of channel-first uint8 RGB (3, N),
    unmixed by least squares with `stain_matrix` (3, 2); StainFitError when one is not positive."""
    concentrations = np.linalg.pinv(stain_matrix).astype(np.float32) @ optical_density(
        strided(np.compress(stained, rgb, axis=1)), io
    )
    max_conc = np.percentile(concentrations, percentile, axis=1).astype(np.float64)
    if not np.all(max_conc > 0):
        raise StainFitError(f"non-positive maximum concentration {max_conc.round(4).tolist()}")
    return max_conc


def strided(rgb: np.ndarray) -> np.ndarray:
    """Every k-th pixel of (3, N), k chosen so that at most MAX_FIT_PIXELS remain."""
    return rgb[:, :: -(-rgb.shape[1] // MAX_FIT_PIXELS)] if rgb.shape[1] > MAX_FIT_PIXELS else rgb


def _stain_vectors(od: np.ndarray, alpha: float) -> np.ndarray:
    """The extreme directions (alpha / 100-alpha angle percentiles) in the OD cloud's main plane."""
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(od))
    if (
        not np.all(np.isfinite(eigenvalues))
        or eigenvalues[2] <= 0
        or eigenvalues[1] <= _MIN_EIGEN_RATIO * eigenvalues[2]
    ):
        raise StainFitError(
            f"degenerate optical densities (eigenvalues {eigenvalues.round(8).tolist()}): a single colour, no stain plane"
        )
    plane = eigenvectors[:, [1, 2]]  # second-largest, largest
    plane[:, 1] *= np.sign(plane[:, 1].sum()) or 1.0  # largest points into positive OD
    projected = plane.T @ od
    phi = np.arctan2(projected[1], projected[0])
    phi_min, phi_max = np.percentile(phi, [alpha, 100 - alpha])
    v_min, v_max = plane @ _unit_angle(phi_min), plane @ _unit_angle(phi_max)
    hematoxylin, eosin = (v_min, v_max) if v_min[0] > v_max[0] else (v_max, v_min)
    if angle_deg(hematoxylin, eosin) < MIN_RANK_DEG:
        raise StainFitError("hematoxylin and eosin directions coincide: a single stain, no plane")
    return np.stack([hematoxylin, eosin], axis=1)


def _unit_angle(phi: float) -> np.ndarray:
    return np.array([math.cos(phi), math.sin(phi)])


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(min(1.0, max(-1.0, cosine))))


PixelFit = Callable[[np.ndarray, StainSettings], StainModel]  # channel-first uint8 RGB (3, N) -> a model


def fit_slide(tiles: Sequence[np.ndarray] | np.ndarray, settings: StainSettings, target: StainParams) -> StainFit:
    """Fit one Macenko stain model to a slide's sampled tissue tiles; never raises on the pixels' content.

    Falls back by `settings.fallback` (and says why in `reason`) when the fit is impossible or
    implausible: too few tissue pixels, degenerate OD, or H/E vectors far from canonical H&E.
    Any `stain.method`: `pathwsi.stain.methods.fit_slide`.
    """
    if settings.method != "macenko":
        raise ValueError(f"macenko.fit_slide fits Macenko, not {settings.method}: use pathwsi.stain.methods.fit_slide")
    return fit_slide_with(fit_pixels, tiles, settings, target, default_reference())


def fit_pixels(rgb: np.ndarray, settings: StainSettings) -> StainParams:
    """`fit_macenko` on channel-first uint8 RGB (3, N) with the settings' parameters."""
    return _fit(rgb, settings.io, settings.beta, settings.alpha, settings.percentile, settings.min_od_pixels)


def fit_slide_with(
    fit: PixelFit,
    tiles: Sequence[np.ndarray] | np.ndarray,
    settings: StainSettings,
    target: StainModel,
    reference: StainModel,
) -> StainFit:
    """A slide's fit by any method: `fit` on the sampled tiles' pixels, with the fallback to `target` or
    `reference` (by `settings.fallback`) when it raises StainFitError, and for stain vectors when they are
    implausible (`plausibility_angles`). Never raises on the pixels' content."""
    pixels = np.concatenate([_as_pixels(tile) for tile in tiles]) if len(tiles) else np.zeros((0, 3), np.uint8)
    rgb = _channels_first(pixels)
    tissue, _ = od_masks(rgb, settings.io, settings.beta)
    counts: dict[str, Any] = {
        "n_tiles": len(tiles),
        "n_pixels": len(pixels),
        "n_od_pixels": int(np.count_nonzero(tissue)),
    }
    fallback = target if settings.fallback == "target" else reference
    try:
        fitted = fit(rgb, settings)
    except StainFitError as err:
        return StainFit(fallback, target, "fallback", err.reason, settings, **counts)
    if not isinstance(fitted, StainParams):
        return StainFit(fitted, target, "fitted", None, settings, fitted=fitted, **counts)
    angles = plausibility_angles(fitted)
    problem = _implausible(angles, settings)
    if problem:
        return StainFit(fallback, target, "fallback", problem, settings, fitted=fitted, angles_deg=angles, **counts)
    return StainFit(fitted, target, "fitted", None, settings, fitted=fitted, angles_deg=angles, **counts)


def plausibility_angles(params: StainParams) -> dict[str, float]:
    """Angles (degrees) of the fitted H and E to the canonical ones, and between H and E."""
    canonical = default_reference().stain_matrix
    matrix = params.stain_matrix
    return {
        "hematoxylin": round(angle_deg(matrix[:, 0], canonical[:, 0]), 3),
        "eosin": round(angle_deg(matrix[:, 1], canonical[:, 1]), 3),
        "separation": round(angle_deg(matrix[:, 0], matrix[:, 1]), 3),
    }


def _implausible(angles: Mapping[str, float], settings: StainSettings) -> str | None:
    """Why a fit is not H&E-like, or None."""
    for stain in ("hematoxylin", "eosin"):
        if angles[stain] > settings.max_angle_deg:
            return f"implausible {stain} vector: {angles[stain]:.1f}° from canonical {stain} (max_angle_deg={settings.max_angle_deg})"
    if angles["separation"] < settings.min_separation_deg:
        return f"hematoxylin and eosin vectors only {angles['separation']:.1f}° apart (min_separation_deg={settings.min_separation_deg}): one colour dominates"
    return None


# -- targets ------------------------------------------------------------------------------------


@functools.cache
def default_reference() -> StainParams:
    """The shipped default target (see pathwsi/data/stain_reference.json for its provenance)."""
    return StainParams.from_json(
        json.loads(resources.files("pathwsi").joinpath("data").joinpath(DEFAULT_REFERENCE).read_text())
    )


def load_target(settings: StainSettings) -> StainModel:
    """The normalization target of `settings.method` (`pathwsi.stain.methods.load_target`, which builds on
    this module; kept here for the callers that import it from here)."""
    from pathwsi.stain.methods import load_target as load_method_target

    return load_method_target(settings)


def load_target_with(
    settings: StainSettings,
    default: StainModel,
    from_json: Callable[[Mapping[str, Any]], StainModel],
    fit_image: PixelFit,
) -> StainModel:
    """The normalization target: `default`, a params .json (read by `from_json`), or a fit of a target image.

    A target image is fitted with `fit_image` and the same settings as the slides; an image
    that cannot be fitted, or a file that cannot be read, raises StainSettingsError (a config problem, not a
    slide problem).
    """
    if settings.target == "default":
        return default
    path = Path(settings.target)
    if not path.is_file():
        raise StainSettingsError(
            f"key 'stain.target': file '{path}' not found; give an image, a params .json, or 'default'"
        )
    if path.suffix.lower() == ".json":
        try:
            return from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StainSettingsError(
                f"key 'stain.target': '{path}' is not a {settings.method} params .json ({type(err).__name__}: {err}); write it with `pathwsi normalize`'s target or give an image"
            ) from err
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise StainSettingsError(
            f"key 'stain.target': cannot read '{path}' as an image ({err}); give an RGB image of H&E tissue, a params .json, or 'default'"
        ) from err
    try:
        return fit_image(_channels_first(_as_pixels(rgb)), settings)
    except StainFitError as err:
        raise StainSettingsError(f"key 'stain.target': image '{path}' cannot be fitted: {err.reason}") from err


# -- applying -----------------------------------------------------------------------------------


def od_transform(source: StainParams, target: StainParams) -> np.ndarray:
    """The 3×3 map M with OD_normalized = M @ OD: unmix with source, rescale, remix with target."""
    scale = target.max_conc / source.max_conc
    return (target.stain_matrix * scale) @ np.linalg.pinv(source.stain_matrix)


def log_affine(
    sources: StainParams | Sequence[StainParams], target: StainParams, io: float
) -> tuple[np.ndarray, np.ndarray]:
    """`od_transform` restated on log light l = ln(I + 1), as float32 (A, b) with
    l_normalized = l - (A @ l + b): A = 1 - M, b = (M - 1) @ [ln io] * 3.

    Shapes: (3, 3) and (3, 1) for one source; (B, 3, 3) and (B, 3, 1) for a list of sources.
    """
    single = isinstance(sources, StainParams)
    listed = [sources] if isinstance(sources, StainParams) else list(sources)
    transforms = np.stack([od_transform(s, target) for s in listed])
    matrix = np.eye(3) - transforms
    offset = -matrix @ np.full((3, 1), math.log(io))
    if single:
        matrix, offset = matrix[0], offset[0]
    return matrix.astype(np.float32), offset.astype(np.float32)


def apply_log_affine(
    xp: Any, rgb: Any, matrix: Any, offset: Any, io: float, beta: float, shift: Any, weight: Any
) -> Any:
    """The apply math, for numpy or torch (`xp`): float32 RGB (..., 3, N) in [0, 255], in place.

    Channels sit on axis -2, pixels on the last axis; (matrix, offset) come from `log_affine`.
    Works in place, allocating nothing (allocation page faults cost more than the arithmetic on
    the CPU): `rgb` becomes the result; `shift` (shaped like rgb) and `weight` (..., 1, N) are
    scratch buffers. Each pixel moves by w = clip(max_channel_OD / beta, 0, 1) of the way to its
    normalized OD, so background is kept: a pixel at or brighter than io - 1 in every channel
    (OD <= 0) comes back unchanged, and the faint rim below beta is eased in without a seam.
    Output is the exact inverse of the OD convention, I = io * exp(-OD) - 1, clipped to [0, 255].
    """
    log_light = rgb
    log_light += 1.0
    xp.log(log_light, out=log_light)
    xp.minimum(log_light[..., 0:1, :], log_light[..., 1:2, :], out=weight)
    xp.minimum(weight, log_light[..., 2:3, :], out=weight)  # darkest channel: ln(io) - max OD
    weight *= -1.0 / beta
    weight += math.log(io) / beta
    xp.clip(weight, 0.0, 1.0, out=weight)
    xp.matmul(matrix, log_light, out=shift)
    shift += offset
    shift *= weight
    log_light -= shift
    xp.exp(log_light, out=log_light)
    log_light -= 1.0
    return xp.clip(log_light, 0.0, 255.0, out=log_light)


def normalize_array(
    rgb: np.ndarray,
    source: StainParams,
    target: StainParams,
    io: float = 240.0,
    beta: float = 0.15,
) -> np.ndarray:
    """Normalize uint8 RGB (H, W, 3) or (N, H, W, 3) from `source` to `target`; uint8, same shape."""
    pixels = _as_pixels(rgb).T.astype(np.float32)  # (3, N)
    scratch = np.empty_like(pixels), np.empty_like(pixels[:1])
    out = apply_log_affine(np, pixels, *log_affine(source, target, io), io, beta, *scratch)
    return np.round(out).astype(np.uint8).T.reshape(rgb.shape)


# -- QC -----------------------------------------------------------------------------------------


def qc_panel(tiles_before: Sequence[np.ndarray], tiles_after: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """A white-spaced 2-row mosaic: tiles before normalization on top, the same tiles after below."""
    if len(tiles_before) != len(tiles_after) or not tiles_before:
        raise ValueError(
            f"qc_panel needs the same non-zero number of tiles before and after, got {len(tiles_before)} and {len(tiles_after)}"
        )
    height = max(t.shape[0] for t in [*tiles_before, *tiles_after])
    width = max(t.shape[1] for t in [*tiles_before, *tiles_after])
    panel = np.full((2 * height + 3 * gap, len(tiles_before) * (width + gap) + gap, 3), 255, np.uint8)
    for row, tiles in enumerate((tiles_before, tiles_after)):
        for col, tile in enumerate(tiles):
            y, x = gap + row * (height + gap), gap + col * (width + gap)
            panel[y : y + tile.shape[0], x : x + tile.shape[1]] = tile[..., :3]
    return panel
