"""The labelled synthetic tissue tiles: layout, determinism, and classes that colour alone does not separate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pathwsi.demo.labelled_tiles import CLASSES, MANIFEST, render_tile, write_tile_set


def test_tiles_are_seeded_and_deterministic():
    first = render_tile("TUM", 3, seed=7, tile_px=64)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, render_tile("TUM", 3, seed=7, tile_px=64))
    assert not np.array_equal(first, render_tile("TUM", 4, seed=7, tile_px=64))
    assert not np.array_equal(first, render_tile("TUM", 3, seed=8, tile_px=64))
    with pytest.raises(ValueError, match="unknown tissue class 'XYZ'"):
        render_tile("XYZ", 0, 0)


def test_tile_set_has_the_nct_layout_and_is_kept_unless_forced(tmp_path):
    out = write_tile_set(tmp_path / "train", n_per_class=2, seed=1, tile_px=48)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == list(CLASSES)
    assert sorted(p.name for p in (out / "STR").iterdir()) == ["STR-0.png", "STR-1.png"]
    assert Image.open(out / "ADI" / "ADI-1.png").size == (48, 48)
    assert json.loads((out / MANIFEST).read_text())["seed"] == 1
    before = (out / "ADI" / "ADI-0.png").stat().st_mtime_ns
    write_tile_set(out, n_per_class=3, seed=2, tile_px=48)
    assert (out / "ADI" / "ADI-0.png").stat().st_mtime_ns == before and not (out / "ADI" / "ADI-2.png").exists()
    write_tile_set(out, n_per_class=3, seed=2, tile_px=48, force=True)
    assert (out / "ADI" / "ADI-2.png").exists() and not (tmp_path / "train.partial").exists()


def test_classes_look_like_their_tissue():
    tiles = {label: np.stack([render_tile(label, i, 0, 96) for i in range(6)]).astype(np.float32) for label in CLASSES}
    brightness = {label: t.mean() for label, t in tiles.items()}
    dark_share = {label: float((t.mean(axis=-1) < 110).mean()) for label, t in tiles.items()}
    assert max(brightness, key=brightness.get) in ("BACK", "ADI")  # glass and empty fat cells
    assert max(dark_share, key=dark_share.get) in ("LYM", "TUM")  # packed nuclei
    assert brightness["BACK"] > 200 and dark_share["LYM"] > 5 * dark_share["STR"]


def test_colour_alone_does_not_separate_the_classes():
    """A classifier on mean and spread of R, G, B must not be perfect: structure has to matter."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = [], []
    for k, label in enumerate(CLASSES):
        for i in range(12):
            tile = render_tile(label, i, 5, 48).reshape(-1, 3).astype(np.float32)
            x.append(np.concatenate([tile.mean(0), tile.std(0)]))
            y.append(k)
    accuracy = cross_val_score(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), np.array(x), np.array(y), cv=4
    ).mean()
    assert 0.3 < accuracy < 0.95
