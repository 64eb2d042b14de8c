"""How closely pathwsi's features match Keras's: the figures behind docs/keras_convert.md.

Runs tests/keras_reference.py (Keras 3 + TensorFlow in a subprocess; needs `pip install -e '.[keras]'`)
on the tiles of tests/test_keras_reference.py, converts the files Keras wrote, and prints for each file,
architecture and input size the largest per-tile relative L2 error, the smallest cosine and the relative
mean absolute error against Keras.

    python benchmarks/bench_keras_agreement.py [--sizes 224 299 173 71]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_keras_reference import FILES, agreement, pathwsi_features, real_looking_tiles  # noqa: E402

from pathwsi.features.keras_convert import convert_keras  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 299, 173, 71])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        tiles = real_looking_tiles()
        np.save(work / "tiles.npy", tiles)
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "tests" / "keras_reference.py"),
                str(work),
                str(work / "tiles.npy"),
                *map(str, args.sizes),
            ],
            check=True,
            capture_output=True,
        )
        reference = dict(np.load(work / "reference.npz"))
        keras_version, tf_version = reference["versions"]
        unit = reference[f"xception_{args.sizes[0]}"] / np.linalg.norm(
            reference[f"xception_{args.sizes[0]}"], axis=1, keepdims=True
        )
        print(
            f"Keras {keras_version}, TensorFlow {tf_version}; {len(tiles)} tiles; median cosine between two tiles' Keras features: "
            f"{np.median((unit @ unit.T)[~np.eye(len(unit), dtype=bool)]):.3f}"
        )
        print(f"{'file':<16} {'arch':<16} {'px':>4} {'max rel L2':>11} {'min cosine':>11} {'rel MAE':>9}")
        for name in FILES:
            weights = work / f"{name}.safetensors"
            convert_keras(work / name, weights)
            for arch in ("keras_xception", "legacy_xception"):
                for size in args.sizes:
                    ours, keras = (
                        pathwsi_features(weights, tiles, size, arch),
                        reference[f"{name.split('.')[0]}_{size}"],
                    )
                    relative, cosine = agreement(ours, keras)
                    print(
                        f"{name:<16} {arch:<16} {size:>4} {relative:>11.2e} {cosine:>11.7f} {np.abs(ours - keras).mean() / np.abs(keras).mean():>9.2e}"
                    )


if __name__ == "__main__":
    main()
