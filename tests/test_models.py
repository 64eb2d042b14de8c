"""The backbone registry: weights sources, provenance, errors, and config defaults."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pathwsi.config import load_schema, validate_config
from pathwsi.features.backbones import ModelSpec, WeightsError, build_backbone, save_weights, specs_from_config

pytestmark = pytest.mark.filterwarnings("ignore:model '.*' uses UNTRAINED weights")


@pytest.fixture(scope="module")
def untrained():
    return build_backbone(ModelSpec("imgnet", seed=3))


def test_untrained_weights_are_seeded_and_flagged(untrained):
    again = build_backbone(ModelSpec("imgnet", seed=3))
    other = build_backbone(ModelSpec("imgnet", seed=4))
    assert untrained.weights_sha256 == again.weights_sha256 != other.weights_sha256
    provenance = untrained.provenance()
    assert provenance["untrained"] is True and "UNTRAINED" in provenance["warning"]
    with pytest.warns(UserWarning, match="UNTRAINED"):
        build_backbone(ModelSpec("imgnet"))


def test_features_are_2048_d_and_inputs_are_resized(untrained):
    tiles = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    prepared = untrained.prepare(tiles)
    assert prepared.shape == (2, 3, 224, 224) and prepared.is_contiguous(memory_format=torch.channels_last)
    assert prepared.min() >= -1.0 and prepared.max() <= 1.0  # Keras-style scaling
    with torch.inference_mode():
        assert untrained.net(prepared).shape == (2, 2048)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_xception_bf16_on_cuda_matches_float32_on_cpu(untrained):
    """The real backbone (not a stand-in): bf16 autocast on the GPU gives the CPU's features."""
    tiles = torch.randint(0, 256, (16, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    gpu = dataclasses.replace(untrained, net=build_backbone(ModelSpec("imgnet", seed=3), device="cuda").net)
    with torch.inference_mode():
        cpu_features = untrained.net(untrained.prepare(tiles))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            gpu_features = gpu.net(gpu.prepare(tiles.cuda())).float().cpu()
    cosine = torch.nn.functional.cosine_similarity(cpu_features, gpu_features, dim=1)
    assert cosine.min() > 0.99, cosine


@pytest.mark.parametrize(
    ("arch", "suffix", "eps"),
    [
        ("keras_xception", ".safetensors", 1e-3),
        ("keras_xception", ".pth", 1e-3),  # Keras's network: its own eps
        ("legacy_xception", ".safetensors", 1e-3),
        ("legacy_xception", ".pth", 1e-5),  # timm's: the file's bn_eps, else 1e-5
    ],
)
def test_weights_from_a_file_load_exactly_and_name_their_sha256(untrained, tmp_path, arch, suffix, eps):
    path = tmp_path / f"w{suffix}"
    state = {**untrained.net.state_dict(), "fc.weight": torch.zeros(9, 2048), "fc.bias": torch.zeros(9)}
    if suffix == ".safetensors":
        save_weights(state, path, {"bn_eps": "0.001"})
    else:
        torch.save(state, path)
    loaded = build_backbone(ModelSpec("ftx", arch=arch, weights=str(path)))
    for key, value in untrained.net.state_dict().items():
        torch.testing.assert_close(loaded.net.state_dict()[key], value)
    import hashlib

    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(m.eps == eps for m in loaded.net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_a_file_trained_as_another_architecture_is_refused(untrained, tmp_path):
    path = tmp_path / "ftx.safetensors"
    save_weights(untrained.net.state_dict(), path, {"arch": "legacy_xception"})
    with pytest.raises(
        WeightsError, match="'ftx'.*trained as architecture 'legacy_xception'.*arch is 'keras_xception'"
    ):
        build_backbone(ModelSpec("ftx", weights=str(path)))
    assert build_backbone(ModelSpec("ftx", arch="legacy_xception", weights=str(path))).spec.arch == "legacy_xception"


def test_missing_or_mismatched_weights_are_clear_errors(untrained, tmp_path):
    with pytest.raises(WeightsError, match="'ftx'.*not found"):
        build_backbone(ModelSpec("ftx", weights=str(tmp_path / "none.safetensors")))
    partial = tmp_path / "partial.safetensors"
    save_weights({"conv1.weight": untrained.net.conv1.weight}, partial, {})
    with pytest.raises(WeightsError, match="does not fit architecture"):
        build_backbone(ModelSpec("ftx", weights=str(partial)))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights"):
        build_backbone(ModelSpec("ftx", weights=str(junk)))


def test_hub_weights_need_the_config_to_allow_network():
    with pytest.raises(WeightsError, match="allow_network"):
        build_backbone(ModelSpec("imgnet", weights="hub"))


def test_config_defaults_match_model_spec_defaults():
    schema = load_schema("config")["properties"]["models"]["properties"]["backbones"]["additionalProperties"][
        "properties"
    ]
    spec = ModelSpec("x")
    for field in dataclasses.fields(ModelSpec):
        if field.name in schema and "default" in schema[field.name]:
            default = schema[field.name]["default"]
            assert (
                list(getattr(spec, field.name)) if isinstance(default, list) else getattr(spec, field.name)
            ) == default
    specs = specs_from_config(validate_config({})["models"])
    assert (
        list(specs) == ["imgnet", "ftx"]
        and specs["imgnet"].untrained
        and specs["ftx"].weights.endswith("ftx.safetensors")
    )
    assert {s.arch for s in specs.values()} == {"keras_xception"} == {ModelSpec("x").arch}


def test_a_model_fine_tuned_from_untrained_weights_carries_the_warning_in_its_provenance(tmp_path):
    """The demo's FTX is fine-tuned from an untrained base: every output built from it must say so (store attrs,
    aggregate provenance, predictions), while a trained model's provenance stays as it was."""
    base = build_backbone(ModelSpec("imgnet", arch="test_resnet", seed=1))
    for untrained_base in (True, False):
        path = tmp_path / f"ftx_{untrained_base}.safetensors"
        save_weights(base.net.state_dict(), path, {"untrained_base": untrained_base})
        provenance = build_backbone(ModelSpec("ftx", arch="test_resnet", weights=str(path))).provenance()
        if untrained_base:
            assert provenance["untrained_base"] is True and "fine-tuned from UNTRAINED" in provenance["warning"]
        else:
            assert "untrained_base" not in provenance and "warning" not in provenance
