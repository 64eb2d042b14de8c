"""The networks a backbone can name (`models.backbones.<name>.arch`).

`keras_xception` (the default) is Keras's `Xception(include_top=False, pooling='avg')` in PyTorch: the
module tree of timm's `legacy_xception`, so its weight names, `pathwsi convert-keras` output and timm's
`legacy_xception` files load unchanged, with what Keras does differently:

- the four stride-2 max-pools (Keras block2/3/4/13_pool) pad TensorFlow's `same` way, which on an
  even-sized input puts the extra row and column at the bottom/right only (timm pads 1 on every side);
- BatchNorm epsilon 1e-3 (timm: 1e-5).

Every other layer already computes what Keras computes: `block1_conv1/2` are `valid` convolutions (timm
padding 0), the separable 3x3 convolutions are stride 1 (`same` = 1 on every side, as timm), and the 1x1
stride-2 shortcut convolutions need no padding at any size. tests/test_keras_reference.py checks the
whole network against Keras itself. Any other `arch` is a timm architecture (`legacy_xception`, or the
tests' tiny `test_resnet`).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F

KERAS_XCEPTION = "keras_xception"
LEGACY_XCEPTION = "legacy_xception"
KERAS_BN_EPS = 1e-3


class TFSameMaxPool2d(torch.nn.Module):
    """Max-pooling with TensorFlow's `padding='same'`: ceil(n / stride) outputs, the padding split with the
    odd one at the bottom/right (padded values never win).

    Done without a padded copy: torch pads `before` on both sides, and `ceil_mode` lets the last window
    run past the bottom/right edge (clipped, as TF's -inf padding), which gives TF's windows exactly.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def padding_before(self, size: int) -> int:
        total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel_size - size, 0)
        return total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = (self.padding_before(x.shape[-2]), self.padding_before(x.shape[-1]))
        return F.max_pool2d(x, self.kernel_size, self.stride, padding, ceil_mode=True)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='same' (TensorFlow)"


def keras_xception(pretrained: bool = False) -> torch.nn.Module:
    """Keras's Xception without its classifier (2048-d average-pooled features), in timm's module layout."""
    net = _timm(LEGACY_XCEPTION, pretrained)
    for module in net.modules():
        if isinstance(module, torch.nn.Sequential):
            for index, layer in enumerate(module):
                if isinstance(layer, torch.nn.MaxPool2d):  # legacy_xception's pools have int kernel size and stride
                    module[index] = TFSameMaxPool2d(cast(int, layer.kernel_size), cast(int, layer.stride))
    set_batchnorm_eps(net, KERAS_BN_EPS)
    return net


def create_network(arch: str, pretrained: bool = False) -> torch.nn.Module:
    """The network `arch` names, without classifier; `pretrained` loads its ImageNet weights through timm
    (for `keras_xception`: timm's `legacy_xception.tf_in1k`, ported from Keras)."""
    return keras_xception(pretrained) if arch == KERAS_XCEPTION else _timm(arch, pretrained)


def has_fixed_bn_eps(arch: str) -> bool:
    """Whether the architecture defines its BatchNorm epsilon (a weight file's `bn_eps` does not apply)."""
    return arch == KERAS_XCEPTION


def set_batchnorm_eps(net: torch.nn.Module, eps: float) -> None:
    """Keras BatchNormalization uses eps 1e-3 where PyTorch uses 1e-5."""
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eps = eps


def _timm(arch: str, pretrained: bool) -> torch.nn.Module:
    import timm

    return timm.create_model(arch, pretrained=pretrained, num_classes=0)
