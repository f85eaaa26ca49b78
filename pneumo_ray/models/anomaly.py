"""Anomaly scores of the autoencoder (trained on normal chest X-rays only; pneumonia = anomaly).

Two scores, both from the one autoencoder:

- ``latent`` (the default when it wins on validation): the mean distance from an image's
  latent code to its k nearest normal *training* images. The code is the encoder's
  global-average-pooled activations of all four blocks (32 + 64 + 128 + 256 values),
  standardized with the normal reference set's mean and spread. Its neighbours are real normal
  images, so a high score can be explained by showing them.
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
    "mse": "mean squared pixel reconstruction error (the design's score)",
}


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
