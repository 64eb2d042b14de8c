"""`pathwsi weights`: ImageNet weights from Keras's published file or from timm, written with their provenance.
The files are made here (a seeded Xception in Keras's layout; a planted timm cache): nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from test_keras_convert import keras_layers, write_weights_h5

from pathwsi.cli import main
from pathwsi.features import imagenet_weights
from pathwsi.features.backbones import ModelSpec, build_backbone, file_sha256, load_weights
from pathwsi.features.imagenet_weights import WeightsSourceError, file_md5, from_keras, from_timm

TIMM_FILE = "xception-43020ad28.pth"  # the name timm's legacy_xception.tf_in1k URL gives the cached file


@pytest.fixture(scope="module")
def imagenet_like() -> torch.nn.Module:
    """A seeded legacy_xception with its 1000-class head, standing in for the real ImageNet weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return timm.create_model("legacy_xception", pretrained=False, num_classes=1000).eval()


def test_the_published_keras_file_is_converted_with_its_provenance(imagenet_like, tmp_path, monkeypatch, capsys):
    src = write_weights_h5(
        tmp_path / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", keras_layers(imagenet_like, first_auto=1)
    )
    monkeypatch.setattr(imagenet_weights, "KERAS_MD5", {file_md5(src): src.name})  # stands in for Keras's published MD5
    assert main(["weights", "keras", str(src), str(tmp_path / "imgnet.safetensors")]) == 0
    out = capsys.readouterr().out
    dst = tmp_path / "imgnet.safetensors"
    assert f"sha256 {file_sha256(dst)}" in out and f"imgnet: {{arch: keras_xception, weights: {dst}}}" in out
    state, metadata = load_weights(dst)
    assert metadata["source_url"].endswith(src.name) and metadata["source_md5"] == file_md5(src)
    assert metadata["source_sha256"] == file_sha256(src) and metadata["bn_eps"] == "0.001"
    backbone = build_backbone(ModelSpec("imgnet", weights=str(dst)))
    for key, value in backbone.net.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, imagenet_like.state_dict()[key]), key


def test_another_keras_file_is_refused_with_the_expected_md5(imagenet_like, tmp_path, capsys):
    src = write_weights_h5(tmp_path / "mine.h5", keras_layers(imagenet_like, first_auto=1))
    with pytest.raises(
        WeightsSourceError,
        match=r"'.*mine.h5': MD5 [0-9a-f]{32} is not .*b0042744bf5b25fce3cb969f33bebb97.*pathwsi convert-keras",
    ):
        from_keras(src, tmp_path / "out.safetensors")
    assert main(["weights", "keras", str(tmp_path / "none.h5"), str(tmp_path / "out.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "out.safetensors").exists()


@pytest.fixture
def planted_cache(imagenet_like, tmp_path, monkeypatch) -> Path:
    """torch's hub cache holding the stand-in as timm's legacy_xception.tf_in1k file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / TIMM_FILE
    cached.parent.mkdir(parents=True)
    torch.save(imagenet_like.state_dict(), cached)
    return cached


def test_timm_weights_come_from_torchs_hub_cache(imagenet_like, planted_cache, tmp_path):
    cached = planted_cache
    written = from_timm(tmp_path / "imgnet.safetensors", offline=True)
    state, metadata = load_weights(written.path)
    assert written.sha256 == file_sha256(written.path) and not any(k.startswith("fc.") for k in state)
    assert metadata["source"] == "timm legacy_xception.tf_in1k" and metadata["source_sha256"] == file_sha256(cached)
    assert metadata["source_url"].endswith(TIMM_FILE) and metadata["timm_version"] == timm.__version__
    backbone = build_backbone(ModelSpec("imgnet", weights=str(written.path)))
    assert {m.eps for m in backbone.net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    assert torch.equal(
        backbone.net.state_dict()["conv4.pointwise.weight"], imagenet_like.state_dict()["conv4.pointwise.weight"]
    )


def test_hub_weights_load_timms_port_into_keras_xception(imagenet_like, planted_cache):
    backbone = build_backbone(ModelSpec("imgnet", weights="hub"), allow_network=True)
    assert backbone.spec.arch == "keras_xception" and {
        m.eps for m in backbone.net.modules() if isinstance(m, torch.nn.BatchNorm2d)
    } == {1e-3}
    assert torch.equal(
        backbone.net.state_dict()["block12.skip.weight"], imagenet_like.state_dict()["block12.skip.weight"]
    )


def test_offline_without_the_cached_file_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    assert main(["weights", "timm", str(tmp_path / "imgnet.safetensors"), "--offline"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty' / 'hub' / 'checkpoints' / TIMM_FILE}' is not in torch's hub cache" in err
    assert not Path(tmp_path / "imgnet.safetensors").exists()
