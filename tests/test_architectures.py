"""`keras_xception`: TensorFlow `same` max-pooling, Keras's BatchNorm epsilon, timm's weight names.
(tests/test_keras_reference.py checks the whole network against Keras itself.)"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from pathwsi.features.architectures import TFSameMaxPool2d, create_network


def tf_same_max_pool(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's rule written out: pad the total (ceil(n/s) - 1) * s + k - n with -inf, the odd one after."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=-math.inf), kernel, stride)


@pytest.mark.parametrize(("height", "width"), [(8, 8), (9, 9), (8, 9), (111, 110), (1, 2), (3, 3)])
@pytest.mark.parametrize(("kernel", "stride"), [(3, 2), (2, 2), (3, 1), (5, 3)])
def test_max_pool_pads_as_tensorflow(height, width, kernel, stride):
    x = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(height * width))
    pooled = TFSameMaxPool2d(kernel, stride)(x)
    assert pooled.shape[-2:] == (math.ceil(height / stride), math.ceil(width / stride))
    torch.testing.assert_close(pooled, tf_same_max_pool(x, kernel, stride), rtol=0, atol=0)


def test_even_inputs_pool_differently_from_timm():
    """The difference issue 13 found: on an even input timm's symmetric padding shifts every window by one."""
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert TFSameMaxPool2d()(x).flatten().tolist() == [10.0, 11.0, 14.0, 15.0]  # windows over rows/columns 0-2 and 2-3
    assert torch.nn.MaxPool2d(3, 2, 1)(x).flatten().tolist() == [5.0, 7.0, 13.0, 15.0]  # 0-1 and 1-3


def test_channels_last_stays_channels_last():
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    assert TFSameMaxPool2d()(x).is_contiguous(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def networks() -> tuple[torch.nn.Module, torch.nn.Module]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        keras = create_network("keras_xception").eval()
    legacy = timm.create_model("legacy_xception", pretrained=False, num_classes=0).eval()
    legacy.load_state_dict(keras.state_dict())
    return keras, legacy


def test_keras_xception_has_timm_weight_names_keras_eps_and_tf_pools(networks):
    keras, legacy = networks
    assert {k: v.shape for k, v in keras.state_dict().items()} == {k: v.shape for k, v in legacy.state_dict().items()}
    assert {m.eps for m in keras.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    pools = [name for name, m in keras.named_modules() if isinstance(m, TFSameMaxPool2d)]
    assert pools == ["block1.rep.5", "block2.rep.6", "block3.rep.6", "block12.rep.6"]  # Keras block2/3/4/13_pool
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in keras.modules())


@pytest.mark.parametrize("px", [71, 72, 299, 512])
def test_any_input_size_from_71_to_512(networks, px):
    with torch.inference_mode():
        assert networks[0](torch.randn(1, 3, px, px)).shape == (1, 2048)


def test_same_weights_differ_from_timm_only_where_a_pool_sees_an_even_input(networks):
    keras, legacy = networks
    for module in legacy.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 1e-3  # leave only the pooling different
    with torch.inference_mode():
        odd = torch.randn(2, 3, 71, 71)  # 71 -> 35 -> 33 -> 17 -> 9 -> 5: every pool input is odd
        torch.testing.assert_close(keras(odd), legacy(odd))
        for block in ("block1", "block2", "block3", "block12"):
            channels = getattr(keras, block).skip.in_channels
            even, odd_block = torch.randn(1, channels, 12, 12), torch.randn(1, channels, 13, 13)
            ours, timms = (
                getattr(keras, block).rep(even),
                getattr(legacy, block).rep(even),
            )  # the branch that ends in the pool
            assert (ours - timms).norm() / ours.norm() > 0.05, block
            torch.testing.assert_close(getattr(keras, block).rep(odd_block), getattr(legacy, block).rep(odd_block))
