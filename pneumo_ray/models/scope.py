"""The scope check (issue 33): is an image a frontal chest X-ray of a child, what the models
learnt, or something else (a CT slice, a lateral view, an adult's film, a limb, a scanned
document, a photograph)?

    from metadata (io.images.scope_note, in the decode tasks): DICOM Modality, Body Part
        Examined, View Position, Patient Age, Photometric Interpretation; colour in a JPEG/PNG
    from pixels (here): how far the image lies from the training images as a whole, by two
        Gaussians fitted on training images of every class (Mahalanobis distance, Ledoit-Wolf
        shrinkage of the covariance; Lee et al., NeurIPS 2018):
        - ``imagenet``: the frozen ImageNet EfficientNet-Lite0's feature maps after its
          stride-8, -16 and -32 stages, each pooled to its channels' mean and standard
          deviation over the image (what is there, and its texture);
        - ``embedding``: the three-class CNN's own 128-value embedding (what the network
          makes of it).

Each distance is divided by its threshold, the ``percentile`` of the held-out training
images' (validation's) distances; the image's ``scope_score`` is the larger ratio, and it is in
scope when that is at most 1 and its metadata raised nothing. Nothing about the threshold is
chosen on images outside the training store. The reference is Parquet (means, precision
matrices, thresholds) and the extractor a state dict: no pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from pneumo_ray.models.efficientnet_lite import LiteInput, imagenet_backbone

SCOPE_ARCHITECTURE = "efficientnet_lite0"
KINDS = ("imagenet", "embedding")
FIT_IMAGES = 1500  # training images per fit (a seeded draw over every class)
PERCENTILE = 99.75  # of validation's distances, per Gaussian: together about 0.5% of it marked


class ScopeFeatures(nn.Module):
    """(B, 1, S, S) images in [0, 1] -> (B, D) pooled frozen ImageNet features: the mean and
    standard deviation over the image of each channel after the stride-8, -16 and -32
    stages (D = 2 (40 + 112 + 320) = 944 for Lite0)."""

    def __init__(self, architecture: str = SCOPE_ARCHITECTURE, pretrained: bool = True) -> None:
        super().__init__()
        backbone = imagenet_backbone(architecture, pretrained)
        ends = backbone.stage_ends()
        self.layers = (ends[2], ends[4], ends[-1])
        backbone._blocks = nn.ModuleList(list(backbone._blocks)[: self.layers[-1] + 1])
        backbone._conv_head = backbone._bn1 = None
        self.backbone = backbone.eval()
        self.normalize = LiteInput(standardized=False)
        self.architecture = architecture

    def train(self, mode: bool = True) -> ScopeFeatures:
        return super().train(False)  # frozen: ImageNet statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.backbone.blocks(self.normalize(x), self.layers)
        pooled = []
        for m in maps:
            flat = m.float().flatten(2)  # (B, C, HW)
            pooled += [flat.mean(dim=2), flat.std(dim=2, correction=0)]
        return torch.cat(pooled, dim=1)  # (B, D)


@dataclass
class Gaussian:
    """A Gaussian of feature vectors: its mean and precision (inverse covariance), and the
    distance beyond which an image is out of scope."""

    mean: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D)
    threshold: float = float("inf")

    @classmethod
    def fit(cls, features: np.ndarray) -> Gaussian:
        """Mean and Ledoit-Wolf shrunk precision of ``features`` (N, D)."""
        from sklearn.covariance import LedoitWolf

        estimate = LedoitWolf().fit(np.asarray(features, dtype=np.float64))
        return cls(estimate.location_.astype(np.float64), estimate.precision_.astype(np.float64))

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` (N, D) to the mean."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        squared = np.einsum("nd,de,ne->n", centred, self.precision, centred)
        return np.sqrt(np.maximum(squared, 0.0))


@dataclass
class ScopeReference:
    """The Gaussians of the training images, their thresholds, and how they were set."""

    gaussians: dict[str, Gaussian]
    percentile: float = PERCENTILE
    fit_images: int = 0
    threshold_images: int = 0

    @classmethod
    def fit(
        cls,
        train: dict[str, np.ndarray],
        validation: dict[str, np.ndarray],
        percentile: float = PERCENTILE,
    ) -> ScopeReference:
        """Gaussians of the training images' features (kind -> (N, D)), each threshold at the
        ``percentile`` of the validation images' distances."""
        gaussians = {}
        for kind in KINDS:
            gaussian = Gaussian.fit(train[kind])
            distances = gaussian.distance(validation[kind])
            gaussian.threshold = float(np.percentile(distances, percentile))
            gaussians[kind] = gaussian
        return cls(gaussians, percentile, len(train[KINDS[0]]), len(validation[KINDS[0]]))

    def ratios(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each Gaussian's distance over its threshold (a site's, ``site:<kind>``, reads the
        same features as ``<kind>``)."""
        return {
            name: gaussian.distance(features[name.split(":")[-1]]) / gaussian.threshold
            for name, gaussian in self.gaussians.items()
        }

    def score(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """The scope score: the largest ratio of distance to threshold over the training
        images' Gaussians (in scope: <= 1); with a site's Gaussians too (``widened``), the
        smaller of that and the same over the site's: near either is in scope."""
        ratios = self.ratios(features)
        training = np.max(np.stack([ratios[kind] for kind in KINDS]), axis=0)
        site = [ratios[name] for name in ratios if name.startswith("site:")]
        return np.minimum(training, np.max(np.stack(site), axis=0)) if site else training

    def widened(self, features: dict[str, np.ndarray]) -> ScopeReference:
        """A copy whose scope also takes in images like a site's (``features`` of its
        labelled chest films): Gaussians of them, thresholds at the same percentile of their
        own distances (pneumo-adapt --scope add). A later widening replaces an earlier one."""
        gaussians = {name: g for name, g in self.gaussians.items() if not name.startswith("site:")}
        for kind in KINDS:
            gaussian = Gaussian.fit(features[kind])
            gaussian.threshold = float(
                np.percentile(gaussian.distance(features[kind]), self.percentile)
            )
            gaussians[f"site:{kind}"] = gaussian
        return ScopeReference(gaussians, self.percentile, self.fit_images, self.threshold_images)

    def to_table(self) -> pa.Table:
        """One row per Gaussian (mean and the precision matrix row by row), settings in the
        metadata: Parquet, no pickle."""
        kinds = list(self.gaussians)
        return pa.table(
            {
                "kind": kinds,
                "threshold": [self.gaussians[k].threshold for k in kinds],
                "mean": [self.gaussians[k].mean.tolist() for k in kinds],
                "precision": [self.gaussians[k].precision.reshape(-1).tolist() for k in kinds],
            }
        ).replace_schema_metadata(
            {
                "pneumo_ray": json.dumps(
                    {
                        "percentile": self.percentile,
                        "fit_images": self.fit_images,
                        "threshold_images": self.threshold_images,
                    }
                )
            }
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> ScopeReference:
        settings = json.loads(table.schema.metadata[b"pneumo_ray"])
        gaussians = {}
        for row in table.to_pylist():
            mean = np.asarray(row["mean"], dtype=np.float64)
            precision = np.asarray(row["precision"], dtype=np.float64).reshape(len(mean), -1)
            gaussians[row["kind"]] = Gaussian(mean, precision, float(row["threshold"]))
        return cls(gaussians, **settings)


def scope_features(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The features each Gaussian reads, from the networks' raw outputs."""
    return {"imagenet": raw["scope_features"], "embedding": raw["embedding"]}


def scope_columns(
    reference: ScopeReference | None, raw: dict[str, np.ndarray], notes: np.ndarray | None
) -> dict[str, np.ndarray]:
    """``in_scope``, ``scope_score`` and ``scope_reason`` per image: the metadata's objection
    (``notes``: "" for none) first, then the pixels' distance; without a reference (a bundle
    from before the check), the metadata's alone and no score (a null column)."""
    n = len(raw["embedding"])
    notes = np.full(n, "", dtype=object) if notes is None else np.asarray(notes, dtype=object)
    reasons = notes.astype(object).copy()
    columns = {}
    if reference is not None:
        score = reference.score(scope_features(raw)).astype(np.float32)
        far = (score > 1.0) & (reasons == "")
        reasons[far] = [
            f"far from the training images: scope score {s:.2f} > 1 (not a frontal chest "
            "X-ray of a child like those the models learnt)"
            for s in score[far]
        ]
        columns["scope_score"] = score
    columns["in_scope"] = reasons == ""
    columns["scope_reason"] = np.where(reasons == "", None, reasons).astype(object)
    return columns
