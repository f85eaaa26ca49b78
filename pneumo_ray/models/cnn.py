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


class ChestCNN(nn.Module):
    """Four conv blocks, a 128-unit embedding, and a linear head of ``num_outputs`` logits."""

    def __init__(
        self,
        num_outputs: int,
        image_size: int,
        block_dropout: tuple[float, float, float, float],
        dense_batchnorm: bool,
    ) -> None:
        super().__init__()
        check_image_size(image_size)
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

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-value penultimate representation."""  # (B, 1, S, S) -> (B, 128)
        return self.embed(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.dropout(self.embedding(x)))  # (B, num_outputs)
        return logits.squeeze(1) if self.num_outputs == 1 else logits


def binary_cnn(image_size: int = 224) -> ChestCNN:
    """Normal vs pneumonia; one logit (sigmoid gives p_pneumonia)."""
    return ChestCNN(1, image_size, block_dropout=(0.0, 0.2, 0.3, 0.4), dense_batchnorm=True)


def multiclass_cnn(image_size: int = 224) -> ChestCNN:
    """Normal / bacterial / viral; three logits (softmax gives the class probabilities)."""
    return ChestCNN(3, image_size, block_dropout=(0.0, 0.0, 0.2, 0.3), dense_batchnorm=False)
