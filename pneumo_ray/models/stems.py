"""The one-channel stem of an ImageNet backbone, shared by the torchvision and the
EfficientNet-Lite architectures."""

from __future__ import annotations

import torch
from torch import nn


def one_channel_stem(conv: nn.Conv2d) -> nn.Conv2d:
    """An RGB stem convolution -> the same convolution (same class) on one grayscale channel.

    The weights are summed over the three input channels: on a gray image copied to R, G and
    B, the one-channel stem gives exactly what the RGB stem gave (ImageNet weights keep their
    meaning).
    """
    stem = type(conv)(
        1,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        stem.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            stem.bias.copy_(conv.bias)
    stem.weight.requires_grad_(conv.weight.requires_grad)
    return stem
