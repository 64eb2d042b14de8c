"""Stain-normalize image files or folders of tiles (e.g. NCT-CRC-HE-100K) the way slides are.

A folder's tree is mirrored under the output folder (class sub-folders stay), each image keeps
its name and format (PNG and TIFF lossless, JPEG at quality 95), and one line per image (or
one for the shared fit) goes to `stain_fits.jsonl` in the output folder. Images whose output
already exists are skipped, so an interrupted run resumes; outputs are written under a
temporary name and renamed, so an existing output is always complete.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pathwsi.errors import PathwsiError
from pathwsi.runtime.outputs import atomic_path
from pathwsi.stain.macenko import StainFit, StainModel, StainSettings
from pathwsi.stain.methods import fit_slide
from pathwsi.stain.torch_apply import normalize_tiles

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
PIL_FORMATS = {".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
FITS_LOG = "stain_fits.jsonl"
FitMode = Literal["per-image", "shared"]
DEFAULT_SETTINGS = StainSettings()


class ImageFolderError(PathwsiError, ValueError):
    """Inputs or an output folder that cannot be normalized as asked; the message names the path."""


def normalize_files(
    inputs: Sequence[Path],
    out_dir: Path,
    target: StainModel,
    settings: StainSettings = DEFAULT_SETTINGS,
    fit: FitMode = "per-image",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    workers: int = 4,
) -> int:
    """Normalize every image under `inputs` (files, or folders searched recursively) to `target`.

    fit="per-image": each image gets its own fit by `settings.method` (with the fallback policy for blank or
    implausible ones), like tile-by-tile normalizers. fit="shared": one fit from
    `settings.sample_tiles` images drawn with `seed`, applied to all (for tiles of one slide or
    one batch). Returns the number of images written.
    """
    if fit not in ("per-image", "shared"):
        raise ImageFolderError(f"fit must be 'per-image' or 'shared', got {fit!r}")
    pairs = find_images(inputs, out_dir)
    todo = [(src, dst) for src, dst in pairs if not dst.exists()]
    if len(todo) < len(pairs):
        log.info("%d of %d outputs already exist in %s; skipping them", len(pairs) - len(todo), len(pairs), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, fallbacks = 0, 0
    with ThreadPoolExecutor(workers) as pool, (out_dir / FITS_LOG).open("a") as fits_log:
        shared = (
            _shared_fit([src for src, _ in pairs], settings, target, seed, pool) if fit == "shared" and todo else None
        )
        if shared is not None:
            fits_log.write(json.dumps({"file": None, **shared.to_json()}) + "\n")
            fallbacks += shared.status == "fallback"
        with tqdm(total=len(todo), unit="img", desc="stain-normalize", disable=None) as progress:
            for chunk in _chunks(todo, batch_size):
                images = list(pool.map(read_rgb, [src for src, _ in chunk]))
                fits = (
                    [shared] * len(chunk)
                    if shared is not None
                    else [fit_slide([image], settings, target) for image in images]
                )
                outputs = _normalize_images(images, fits, device)
                list(pool.map(_write_image, outputs, [dst for _, dst in chunk]))
                if shared is None:
                    fits_log.writelines(
                        _fit_line(dst.relative_to(out_dir), f) for (_, dst), f in zip(chunk, fits, strict=True)
                    )
                    fallbacks += sum(f.status == "fallback" for f in fits)
                written += len(chunk)
                progress.update(len(chunk))
    if fallbacks:
        log.warning(
            "%d stain fit(s) fell back to %s parameters; reasons in %s",
            fallbacks,
            settings.fallback,
            out_dir / FITS_LOG,
        )
    return written


def find_images(inputs: Sequence[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """(input, output) paths: a folder's images keep their path relative to it, a file its name."""
    pairs: list[tuple[Path, Path]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            if out_dir.resolve().is_relative_to(item.resolve()):
                raise ImageFolderError(f"output folder {out_dir} is inside input folder {item}; choose one outside it")
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            pairs += [(p, out_dir / p.relative_to(item)) for p in found]
        elif item.is_file() and item.suffix.lower() in IMAGE_SUFFIXES:
            pairs.append((item, out_dir / item.name))
        else:
            raise ImageFolderError(f"{item}: not a folder or an image file ({', '.join(IMAGE_SUFFIXES)})")
    clash = next((dst for dst, n in Counter(dst for _, dst in pairs).items() if n > 1), None)
    if clash is not None:
        raise ImageFolderError(f"several inputs would be written to {clash}; normalize them into separate folders")
    if not pairs:
        raise ImageFolderError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, inputs))}")
    return pairs


def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageFolderError(
            f"cannot read image '{path}' ({type(err).__name__}: {err}); replace or remove it"
        ) from err


def _shared_fit(
    paths: list[Path], settings: StainSettings, target: StainModel, seed: int, pool: ThreadPoolExecutor
) -> StainFit:
    """One fit from a seeded sample of `settings.sample_tiles` of the images."""
    picks = np.random.default_rng(seed).choice(len(paths), size=min(settings.sample_tiles, len(paths)), replace=False)
    return fit_slide(list(pool.map(read_rgb, [paths[i] for i in sorted(picks)])), settings, target)


def _normalize_images(images: list[np.ndarray], fits: list[StainFit], device: str | torch.device) -> list[np.ndarray]:
    """Normalize images with their fits, batching those of equal size on `device`."""
    outputs: list[np.ndarray] = [np.empty(0)] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(index)
    for indices in by_shape.values():
        batch = torch.from_numpy(np.stack([images[i] for i in indices])).permute(0, 3, 1, 2).to(device)
        result = normalize_tiles(batch, fits[indices[0]], sources=[fits[i].params for i in indices])
        for i, tile in zip(indices, result.permute(0, 2, 3, 1).cpu().numpy(), strict=True):
            outputs[i] = tile
    return outputs


def _write_image(rgb: np.ndarray, path: Path) -> None:
    """Save in the format of the file name, under a temporary name first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = PIL_FORMATS[path.suffix.lower()]
    with atomic_path(path) as temporary:
        Image.fromarray(rgb).save(temporary, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def _fit_line(relative: Path, fit: StainFit) -> str:
    record = {
        "file": relative.as_posix(),
        "method": fit.method,
        "status": fit.status,
        "reason": fit.reason,
        "params": fit.params.to_json(),
    }
    return json.dumps(record) + "\n"


def _chunks(items: list[tuple[Path, Path]], size: int) -> Iterator[list[tuple[Path, Path]]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]
