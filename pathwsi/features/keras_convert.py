"""Import Keras Xception weights into the `keras_xception` / timm `legacy_xception` layout (the same
weight names), with h5py only (no TensorFlow).

Reads the official Keras ImageNet file, a Keras 2 `model.save(...h5)` of a fine-tuned model (Xception
flat or nested as one layer), or a Keras 3 `.keras` archive; writes safetensors whose metadata carries
Keras' BatchNormalization epsilon (1e-3), which `pathwsi.features.backbones.build_backbone` applies.
Layers that are not part of Xception (a classifier head, preprocessing) are skipped and reported.
See docs/keras_convert.md.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from pathwsi.errors import PathwsiError
from pathwsi.features.architectures import KERAS_BN_EPS, LEGACY_XCEPTION
from pathwsi.features.backbones import file_sha256, save_weights

CONVERTED_BY = "pathwsi convert-keras"
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
# Variables per layer kind, in the order Keras stores them, and their number of dimensions.
KERAS_VARIABLES = {
    "conv": ("kernel",),
    "sep": ("depthwise_kernel", "pointwise_kernel"),
    "bn": ("gamma", "beta", "moving_mean", "moving_variance"),
}
NDIMS = {"conv": (4,), "sep": (4, 4), "bn": (1, 1, 1, 1)}
# timm blocks with a shortcut convolution (unnamed 1x1 Conv2D + BatchNormalization in Keras): (in, out) channels.
SHORTCUTS = {1: (64, 128), 2: (128, 256), 3: (256, 728), 12: (728, 1024)}


class KerasConversionError(PathwsiError, ValueError):
    """A file that cannot be converted; the message names the file, what was expected and what was found."""


@dataclass(frozen=True)
class Slot:
    """One weight layer of Keras Xception and the timm module it becomes."""

    keras: str  # the Keras layer name, or a description of an unnamed shortcut layer
    timm: str  # timm module prefix
    kind: str  # conv | sep | bn
    shape_key: tuple[str | int, ...] | None = None  # how an unnamed shortcut layer is recognised

    @property
    def named(self) -> bool:
        return self.shape_key is None


@dataclass(frozen=True)
class KerasLayer:
    """A layer with weights as read from a file."""

    path: str  # where it sits, e.g. "xception/block1_conv1"
    name: str  # its Keras name, e.g. "block1_conv1"
    arrays: tuple[np.ndarray, ...]  # in Keras order


@dataclass
class ConversionReport:
    """What `convert_keras` wrote."""

    n_tensors: int  # tensors in the output, num_batches_tracked included
    skipped_layers: list[str]  # layers with weights that are not Xception (classifier head, preprocessing)
    source_sha256: str
    dst_sha256: str
    keras_format: str  # "h5" or "keras"

    def summary(self) -> str:
        skipped = ", ".join(self.skipped_layers) or "none"
        return (
            f"converted a Keras {self.keras_format} file (sha256 {self.source_sha256}) into {self.n_tensors} tensors "
            f"of Xception (keras_xception; timm legacy_xception names), BatchNorm eps {KERAS_BN_EPS}\n"
            f"output sha256: {self.dst_sha256}\n"
            f"skipped layers (not Xception): {skipped}"
        )


def _xception_slots() -> list[Slot]:
    """Every weight layer of keras.applications.Xception, in the order Keras builds them."""
    slots = [
        Slot("block1_conv1", "conv1", "conv"),
        Slot("block1_conv1_bn", "bn1", "bn"),
        Slot("block1_conv2", "conv2", "conv"),
        Slot("block1_conv2_bn", "bn2", "bn"),
    ]
    for keras_block in range(2, 14):
        block = keras_block - 1  # timm counts the middle blocks from 1
        if block in SHORTCUTS:
            c_in, c_out = SHORTCUTS[block]
            where = f"{c_in}->{c_out} shortcut of block{keras_block}"
            slots += [
                Slot(f"unnamed Conv2D {where}", f"block{block}.skip", "conv", ("conv", c_in, c_out)),
                Slot(f"unnamed BatchNormalization {where}", f"block{block}.skipbn", "bn", ("bn", c_out)),
            ]
        first = 0 if keras_block == 2 else 1  # timm's block1 has no leading ReLU in `rep`
        for index in range(3 if 5 <= keras_block <= 12 else 2):
            name, position = f"block{keras_block}_sepconv{index + 1}", first + 3 * index
            slots += [
                Slot(name, f"block{block}.rep.{position}", "sep"),
                Slot(f"{name}_bn", f"block{block}.rep.{position + 1}", "bn"),
            ]
    return slots + [
        Slot("block14_sepconv1", "conv3", "sep"),
        Slot("block14_sepconv1_bn", "bn3", "bn"),
        Slot("block14_sepconv2", "conv4", "sep"),
        Slot("block14_sepconv2_bn", "bn4", "bn"),
    ]


SLOTS = _xception_slots()
NAMED_SLOTS = {slot.keras: slot for slot in SLOTS if slot.named}
SHORTCUT_SLOTS = {slot.shape_key: slot for slot in SLOTS if not slot.named}


def convert_keras(src: Path, dst: Path, provenance: dict[str, str] | None = None) -> ConversionReport:
    """Convert a Keras Xception weight file (.h5 or .keras) into a safetensors file for `keras_xception`;
    `provenance` adds to the file's metadata."""
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise KerasConversionError(f"'{dst}': the output must be a .safetensors file")
    if not src.is_file():
        raise KerasConversionError(f"'{src}': no such file")
    try:
        keras_format, layers = _read_layers(src)
        state, skipped = _to_timm(layers)
    except KerasConversionError as err:
        raise KerasConversionError(f"'{src}': {err}") from None
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise KerasConversionError(
            f"'{src}': cannot be read as a Keras weight file ({type(err).__name__}: {err})"
        ) from err
    source_sha256 = file_sha256(src)
    metadata = {
        "bn_eps": str(KERAS_BN_EPS),
        "source_file": src.name,
        "source_sha256": source_sha256,
        "converted_by": CONVERTED_BY,
        "keras_format": keras_format,
        **(provenance or {}),
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst_sha256 = save_weights(state, dst, metadata)
    return ConversionReport(len(state), skipped, source_sha256, dst_sha256, keras_format)


# --- reading Keras files -------------------------------------------------------------------------


def _read_layers(src: Path) -> tuple[str, list[KerasLayer]]:
    """The file's format and its layers with weights, in the file's layer order."""
    if zipfile.is_zipfile(src):
        return "keras", _keras_archive_layers(src)
    if h5py.is_hdf5(src):
        return "h5", _h5_layers(src)
    raise KerasConversionError("neither an HDF5 (.h5) file nor a .keras zip archive")


def _h5_layers(src: Path) -> list[KerasLayer]:
    """Keras 1/2 HDF5: `save_weights` (layers at the root) or `model.save` (layers under model_weights)."""
    with h5py.File(src, "r") as handle:
        root = handle["model_weights"] if "model_weights" in handle else handle
        names = _string_list(root, "layer_names")
        if not names:
            hint = ""
            if "layers" in root or "vars" in root:
                hint = "; this looks like a Keras 3 .weights.h5, which stores no layer names: save the model as .keras and convert that"
            raise KerasConversionError(
                f"no 'layer_names' attribute, so not a Keras HDF5 weight file (top-level keys: {sorted(root)[:8]}){hint}"
            )
        return [layer for name in names for layer in _h5_group_layers(root[name], name)]


def _h5_group_layers(group: h5py.Group, name: str) -> list[KerasLayer]:
    """One layer, or the layers of a nested model saved as one group with weights named '<layer>/<weight>'."""
    weight_names = _string_list(group, "weight_names")
    owners = [_owner(weight, name) for weight in weight_names]
    if len(set(owners)) <= 1:
        return [KerasLayer(name, name, tuple(_array(group[weight]) for weight in weight_names))]
    arrays: dict[str, list[np.ndarray]] = {}
    for owner, weight in zip(owners, weight_names):  # a layer's variables keep their relative order
        arrays.setdefault(owner, []).append(_array(group[weight]))
    return [KerasLayer(f"{name}/{owner}", owner, tuple(values)) for owner, values in arrays.items()]


def _owner(weight_name: str, default: str) -> str:
    """The layer a weight belongs to: 'block1_conv1/kernel:0' -> 'block1_conv1'."""
    parts = weight_name.split("/")
    return parts[-2] if len(parts) > 1 else default


def _string_list(group: h5py.Group, attr: str) -> list[str]:
    """A list-of-strings attribute, also when Keras split it into chunks (`attr0`, `attr1`, ...)."""
    if attr in group.attrs:
        chunks = [group.attrs[attr]]
    else:
        chunks = []
        while f"{attr}{len(chunks)}" in group.attrs:
            chunks.append(group.attrs[f"{attr}{len(chunks)}"])
    return [value.decode("utf8") if isinstance(value, bytes) else str(value) for chunk in chunks for value in chunk]


def _keras_archive_layers(src: Path) -> list[KerasLayer]:
    """Keras 3 `.keras`: config.json gives the layer names, model.weights.h5 the variables."""
    with zipfile.ZipFile(src) as archive:
        members = archive.namelist()
        if "config.json" not in members or "model.weights.h5" not in members:
            raise KerasConversionError(
                f".keras archive without config.json and model.weights.h5 (it holds {members[:6]})"
            )
        config = json.loads(archive.read("config.json"))
        with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as weights:
            return _keras_model_layers(config, weights, "")


def _keras_model_layers(model_config: dict, group: h5py.Group, path: str) -> list[KerasLayer]:
    """Layers of a Functional or Sequential model, nested models included, in config order.

    Keras 3 stores the n-th layer of class C (counting from 0) under `layers/<c>_<n>` (just `<c>` for the
    first), with <c> the snake-cased class name, not under the layer's name.
    """
    layer_configs = model_config.get("config", {}).get("layers")
    if layer_configs is None:
        raise KerasConversionError(
            f"config.json: model '{path or 'top'}' has no layer list (subclassed models are not supported)"
        )
    if "layers" not in group:
        raise KerasConversionError(
            f"model.weights.h5 has no 'layers' group at '{group.name}' (keys: {sorted(group)[:8]}); "
            ".keras files from tf.keras 2.13-2.15 are not supported: re-save with Keras 3, or as .h5"
        )
    counts: Counter[str] = Counter()
    layers = []
    for layer_config in layer_configs:
        class_key = _snake_case(layer_config["class_name"])
        key = f"{class_key}_{counts[class_key]}" if counts[class_key] else class_key
        counts[class_key] += 1
        name = layer_config.get("config", {}).get("name") or layer_config.get("name", key)
        entry = group["layers"].get(key)
        if entry is None:
            continue
        if "layers" in layer_config.get("config", {}):
            layers += _keras_model_layers(layer_config, entry, f"{path}{name}/")
        elif "vars" in entry:
            variables = entry["vars"]
            layers.append(
                KerasLayer(f"{path}{name}", name, tuple(_array(variables[k]) for k in sorted(variables, key=int)))
            )
    return layers


def _snake_case(class_name: str) -> str:
    """Keras' `to_snake_case`: 'SeparableConv2D' -> 'separable_conv2d'."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _array(dataset: h5py.Dataset) -> np.ndarray:
    if dataset.dtype.kind != "f":
        raise KerasConversionError(f"weight '{dataset.name}' has dtype {dataset.dtype}, expected floating point")
    return np.asarray(dataset[()], dtype=np.float32)


# --- mapping onto timm ---------------------------------------------------------------------------


def _to_timm(layers: list[KerasLayer]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Assign each layer to its Xception slot and convert; return the state dict and the skipped layers."""
    found, skipped = _assign(layers)
    if not any(slot.named for slot in found):
        names = [layer.path for layer in layers if layer.arrays]
        raise KerasConversionError(
            f"no Keras Xception layers in it (expected layers named block1_conv1 ... block14_sepconv2_bn); "
            f"its layers with weights: {names[:10]}{' ...' if len(names) > 10 else ''}"
        )
    missing = [slot.keras for slot in SLOTS if slot not in found]
    if missing:
        raise KerasConversionError(
            f"not a complete Keras Xception: {len(missing)} of its {len(SLOTS)} weight layers are missing: {missing[:6]}{' ...' if len(missing) > 6 else ''}"
        )
    reference = _reference_shapes()
    state: dict[str, torch.Tensor] = {}
    for slot, layer in found.items():
        state.update(_convert(slot, layer, reference))
    state.update({key: torch.zeros((), dtype=torch.long) for key in reference if key.endswith("num_batches_tracked")})
    return state, skipped


def _assign(layers: list[KerasLayer]) -> tuple[dict[Slot, KerasLayer], list[str]]:
    """Xception layers by name; the unnamed shortcut layers by shape, first in layer order (a head comes later)."""
    found: dict[Slot, KerasLayer] = {}
    skipped = []
    for layer in (layer for layer in layers if layer.arrays):
        slot = NAMED_SLOTS.get(layer.name) or SHORTCUT_SLOTS.get(_shape_key(layer))
        if slot is not None and slot.named and slot in found:
            raise KerasConversionError(
                f"two layers named '{layer.name}' ({found[slot].path}, {layer.path}): more than one Xception in one file is not supported"
            )
        if slot is None or slot in found:
            skipped.append(layer.path)
        else:
            found[slot] = layer
    return found, skipped


def _shape_key(layer: KerasLayer) -> tuple[str | int, ...] | None:
    """('conv', in, out) for a 1x1 convolution kernel, ('bn', channels) for four equal vectors."""
    arrays = layer.arrays
    if len(arrays) == 1 and arrays[0].ndim == 4 and arrays[0].shape[:2] == (1, 1):
        return ("conv", *arrays[0].shape[2:])
    if len(arrays) == 4 and all(a.ndim == 1 and a.shape == arrays[0].shape for a in arrays):
        return ("bn", arrays[0].shape[0])
    return None


def _convert(slot: Slot, layer: KerasLayer, reference: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The timm tensors of one Keras layer, checked against timm's shapes."""
    shapes = [a.shape for a in layer.arrays]
    what = f"'{layer.path}'" if slot.named else f"'{layer.path}' (the {slot.keras})"
    if tuple(a.ndim for a in layer.arrays) != NDIMS[slot.kind]:
        extra = " (Xception convolutions have no bias)" if len(shapes) > len(NDIMS[slot.kind]) else ""
        raise KerasConversionError(
            f"layer {what} should hold {' + '.join(KERAS_VARIABLES[slot.kind])} with {NDIMS[slot.kind]} dimensions; "
            f"found arrays of shapes {shapes}{extra}"
        )
    tensors = _timm_arrays(slot, layer.arrays)
    for key, value in tensors.items():
        if value.shape != reference[key]:
            raise KerasConversionError(
                f"layer {what} has arrays of shapes {shapes}, which do not fit timm '{key}' {reference[key]}"
            )
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in tensors.items()}


def _timm_arrays(slot: Slot, arrays: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
    """Keras kernels are (kh, kw, in, out), depthwise kernels (kh, kw, in, 1); torch wants (out, in, kh, kw)."""
    if slot.kind == "conv":
        return {f"{slot.timm}.weight": arrays[0].transpose(3, 2, 0, 1)}
    if slot.kind == "sep":
        return {
            f"{slot.timm}.conv1.weight": arrays[0].transpose(2, 3, 0, 1),
            f"{slot.timm}.pointwise.weight": arrays[1].transpose(3, 2, 0, 1),
        }
    return {f"{slot.timm}.{field}": value for field, value in zip(BN_FIELDS, arrays)}


def _reference_shapes() -> dict[str, tuple[int, ...]]:
    """timm's `legacy_xception` state dict shapes (keras_xception's too), without classifier (built on the meta device: no memory)."""
    import timm

    with torch.device("meta"):
        net = timm.create_model(LEGACY_XCEPTION, pretrained=False, num_classes=0)
    return {key: tuple(value.shape) for key, value in net.state_dict().items()}
