"""`convert_keras` round trip: Keras-layout files written here with h5py from a random timm Xception.

The inverse mapping below is written from the Keras side (keras.applications.Xception's layer names and
order) and timm's module tree, independently of the converter's table.
"""

from __future__ import annotations

import copy
import io
import json
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from timm.models.xception import SeparableConv2d

from pathwsi.features.backbones import ModelSpec, build_backbone, file_sha256, load_weights, set_batchnorm_eps
from pathwsi.features.keras_convert import KerasConversionError, convert_keras

KERAS_VARIABLES = {
    "Conv2D": ("kernel",),
    "SeparableConv2D": ("depthwise_kernel", "pointwise_kernel"),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "Dense": ("kernel", "bias"),
}
TRAINABLE = {"kernel", "depthwise_kernel", "pointwise_kernel", "gamma", "beta", "bias"}
KERAS3_PATH = {
    "InputLayer": "input_layer",
    "Activation": "activation",
    "Conv2D": "conv2d",
    "SeparableConv2D": "separable_conv2d",
    "BatchNormalization": "batch_normalization",
    "Functional": "functional",
    "GlobalAveragePooling2D": "global_average_pooling2d",
    "Dense": "dense",
}


@dataclass(frozen=True)
class KLayer:
    name: str
    cls: str
    arrays: tuple[np.ndarray, ...] = ()


# --- the inverse mapping: timm -> Keras ----------------------------------------------------------


def keras_layers(net: torch.nn.Module, first_auto: int) -> list[KLayer]:
    """The weight layers of keras.applications.Xception in its build order, filled from a timm net.

    Shortcut layers get Keras auto names counted from `first_auto` (Keras 2.0: conv2d_1; tf.keras: conv2d)."""
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}

    def conv(name: str, key: str) -> KLayer:  # torch (out, in, kh, kw) -> Keras (kh, kw, in, out)
        return KLayer(name, "Conv2D", (state[f"{key}.weight"].transpose(2, 3, 1, 0),))

    def sep(name: str, key: str) -> KLayer:  # depthwise (in, 1, kh, kw) -> (kh, kw, in, 1)
        return KLayer(
            name,
            "SeparableConv2D",
            (
                state[f"{key}.conv1.weight"].transpose(2, 3, 0, 1),
                state[f"{key}.pointwise.weight"].transpose(2, 3, 1, 0),
            ),
        )

    def bn(name: str, key: str) -> KLayer:
        return KLayer(
            name,
            "BatchNormalization",
            tuple(state[f"{key}.{f}"] for f in ("weight", "bias", "running_mean", "running_var")),
        )

    def auto(base: str, n: int) -> str:
        return base if n == 0 else f"{base}_{n}"

    layers = [
        conv("block1_conv1", "conv1"),
        bn("block1_conv1_bn", "bn1"),
        conv("block1_conv2", "conv2"),
        bn("block1_conv2_bn", "bn2"),
    ]
    n_shortcuts = first_auto
    for i in range(1, 13):
        block = getattr(net, f"block{i}")
        if block.skip is not None:  # Keras creates the shortcut before the block's separable convolutions
            layers += [
                conv(auto("conv2d", n_shortcuts), f"block{i}.skip"),
                bn(auto("batch_normalization", n_shortcuts), f"block{i}.skipbn"),
            ]
            n_shortcuts += 1
        parts = [
            name for name, m in block.rep.named_children() if isinstance(m, (SeparableConv2d, torch.nn.BatchNorm2d))
        ]
        for k, (sep_index, bn_index) in enumerate(zip(parts[::2], parts[1::2]), start=1):
            layers += [
                sep(f"block{i + 1}_sepconv{k}", f"block{i}.rep.{sep_index}"),
                bn(f"block{i + 1}_sepconv{k}_bn", f"block{i}.rep.{bn_index}"),
            ]
    return layers + [
        sep("block14_sepconv1", "conv3"),
        bn("block14_sepconv1_bn", "bn3"),
        sep("block14_sepconv2", "conv4"),
        bn("block14_sepconv2_bn", "bn4"),
    ]


def head_layers(seed: int) -> list[KLayer]:
    """A fine-tuning head: Dense 2048->1024, an auto-named BatchNormalization(1024) (shaped like Xception's
    last shortcut BN, so only its place in the file tells them apart) and a 9-class Dense."""
    rng = np.random.default_rng(seed)

    def dense(name: str, n_in: int, n_out: int) -> KLayer:
        return KLayer(name, "Dense", (rng.normal(size=(n_in, n_out)).astype("f4"), np.zeros(n_out, "f4")))

    bn = KLayer("batch_normalization_9", "BatchNormalization", tuple(rng.random(1024).astype("f4") for _ in range(4)))
    return [dense("fc1", 2048, 1024), bn, dense("predictions", 1024, 9)]


# --- writers for the three layouts ---------------------------------------------------------------


def write_layer_groups(root: h5py.Group, layers: list[KLayer]) -> None:
    """Keras 2 `save_weights_to_hdf5_group`: layer_names, one group per layer, weight_names '<layer>/<var>:0'."""
    root.attrs["layer_names"] = [layer.name.encode() for layer in layers]
    root.attrs["backend"], root.attrs["keras_version"] = b"tensorflow", b"2.2.4"
    for layer in layers:
        group = root.create_group(layer.name)
        names = [f"{layer.name}/{var}:0" for var in KERAS_VARIABLES.get(layer.cls, ())]
        group.attrs["weight_names"] = [n.encode() for n in names]
        for name, array in zip(names, layer.arrays):
            group.create_dataset(name, data=array)


def write_weights_h5(path: Path, base: list[KLayer]) -> Path:
    """Layout 1, the official notop file: `model.save_weights('x.h5')`, weightless layers included."""
    with h5py.File(path, "w") as handle:
        write_layer_groups(
            handle, [KLayer("input_1", "InputLayer"), *base[:4], KLayer("block1_conv2_act", "Activation"), *base[4:]]
        )
    return path


def write_model_h5(path: Path, base: list[KLayer], head: list[KLayer]) -> Path:
    """Layout 2: `model.save('x.h5')` of a fine-tuned model with Xception nested as the layer 'xception'.

    A nested model's group lists trainable variables first, then the moving statistics."""
    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = json.dumps({"class_name": "Functional", "config": {"name": "ftx"}}).encode()
        weights = handle.create_group("model_weights")
        write_layer_groups(
            weights,
            [
                KLayer("input_2", "InputLayer"),
                KLayer("xception", "Functional"),
                KLayer("avg_pool", "GlobalAveragePooling2D"),
                *head,
            ],
        )
        nested = [
            (f"{layer.name}/{var}:0", array)
            for layer in base
            for var, array in zip(KERAS_VARIABLES[layer.cls], layer.arrays)
        ]
        nested.sort(
            key=lambda item: item[0].split("/")[1].removesuffix(":0") not in TRAINABLE
        )  # stable: keeps layer order
        weights["xception"].attrs["weight_names"] = [name.encode() for name, _ in nested]
        for name, array in nested:
            weights["xception"].create_dataset(name, data=array)
    return path


def write_keras3(path: Path, base: list[KLayer], head: list[KLayer]) -> Path:
    """Layout 3: a Keras 3 `.keras` zip; weights live under layers/<class>_<n>/vars/<i>, not under layer names."""

    def config(layer: KLayer) -> dict:
        return {"module": "keras.layers", "class_name": layer.cls, "config": {"name": layer.name}, "name": layer.name}

    inner = [KLayer("input_layer", "InputLayer"), *base[:4], KLayer("block1_conv2_act", "Activation"), *base[4:]]
    outer = [
        KLayer("input_layer_1", "InputLayer"),
        KLayer("xception", "Functional"),
        KLayer("avg_pool", "GlobalAveragePooling2D"),
        *head,
    ]
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as weights:
        write_keras3_layers(weights.create_group("layers"), outer, {"xception": inner})
    model_config = {
        "class_name": "Functional",
        "config": {
            "name": "ftx",
            "layers": [
                {**config(layer), "config": {"name": layer.name, "layers": [config(x) for x in inner]}}
                if layer.name == "xception"
                else config(layer)
                for layer in outer
            ],
        },
    }
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.10.0"}))
        archive.writestr("config.json", json.dumps(model_config))
        archive.writestr("model.weights.h5", buffer.getvalue())
    return path


def write_keras3_layers(container: h5py.Group, layers: list[KLayer], nested: dict[str, list[KLayer]]) -> None:
    counts: Counter[str] = Counter()
    for layer in layers:
        base = KERAS3_PATH[layer.cls]
        group = container.create_group(f"{base}_{counts[base]}" if counts[base] else base)
        counts[base] += 1
        variables = group.create_group("vars")
        for index, array in enumerate(layer.arrays):
            variables.create_dataset(str(index), data=array)
        if layer.name in nested:
            write_keras3_layers(group.create_group("layers"), nested[layer.name], {})


# --- fixtures ------------------------------------------------------------------------------------


def seeded_xception(seed: int) -> torch.nn.Module:
    """A seeded random legacy_xception with non-trivial BatchNorm parameters and statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = timm.create_model("legacy_xception", pretrained=False, num_classes=0)
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def original() -> torch.nn.Module:
    return seeded_xception(3)


@pytest.fixture(scope="module")
def batch_and_features(original: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch and the original net's features for it, with Keras' BatchNorm eps."""
    reference = copy.deepcopy(original)
    set_batchnorm_eps(reference, 1e-3)
    batch = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), one_thread():
        return batch, reference(batch)


@contextmanager
def one_thread() -> Iterator[None]:
    """For a tiny batch, waking OpenMP threads costs more than the work (seconds on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def keras_files(original: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keras")
    head = head_layers(seed=5)
    return {
        "weights_h5": write_weights_h5(
            folder / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", keras_layers(original, first_auto=1)
        ),
        "model_h5": write_model_h5(folder / "ftx_model.h5", keras_layers(original, first_auto=0), head),
        "keras3": write_keras3(folder / "ftx.keras", keras_layers(original, first_auto=0), head),
    }


# --- tests ---------------------------------------------------------------------------------------


def test_inverse_mapping_covers_every_timm_tensor(original: torch.nn.Module) -> None:
    layers = keras_layers(original, first_auto=1)
    n_tensors = {"Conv2D": 1, "SeparableConv2D": 2, "BatchNormalization": 4}
    weights = [k for k in original.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(layers) == 80 and sum(n_tensors[layer.cls] for layer in layers) == len(weights) == 234


@pytest.mark.parametrize(
    ("layout", "keras_format", "skipped"),
    [
        ("weights_h5", "h5", []),
        ("model_h5", "h5", ["fc1", "batch_normalization_9", "predictions"]),
        ("keras3", "keras", ["fc1", "batch_normalization_9", "predictions"]),
    ],
)
def test_round_trip(
    layout: str,
    keras_format: str,
    skipped: list[str],
    keras_files: dict[str, Path],
    original: torch.nn.Module,
    batch_and_features: tuple[torch.Tensor, torch.Tensor],
    tmp_path: Path,
) -> None:
    src, dst = keras_files[layout], tmp_path / "converted.safetensors"
    report = convert_keras(src, dst)

    assert (report.keras_format, report.skipped_layers, report.n_tensors) == (keras_format, skipped, 274)
    assert report.source_sha256 == file_sha256(src) and report.dst_sha256 == file_sha256(dst)
    assert f"not Xception): {', '.join(skipped) or 'none'}" in report.summary()
    _, metadata = load_weights(dst)
    assert metadata == {
        "bn_eps": "0.001",
        "source_file": src.name,
        "source_sha256": report.source_sha256,
        "converted_by": "pathwsi convert-keras",
        "keras_format": keras_format,
    }

    backbone = build_backbone(ModelSpec("x", weights=str(dst)))
    converted, expected = backbone.net.state_dict(), original.state_dict()
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
    eps = {m.eps for m in backbone.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert eps == {1e-3}

    batch, features = batch_and_features
    with torch.no_grad(), one_thread():
        torch.testing.assert_close(backbone.net(batch), features, atol=1e-5, rtol=0)


def test_not_an_xception_names_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    small_cnn = [
        KLayer("conv2d_1", "Conv2D", (rng.random((3, 3, 3, 16), "f4"),)),
        KLayer("dense_1", "Dense", (rng.random((16, 2), "f4"), np.zeros(2, "f4"))),
    ]
    with h5py.File(tmp_path / "small_cnn.h5", "w") as handle:
        write_layer_groups(handle, small_cnn)
    with pytest.raises(KerasConversionError, match=r"small_cnn\.h5.*no Keras Xception layers.*conv2d_1"):
        convert_keras(tmp_path / "small_cnn.h5", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_incomplete_xception_lists_missing_layers(original: torch.nn.Module, tmp_path: Path) -> None:
    src = write_weights_h5(tmp_path / "truncated.h5", keras_layers(original, first_auto=1)[:-2])
    with pytest.raises(KerasConversionError, match=r"truncated\.h5.*2 of its 80 .*block14_sepconv2"):
        convert_keras(src, tmp_path / "out.safetensors")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a weight file", "neither an HDF5"),
        (None, "Keras 3 .weights.h5"),
    ],
)
def test_unreadable_files_name_the_file(content: bytes | None, message: str, tmp_path: Path) -> None:
    src = tmp_path / "weights.h5"
    if content is None:  # a Keras 3 `save_weights` file: no layer names anywhere
        with h5py.File(src, "w") as handle:
            handle.create_dataset("layers/conv2d/vars/0", data=np.zeros((3, 3, 3, 32), "f4"))
    else:
        src.write_bytes(content)
    with pytest.raises(KerasConversionError, match=rf"weights\.h5.*{message}"):
        convert_keras(src, tmp_path / "out.safetensors")


def test_cli_converts_and_reports(
    keras_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathwsi.cli import main

    dst = tmp_path / "imagenet.safetensors"
    assert main(["convert-keras", str(keras_files["weights_h5"]), str(dst)]) == 0
    assert dst.is_file() and "274" in capsys.readouterr().out
    assert main(["convert-keras", str(tmp_path / "missing.h5"), str(dst)]) == 2
    assert "missing.h5" in capsys.readouterr().err
