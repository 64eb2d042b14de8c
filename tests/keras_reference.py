"""Keras's own Xception features for tests/test_keras_reference.py, computed in a separate process
(TensorFlow stays out of the test process).

    python tests/keras_reference.py OUT_DIR TILES.npy SIZE [SIZE ...]

Builds `keras.applications.Xception(weights=None, include_top=False, pooling="avg")` with seeded weights,
random BatchNorm gamma and beta and moving statistics measured on the tiles, saves it as `.keras` and legacy `.h5`, and a
fine-tuning-style model (the Xception nested as one layer, then a Dense head) likewise. For each SIZE it
resizes the uint8 tiles with `tf.image.resize(..., "bilinear")` (antialiased when shrinking), applies
`keras.applications.xception.preprocess_input` and writes the pooled features of both models to
OUT_DIR/reference.npz, with the resized tiles.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SEED = 7
N_CLASSES = 9


def calibrate_batchnorm(model: keras.Model, x: np.ndarray, rng: np.random.Generator) -> None:
    """Random gamma and beta, and moving statistics near the batch statistics of the tiles (as a trained
    network's BatchNorm holds, so that activations neither vanish nor explode and features differ between
    tiles). One training-mode pass gives every BatchNorm's input as the calibrated network sees it."""
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        n = layer.gamma.shape[0]
        layer.gamma.assign(rng.uniform(0.5, 1.5, n))
        layer.beta.assign(rng.normal(0.0, 0.2, n))
    inputs = keras.Model(model.inputs[0], [layer.input for layer in norms])(x, training=True)
    for layer, values in zip(norms, inputs):
        values = np.asarray(values)
        layer.moving_mean.assign(values.mean(axis=(0, 1, 2)))
        layer.moving_variance.assign(values.var(axis=(0, 1, 2)) * rng.uniform(0.8, 1.25, values.shape[-1]))


def build(x: np.ndarray) -> tuple[keras.Model, keras.Model, keras.Model]:
    """The seeded base Xception, a fine-tuning model around a second one (own seeded weights), and that one."""
    keras.utils.set_random_seed(SEED)
    base = keras.applications.Xception(weights=None, include_top=False, pooling="avg", input_shape=(None, None, 3))
    calibrate_batchnorm(base, x, np.random.default_rng(SEED))
    inner = keras.applications.Xception(weights=None, include_top=False, pooling="avg", input_shape=(None, None, 3))
    calibrate_batchnorm(inner, x, np.random.default_rng(SEED + 1))
    inputs = keras.Input((None, None, 3))
    head = keras.layers.Dense(N_CLASSES, activation="softmax", name="predictions")(
        keras.layers.Dropout(0.2)(inner(inputs))
    )
    return base, keras.Model(inputs, head, name="ftx"), inner


def resize(tiles: np.ndarray, size: int) -> np.ndarray:
    """tf.image.resize bilinear (half-pixel centres), antialiased when shrinking, as float32."""
    if size == tiles.shape[1]:
        return tiles.astype(np.float32)
    return tf.image.resize(tiles, (size, size), method="bilinear", antialias=size < tiles.shape[1]).numpy()


def main(out_dir: Path, tiles_path: Path, sizes: list[int]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles = np.load(tiles_path)
    base, ftx, ftx_base = build(keras.applications.xception.preprocess_input(tiles.astype(np.float32)))
    for name, model in (("xception", base), ("ftx", ftx)):
        model.save(out_dir / f"{name}.keras")
        model.save(out_dir / f"{name}.h5")
    results: dict[str, np.ndarray] = {}
    for size in sizes:
        resized = resize(tiles, size)
        x = keras.applications.xception.preprocess_input(resized.copy())
        results[f"resized_{size}"] = resized
        results[f"xception_{size}"] = base.predict(x, batch_size=8, verbose=0)
        results[f"ftx_{size}"] = ftx_base.predict(x, batch_size=8, verbose=0)
    np.savez(out_dir / "reference.npz", **results, versions=np.array([keras.__version__, tf.__version__]))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [int(s) for s in sys.argv[3:]])
