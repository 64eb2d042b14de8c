"""Backbone registry: each configured model declares its architecture, weights, input size,
normalization and inference precision, so the loops that use it stay model-agnostic.

Weights are data, not code: safetensors, or `.pth` through `torch.load(weights_only=True)`.
Nothing is downloaded unless the config allows network use. Untrained (seeded) weights are
only used when the config says `weights: untrained`, and every output built from them says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

from pathwsi.errors import PathwsiError
from pathwsi.features.architectures import KERAS_XCEPTION, create_network, has_fixed_bn_eps, set_batchnorm_eps
from pathwsi.runtime.logs import RUN_WIDE
from pathwsi.runtime.outputs import atomic_path

log = logging.getLogger(__name__)
UNTRAINED = "untrained"
UNTRAINED_BASE_KEY = "untrained_base"  # metadata of weights fine-tuned from untrained ones (pathwsi.finetune)
HUB = "hub"
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEAD_PREFIXES = ("fc.", "classifier.", "head.", "last_linear.")
BN_EPS_KEY = "bn_eps"
ARCH_KEY = "arch"  # in a weight file's metadata: the architecture it was trained in (fine-tuned files)


class DeviceError(PathwsiError, ValueError):
    """A device that is asked for but not present."""


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' (CUDA when present, else the CPU, with a warning), 'cpu', 'cuda' or 'cuda:N'."""
    if str(device) == "auto":
        if not torch.cuda.is_available():
            log.warning("no CUDA device: running on the CPU (slow; fine for the demo)", extra=RUN_WIDE)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device '{device}' asked for, but PyTorch sees no CUDA GPU; use cpu or auto")
    return resolved


class WeightsError(PathwsiError):
    """Weights that cannot be loaded; the message names the model, the file and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """One backbone as the config names it (config section `models.backbones.<name>`)."""

    name: str
    arch: str = KERAS_XCEPTION  # pathwsi.features.architectures: keras_xception, or a timm name such as legacy_xception
    weights: str = UNTRAINED  # a .safetensors / .pth path, "hub" (timm's hub cache), or "untrained"
    input_px: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # Keras-style scaling to [-1, 1]
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    precision: str = "bfloat16"  # autocast dtype on CUDA; the CPU computes in float32
    seed: int = 0  # initialisation of untrained weights

    @property
    def untrained(self) -> bool:
        return self.weights == UNTRAINED


@dataclass
class Backbone:
    """A loaded backbone that maps a batch of RGB tiles to pooled features."""

    spec: ModelSpec
    net: torch.nn.Module
    feature_dim: int
    weights_sha256: str
    untrained_base: bool = False  # fine-tuned from untrained weights (its file's metadata says so)

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 or float in [0, 255] -> normalized float32 at the model's input size."""
        x = resize_tiles(batch.float(), self.spec.input_px)
        mean = torch.tensor(self.spec.mean, device=x.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.spec.std, device=x.device).view(1, 3, 1, 1) * 255.0
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    def provenance(self) -> dict[str, Any]:
        """What the features of this model depend on, for the stores' attrs."""
        record = asdict(self.spec)
        record.update(weights_sha256=self.weights_sha256, feature_dim=self.feature_dim, untrained=self.spec.untrained)
        if self.spec.untrained:
            record["warning"] = (
                f"model '{self.spec.name}' has UNTRAINED, randomly initialised weights (seed {self.spec.seed}): its features are for demos and tests only"
            )
        elif self.untrained_base:  # recorded only then, so that the stores of trained models keep their attrs
            record["untrained_base"] = True
            record["warning"] = (
                f"model '{self.spec.name}' was fine-tuned from UNTRAINED base weights: its features are for demos and tests only"
            )
        return record


def resize_tiles(x: torch.Tensor, px: int) -> torch.Tensor:
    """(B, 3, H, W) float -> (B, 3, px, px), bilinear with half-pixel centres: `tf.image.resize(..., "bilinear")`
    when enlarging, and `tf.image.resize(..., "bilinear", antialias=True)` when shrinking (no aliasing)."""
    if x.shape[-2:] == (px, px):
        return x
    return torch.nn.functional.interpolate(x, size=(px, px), mode="bilinear", antialias=True, align_corners=False)


def specs_from_config(models_config: dict[str, Any]) -> dict[str, ModelSpec]:
    """ModelSpecs from a validated config's `models.backbones` mapping, in config order."""
    return {name: _spec(name, entry) for name, entry in models_config["backbones"].items()}


def _spec(name: str, entry: dict[str, Any]) -> ModelSpec:
    """One config entry as a ModelSpec (YAML lists become the spec's tuples)."""
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
    return ModelSpec(name=name, **fields)


def build_backbone(spec: ModelSpec, *, allow_network: bool = False, device: str | torch.device = "cpu") -> Backbone:
    """Create the architecture without its classifier and load the spec's weights."""
    untrained_base = False
    if spec.weights == HUB:
        if not allow_network:
            raise WeightsError(
                f"model '{spec.name}': weights 'hub' need network access, which the config does not allow. "
                "Give a local weights file (models.backbones.<name>.weights: path/to/file.safetensors; `pathwsi weights` writes one), "
                "or set models.allow_network: true."
            )
        net = create_network(spec.arch, pretrained=True)
        digest = state_dict_sha256(net.state_dict())
    elif spec.untrained:
        warnings.warn(
            f"model '{spec.name}' uses UNTRAINED weights (seed {spec.seed}); its features are not meaningful",
            stacklevel=2,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            net = create_network(spec.arch)
        digest = state_dict_sha256(net.state_dict())
    else:
        net = create_network(spec.arch)
        state, metadata = load_weights(Path(spec.weights), spec.name)
        untrained_base = metadata.get(UNTRAINED_BASE_KEY) == "true"
        _check_trained_arch(metadata, spec)
        _load_into(net, state, spec)
        if BN_EPS_KEY in metadata and not has_fixed_bn_eps(spec.arch):
            set_batchnorm_eps(net, float(metadata[BN_EPS_KEY]))
        digest = file_sha256(Path(spec.weights))
    # inputs are channels_last too (prepare); Module.to takes memory_format with a device at run time, its stub not
    net.eval().to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    # timm sets num_features as a plain attribute; torch types Module.__getattr__ as Tensor | Module
    return Backbone(spec, net, int(cast(int, net.num_features)), digest, untrained_base)


def load_weights(path: Path, model_name: str = "?") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict and its metadata from .safetensors (preferred) or .pth (weights_only)."""
    if not path.is_file():
        raise WeightsError(
            f"model '{model_name}': weights file '{path}' not found; fix models.backbones.{model_name}.weights"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: name it and say what to do
        raise WeightsError(
            f"model '{model_name}': cannot read weights '{path}' ({type(err).__name__}: {err}); give a .safetensors or a plain .pth state dict"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"model '{model_name}': '{path}' is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}, {}


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, Any]) -> str:
    """Write a state dict as safetensors with JSON-able metadata, atomically; return its SHA-256."""
    from safetensors.torch import save_file

    with atomic_path(path) as temporary:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()},
            str(temporary),
            metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()},
        )
    return file_sha256(path)


def _load_into(net: torch.nn.Module, state: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    """Load backbone weights, ignoring a classifier head; every backbone tensor must be there."""
    backbone = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    result = net.load_state_dict(backbone, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"model '{spec.name}': '{spec.weights}' does not fit architecture '{spec.arch}' "
            f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected {result.unexpected_keys[:3]}); "
            "check models.backbones.<name>.arch, or convert Keras files with `pathwsi convert-keras`"
        )


def _check_trained_arch(metadata: dict[str, str], spec: ModelSpec) -> None:
    """A fine-tuned file names the architecture it was trained in; it must be the one the config names."""
    trained = metadata.get(ARCH_KEY)
    if trained is not None and trained != spec.arch:
        raise WeightsError(
            f"model '{spec.name}': '{spec.weights}' was trained as architecture '{trained}', but models.backbones.{spec.name}.arch "
            f"is '{spec.arch}'; set arch: {trained}, or fine-tune again from a base of architecture '{spec.arch}'"
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names and tensor bytes (for weights that are not a file)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
