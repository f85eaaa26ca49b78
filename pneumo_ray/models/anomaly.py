"""Anomaly scores of the autoencoder (trained on normal chest X-rays only; pneumonia = anomaly).

Two scores, both from the one autoencoder:

- ``latent`` (the default when it wins on validation): the mean distance from an image's
  latent code to its k nearest normal *training* images. The code is the encoder's
  global-average-pooled activations of all four blocks (32 + 64 + 128 + 256 values),
  standardized with the normal reference set's mean and spread. Its neighbours are real normal
  images, so a high score can be explained by showing them.
- ``inpaint``: masked reconstruction (the line of SQUID, CVPR 2023, and SimSID). The image is
  cut into an 8x8 grid of patches; four masks, each hiding one patch in every 2x2 block, hide
  every patch exactly once. The autoencoder (trained with such masks on part of its normal
  images, ``--autoencoder-masking``) fills the hidden patches from their context, and the
  score is the mean squared error on the hidden patches only: what normal anatomy around a
  patch does not predict.
- ``mse``: the design's mean squared pixel reconstruction error. On the Kermany images
  pneumonia reconstructs *better* than normal (lungs filled with opacity are smoother), so
  this score ranks the classes backwards there; it stays available and is always reported.

The reference set is stored as Parquet (URI, feature vector) plus its standardization: no pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from sklearn.neighbors import NearestNeighbors

from pneumo_ray.models.autoencoder import ConvAutoencoder

SCORE_DESCRIPTIONS = {
    "latent": "mean distance of the autoencoder's pooled latent code to its k nearest normal "
    "training images (standardized features)",
    "inpaint": "mean squared error of patches hidden from the autoencoder and filled in from "
    "their context (8x8 patch grid, four complementary masks)",
    "mse": "mean squared pixel reconstruction error (the design's score)",
    "patchcore": "PatchCore: distance of the image's patches (frozen ImageNet EfficientNet-Lite "
    "features) to the nearest in a coreset of normal training patches, reduced per image",
}
INPAINT_GRID = 8  # patches per side
INPAINT_MASKS = 4  # mask m hides the patches (i, j) with (i % 2) * 2 + j % 2 == m


def inpainting_masks(image_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(4, 1, S, S) bool: mask m is True on the patches it hides; together they hide every
    pixel exactly once."""
    patch = image_size // INPAINT_GRID
    index = torch.arange(image_size, device=device) // patch
    index = index.clamp(max=INPAINT_GRID - 1)
    phase = (index[:, None] % 2) * 2 + index[None, :] % 2  # (S, S)
    masks = torch.stack([phase == m for m in range(INPAINT_MASKS)])
    return masks[:, None]


def hide(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` (B, 1, S, S) with the pixels under ``mask`` set to each image's mean."""
    fill = x.mean(dim=(1, 2, 3), keepdim=True)
    return torch.where(mask, fill, x)


def masked_training_batch(x: torch.Tensor, probability: float) -> torch.Tensor:
    """A training batch in which each image is hidden by one of the four masks (drawn at
    random) with ``probability``; the target stays the clean image."""
    if probability <= 0:
        return x
    masks = inpainting_masks(x.shape[-1], x.device)
    which = torch.randint(0, INPAINT_MASKS, (len(x),), device=x.device)
    chosen = masks[which] & (torch.rand(len(x), 1, 1, 1, device=x.device) < probability)
    return hide(x, chosen)


@torch.inference_mode()
def inpainting_error(model: ConvAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error of the hidden patches, over the four masks (B,)."""
    masks = inpainting_masks(x.shape[-1], x.device)
    error = torch.zeros_like(x)
    for mask in masks:
        error = torch.where(mask, (model(hide(x, mask)) - x).pow(2), error)
    return error.mean(dim=(1, 2, 3))


@torch.inference_mode()
def autoencoder_outputs(
    model: ConvAutoencoder, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel MSE (B,), latent code (B, 480)) from one encoder pass and one decoder pass."""
    pooled, h = [], x
    for block in model.encoder:
        h = block(h)
        pooled.append(h.mean(dim=(2, 3)))
    mse = (model.decoder(h) - x).pow(2).mean(dim=(1, 2, 3))
    return mse, torch.cat(pooled, dim=1)


@dataclass
class NormalReference:
    """Latent codes of normal training images, and the k-NN distance to them."""

    uris: np.ndarray
    features: np.ndarray  # (N, D) float32, raw (unstandardized) codes
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    k: int
    index: NearestNeighbors

    @classmethod
    def fit(cls, uris: list[str], features: np.ndarray, k: int) -> NormalReference:
        features = np.asarray(features, dtype=np.float32)
        if len(features) <= k:
            raise ValueError(
                f"the anomaly reference needs more than k={k} normal images, got {len(features)}"
            )
        mean = features.mean(axis=0)
        scale = features.std(axis=0) + 1e-6
        return cls._build(np.asarray(uris), features, mean, scale, k)

    @classmethod
    def _build(cls, uris, features, mean, scale, k) -> NormalReference:
        index = NearestNeighbors(n_neighbors=k).fit((features - mean) / scale)
        return cls(uris, features, mean.astype(np.float32), scale.astype(np.float32), k, index)

    def extended(self, uris: list[str], features: np.ndarray) -> NormalReference:
        """A copy with more normal images (a site's) added, standardized as this one is, so
        that its distances stay comparable with this reference's."""
        return self._build(
            np.concatenate([self.uris, np.asarray(uris)]),
            np.concatenate([self.features, np.asarray(features, dtype=np.float32)]),
            self.mean,
            self.scale,
            self.k,
        )

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mean distance to the k nearest normal reference images (B,)."""
        distances, _ = self.index.kneighbors((np.asarray(features) - self.mean) / self.scale)
        return distances.mean(axis=1).astype(np.float32)

    def to_table(self) -> pa.Table:
        dim = self.features.shape[1]
        return pa.table(
            {
                "image_uri": pa.array(self.uris.tolist(), pa.string()),
                "feature": pa.FixedSizeListArray.from_arrays(pa.array(self.features.ravel()), dim),
            },
            metadata={
                "k": str(self.k),
                "mean": ",".join(repr(float(v)) for v in self.mean),
                "scale": ",".join(repr(float(v)) for v in self.scale),
            },
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> NormalReference:
        meta = {
            key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()
        }
        column = table.column("feature").combine_chunks()
        features = column.flatten().to_numpy().reshape(-1, column.type.list_size)

        def vector(text: str) -> np.ndarray:
            return np.array([float(v) for v in text.split(",")], dtype=np.float32)

        return cls._build(
            np.asarray(table.column("image_uri").to_pylist()),
            features.astype(np.float32),
            vector(meta["mean"]),
            vector(meta["scale"]),
            int(meta["k"]),
        )
