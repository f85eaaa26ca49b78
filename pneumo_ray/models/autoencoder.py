"""Convolutional autoencoder for anomaly detection, trained on normal chest X-rays only.

Encoder: four blocks of 3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool (32/64/128/256 filters);
decoder: four stride-2 transposed convolutions back to the input size, sigmoid output. An
image it reconstructs badly is unlike the normal images it learned (pneumonia = anomaly).
"""

from __future__ import annotations

import torch
from torch import nn

from pneumo_ray.models.cnn import FILTERS, check_image_size


def encoder_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def decoder_block(in_channels: int, out_channels: int, last: bool) -> nn.Sequential:
    up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
    if last:
        return nn.Sequential(up, nn.Sigmoid())
    return nn.Sequential(up, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ConvAutoencoder(nn.Module):
    """(B, 1, S, S) in [0, 1] -> reconstruction of the same shape in [0, 1]."""

    def __init__(self, image_size: int = 224) -> None:
        super().__init__()
        check_image_size(image_size)
        channels = (1, *FILTERS)
        self.encoder = nn.Sequential(
            *(encoder_block(channels[i], channels[i + 1]) for i in range(4))
        )
        back = tuple(reversed(channels))  # 256, 128, 64, 32, 1
        self.decoder = nn.Sequential(
            *(decoder_block(back[i], back[i + 1], last=i == 3) for i in range(4))
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (B, 256, S/16, S/16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))  # (B, 1, S, S)


def reconstruction_error(
    model: ConvAutoencoder, x: torch.Tensor, shown: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-image mean squared error of the model's output against ``x`` (B, 1, S, S) -> (B,),
    the model being shown ``shown`` (``x`` itself by default; a masked ``x`` to inpaint)."""
    return (model(x if shown is None else shown) - x).pow(2).mean(dim=(1, 2, 3))
