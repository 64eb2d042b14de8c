"""Labelled tile sets (NCT-CRC-HE-100K layout): scan a folder of class sub-folders, split it per class,
read and augment tiles, and serve them to a DataLoader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pathwsi.errors import PathwsiError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


class FinetuneError(PathwsiError):
    """A problem with the tiles, the settings or a checkpoint; the message says what to do."""


@dataclass(frozen=True)
class AugmentSettings:
    """Training-time augmentation (config `finetune.augment`): random flips, 90° rotations, colour jitter."""

    flips: bool = True
    rot90: bool = True
    colour_jitter: float = 0.05  # brightness and per-channel gains drawn from [1 − j, 1 + j]


@dataclass(frozen=True)
class LabelledTiles:
    """Image files with class labels (indices into `classes`)."""

    classes: tuple[str, ...]
    files: tuple[Path, ...]
    labels: tuple[int, ...]

    def subset(self, indices: np.ndarray) -> LabelledTiles:
        return LabelledTiles(
            self.classes, tuple(self.files[i] for i in indices), tuple(self.labels[i] for i in indices)
        )

    def counts(self) -> dict[str, int]:
        found = np.bincount(np.asarray(self.labels, np.int64), minlength=len(self.classes))
        return dict(zip(self.classes, (int(n) for n in found)))


def scan_tile_folder(root: Path, classes: tuple[str, ...] | None = None) -> LabelledTiles:
    """A folder of class sub-folders (NCT-CRC-HE-100K layout) as labelled tiles.

    Classes are the sub-folder names in sorted order, or must equal `classes` when given
    (a validation or test folder must have the training classes).
    """
    root = Path(root)
    if not root.is_dir():
        raise FinetuneError(
            f"tile folder '{root}' not found; it must hold one sub-folder of images per class (NCT-CRC-HE-100K layout)"
        )
    found = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if classes is not None and found != tuple(classes):
        raise FinetuneError(
            f"tile folder '{root}' has classes {list(found)} but the model was trained on {list(classes)}; the class sub-folders must be the same"
        )
    if len(found) < 2:
        raise FinetuneError(
            f"tile folder '{root}' has {len(found)} class sub-folder(s) ({', '.join(found) or 'none'}); at least 2 are needed"
        )
    files, labels = [], []
    for index, name in enumerate(found):
        images = sorted(
            p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not images:
            raise FinetuneError(
                f"class folder '{root / name}' has no images ({', '.join(IMAGE_SUFFIXES)}); add tiles or remove the folder"
            )
        files += images
        labels += [index] * len(images)
    return LabelledTiles(found, tuple(files), tuple(labels))


def stratified_split(tiles: LabelledTiles, val_fraction: float, seed: int) -> tuple[LabelledTiles, LabelledTiles]:
    """Seeded per-class split: round(n · val_fraction) tiles of each class (at least 1) to validation."""
    rng = np.random.default_rng([seed, 0x5EED])
    labels = np.asarray(tiles.labels)
    train, val = [], []
    for index, name in enumerate(tiles.classes):
        members = np.flatnonzero(labels == index)
        if len(members) < 2:
            raise FinetuneError(
                f"class '{name}' has {len(members)} tile; at least 2 are needed to hold one out for validation (or give finetune.val_dir)"
            )
        members = rng.permutation(members)
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    return tiles.subset(np.sort(train)), tiles.subset(np.sort(val))


def read_tile(path: Path, size: int) -> np.ndarray:
    """An RGB tile as HxWx3 uint8, resized to size × size when it is not already."""
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.array(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise FinetuneError(f"cannot read tile '{path}' ({type(err).__name__}: {err}); replace or remove it") from err


def augment(tile: np.ndarray, settings: AugmentSettings, seed: int) -> np.ndarray:
    """Seeded random flips, 90° rotation and light brightness / colour gains of one HxWx3 uint8 tile."""
    rng = np.random.default_rng(seed)
    draws = rng.random(7)
    if settings.flips:
        tile = tile[:, ::-1] if draws[0] < 0.5 else tile
        tile = tile[::-1] if draws[1] < 0.5 else tile
    if settings.rot90:
        tile = np.rot90(tile, int(draws[2] * 4))
    if settings.colour_jitter:
        gains = (1 + settings.colour_jitter * (2 * draws[3] - 1)) * (1 + settings.colour_jitter * (2 * draws[4:7] - 1))
        tile = np.clip(tile * gains.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(tile)


class TileDataset(torch.utils.data.Dataset):
    """Tiles as (3, px, px) uint8 tensors with their labels.

    Items are indices, or (index, augmentation seed) pairs when augmentation is on, so the
    random draws belong to the sampler and not to the worker that happens to load the tile.
    """

    def __init__(self, tiles: LabelledTiles, input_px: int, augmentation: AugmentSettings | None = None):
        self.tiles, self.input_px, self.augmentation = tiles, input_px, augmentation

    def __len__(self) -> int:
        return len(self.tiles.files)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        tile = read_tile(self.tiles.files[index], self.input_px)
        if self.augmentation is not None and seed is not None:
            tile = augment(tile, self.augmentation, seed)
        return torch.from_numpy(tile).permute(2, 0, 1), self.tiles.labels[index]
