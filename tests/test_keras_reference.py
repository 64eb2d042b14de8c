"""IMGNET-2048 / FTX-2048 are Keras's features: pathwsi's `keras_xception`, loaded from `pathwsi convert-keras`
output of files that Keras itself wrote, gives what Keras computes on the same uint8 tiles.

Keras and TensorFlow run in a subprocess (tests/keras_reference.py), with seeded weights (nothing is
downloaded); they come with the test extra `.[keras]`. The tiles are real images shipped with scikit-image
(an immunohistochemistry section, photographs) and synthetic H&E tiles.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pathwsi.demo.labelled_tiles import render_tile
from pathwsi.features.backbones import ModelSpec, build_backbone, load_weights, resize_tiles
from pathwsi.features.keras_convert import convert_keras

# Not imported here: TensorFlow and torch in one process crash (TensorFlow runs only in the subprocess).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow") is None,
        reason="the Keras reference needs the test extra: pip install -e '.[test,keras]'",
    ),
]

TILE_PX = 224
SIZES = (224, 299, 173, 71)  # as read, enlarged, shrunk to an odd size, Keras's smallest input
FILES = ("xception.keras", "xception.h5", "ftx.keras", "ftx.h5")  # base model; Xception nested in a fine-tuning model
REL_ERROR, COSINE = 1e-4, 0.99999


def real_looking_tiles() -> np.ndarray:
    """(N, 224, 224, 3) uint8: crops of a real IHC section and of photographs, and synthetic H&E tissue."""
    from skimage import data

    ihc, astronaut, coffee = data.immunohistochemistry(), data.astronaut(), data.coffee()
    tiles = [ihc[:224, :224], ihc[280:504, 280:504], astronaut[100:324, 150:374], coffee[50:274, 200:424]]
    tiles += [render_tile(label, 0, seed=3) for label in ("TUM", "STR", "LYM", "MUS")]
    return np.stack(tiles)


@pytest.fixture(scope="module")
def keras_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, dict[str, np.ndarray]]:
    """Keras's files and features: (folder, tiles, reference arrays)."""
    folder = tmp_path_factory.mktemp("keras_reference")
    tiles = real_looking_tiles()
    np.save(folder / "tiles.npy", tiles)
    script = Path(__file__).with_name("keras_reference.py")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(script), str(folder), str(folder / "tiles.npy"), *map(str, SIZES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(folder / "reference.npz") as reference:
        return folder, tiles, dict(reference)


@pytest.fixture(scope="module")
def converted(keras_run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("converted")
    return {name: _convert(keras_run[0] / name, folder / f"{name}.safetensors") for name in FILES}


def _convert(src: Path, dst: Path) -> Path:
    convert_keras(src, dst)
    return dst


def pathwsi_features(weights: Path, tiles: np.ndarray, input_px: int, arch: str = "keras_xception") -> np.ndarray:
    """Features through pathwsi's own load-and-prepare path (float32 on the CPU, as the tests run)."""
    backbone = build_backbone(ModelSpec("m", arch=arch, weights=str(weights), input_px=input_px))
    with torch.inference_mode():
        return backbone.net(backbone.prepare(torch.from_numpy(tiles).permute(0, 3, 1, 2))).numpy()


def agreement(ours: np.ndarray, keras: np.ndarray) -> tuple[float, float]:
    """(largest per-tile relative L2 error, smallest per-tile cosine)."""
    norms = np.linalg.norm(keras, axis=1)
    relative = np.linalg.norm(ours - keras, axis=1) / norms
    cosine = (ours * keras).sum(axis=1) / (np.linalg.norm(ours, axis=1) * norms)
    return float(relative.max()), float(cosine.min())


def test_the_reference_tiles_give_distinct_features(keras_run):
    """A check that can tell networks apart: Keras's features of different tiles differ (not a collapsed net)."""
    features = keras_run[2][f"xception_{TILE_PX}"]
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    off_diagonal = (unit @ unit.T)[~np.eye(len(unit), dtype=bool)]
    assert np.median(off_diagonal) < 0.95, np.median(off_diagonal)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", FILES)
def test_keras_xception_computes_keras_features(keras_run, converted, name, size):
    _, tiles, reference = keras_run
    relative, cosine = agreement(
        pathwsi_features(converted[name], tiles, size), reference[f"{name.split('.')[0]}_{size}"]
    )
    assert relative <= REL_ERROR and cosine >= COSINE, (relative, cosine)


@pytest.mark.parametrize("size", [224, 299, 173])
def test_timm_legacy_xception_does_not(keras_run, converted, size):
    """The same weights in timm's `legacy_xception` (symmetric max-pool padding, eps 1e-5) miss by far more
    than the tolerance at sizes where a stride-2 pool sees an even input: the test above can fail."""
    _, tiles, reference = keras_run
    relative, _ = agreement(
        pathwsi_features(converted["xception.keras"], tiles, size, arch="legacy_xception"),
        reference[f"xception_{size}"],
    )
    assert relative > 100 * REL_ERROR, relative


def test_keras_and_h5_files_convert_to_the_same_tensors(converted):
    for model in ("xception", "ftx"):
        keras_state, _ = load_weights(converted[f"{model}.keras"])
        h5_state, _ = load_weights(converted[f"{model}.h5"])
        assert keras_state.keys() == h5_state.keys()
        assert all(torch.equal(keras_state[k], h5_state[k]) for k in keras_state), model


@pytest.mark.parametrize("size", [s for s in SIZES if s != TILE_PX])
def test_resize_equals_tf_image_resize(keras_run, size):
    """pathwsi's resize to input_px is tf.image.resize bilinear (antialiased when shrinking) on the same uint8
    tiles, to a hundredth of a grey level (the two compute their filter weights in float32 differently)."""
    _, tiles, reference = keras_run
    ours = resize_tiles(torch.from_numpy(tiles).permute(0, 3, 1, 2).float(), size).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, reference[f"resized_{size}"], rtol=0, atol=1e-2)
