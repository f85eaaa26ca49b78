"""K-nearest-neighbour classifier over the three-class CNN's outputs.

Its neighbours are real reference images (training images), so a prediction can be explained
by showing them. The reference set is stored as Parquet (URI, label, feature vector): no pickle.
Two feature kinds: the 3-value softmax (the design's) and the 128-value penultimate embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from sklearn.neighbors import KNeighborsClassifier

from pneumo_ray.config import FEATURE_KINDS
from pneumo_ray.models.cnn import ChestCNN

KNN_K_CANDIDATES = (5, 15, 25, 51)
"""Neighbour counts that ``--knn-k auto`` compares on validation: the design's 5 and larger
ones, which vote over more of the training images near a query, where bacterial and viral
labels are mixed."""


@torch.inference_mode()
def multiclass_outputs(model: ChestCNN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax probabilities (B, 3), embedding (B, 128)) from one forward pass."""
    embedding = model.embedding(x)
    probs = torch.softmax(model.head(embedding), dim=1)  # dropout is off in eval mode
    return probs, embedding


def select_features(probs: np.ndarray, embedding: np.ndarray, kind: str) -> np.ndarray:
    if kind == "softmax":
        return probs.astype(np.float32)
    if kind == "embedding":
        return embedding.astype(np.float32)
    raise ValueError(f"KNN feature kind must be one of {FEATURE_KINDS}, got {kind!r}")


@dataclass
class KnnReference:
    """The fitted classifier with the URIs and labels of its reference images."""

    classifier: KNeighborsClassifier
    uris: np.ndarray
    labels: np.ndarray
    features: np.ndarray  # (N, D) float32
    feature_kind: str

    @classmethod
    def fit(
        cls, uris: list[str], labels: list[str], features: np.ndarray, k: int, feature_kind: str
    ) -> KnnReference:
        if len(uris) < k:
            raise ValueError(f"KNN needs at least k={k} reference images, got {len(uris)}")
        features = np.asarray(features, dtype=np.float32)
        classifier = KNeighborsClassifier(n_neighbors=k).fit(features, labels)
        return cls(classifier, np.asarray(uris), np.asarray(labels), features, feature_kind)

    @property
    def k(self) -> int:
        return self.classifier.n_neighbors

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.classifier.predict(features)

    def query(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels (B,), URIs (B, k), distances (B, k)) from one neighbour search: the labels
        are ``predict``'s (a uniform vote; a tie goes to the first label in sorted order)."""
        distances, index = self.classifier.kneighbors(features)
        classes = self.classifier.classes_
        votes = self.classifier._y[index]  # (B, k) indices into classes_
        counts = (votes[..., None] == np.arange(len(classes))).sum(axis=1)  # (B, C)
        return classes[counts.argmax(axis=1)], self.uris[index], distances.astype(np.float32)

    def to_table(self) -> pa.Table:
        features = self.features
        return pa.table(
            {
                "image_uri": pa.array(self.uris.tolist(), pa.string()),
                "label": pa.array(self.labels.tolist(), pa.string()),
                "feature": pa.FixedSizeListArray.from_arrays(
                    pa.array(features.ravel()), features.shape[1]
                ),
            },
            metadata={"feature_kind": self.feature_kind, "k": str(self.k)},
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> KnnReference:
        meta = {
            key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()
        }
        column = table.column("feature").combine_chunks()
        dim = column.type.list_size
        features = column.flatten().to_numpy().reshape(-1, dim)
        return cls.fit(
            table.column("image_uri").to_pylist(),
            table.column("label").to_pylist(),
            features,
            k=int(meta["k"]),
            feature_kind=meta["feature_kind"],
        )
