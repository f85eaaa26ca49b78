"""PatchCore (Roth et al., CVPR 2022) on ImageNet EfficientNet-Lite patch features: an anomaly
score learnt from normal images only, beside the design's autoencoder.

- **Patch features**: the frozen ImageNet backbone's feature maps after the stride-8 and the
  stride-16 stages, each averaged over its 3x3 neighbourhood (local context), the stride-8 map
  pooled onto the stride-16 grid, concatenated: at 224 px, 14 x 14 patches of 152 values
  (Lite0). The inputs are the gray images in the weights' own scale (no per-image
  standardization: the ImageNet statistics apply).
- **Memory bank**: the patches of the normal training images, reduced to a coreset by greedy
  k-center selection (on a random projection to 128 values, as PatchCore does): the fewest
  patches that still cover all of them.
- **Score**: each patch's distance to its nearest memory patch; an image's score is the
  largest of its patches' (PatchCore's) or the mean of its largest 5% (``top5``), whichever
  separates validation better (the card says which).

The bank is stored as Parquet (``feature`` fixed-size lists, settings in the metadata) and the
extractor as a state dict: no pickle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from pneumo_ray.models.efficientnet_lite import LiteInput, imagenet_backbone

REDUCTIONS = ("max", "top5")
CORESET_FRACTION = 0.1  # of the normal training patches
CORESET_MAX = 10_000  # memory patches at most (nearest-neighbour cost per image)
PROJECTION_DIM = 128  # of the random projection the coreset is selected on
QUERY_CHUNK = 8192  # patches per distance computation


class PatchFeatures(nn.Module):
    """(B, 1, S, S) images in [0, 1] -> (B, P, D) patch features; with a memory bank set,
    (B, P) distances of each patch to its nearest memory patch."""

    def __init__(self, architecture: str, pretrained: bool = True) -> None:
        super().__init__()
        backbone = imagenet_backbone(architecture, pretrained)
        ends = backbone.stage_ends()
        self.layers = (ends[2], ends[4])  # stride 8 and stride 16
        backbone._blocks = nn.ModuleList(list(backbone._blocks)[: self.layers[-1] + 1])
        backbone._conv_head = backbone._bn1 = None
        self.backbone = backbone.eval()
        self.normalize = LiteInput(standardized=False)
        self.architecture = architecture
        self.memory: torch.Tensor | None = None  # (M, D), not a parameter: stored as Parquet

    @staticmethod
    def grid(image_size: int) -> int:
        """Patches per side for ``image_size`` inputs: the stride-16 map's side."""
        return math.ceil(image_size / 16)

    def train(self, mode: bool = True) -> PatchFeatures:
        return super().train(False)  # frozen: BatchNorm keeps its ImageNet statistics

    def features(self, x: torch.Tensor) -> torch.Tensor:
        fine, coarse = self.backbone.blocks(self.normalize(x), self.layers)
        fine = F.avg_pool2d(fine, 3, stride=1, padding=1, count_include_pad=False)
        coarse = F.avg_pool2d(coarse, 3, stride=1, padding=1, count_include_pad=False)
        fine = F.adaptive_avg_pool2d(fine, coarse.shape[-2:])
        return torch.cat([fine, coarse], dim=1).flatten(2).transpose(1, 2)  # (B, P, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.features(x)
        if self.memory is None:
            return patches
        if self.memory.device != patches.device:  # moved once, not per batch
            self.memory = self.memory.to(patches.device)
        return nearest_distances(patches, self.memory)

    def set_memory(self, memory: np.ndarray | torch.Tensor | None) -> PatchFeatures:
        self.memory = None if memory is None else torch.as_tensor(memory, dtype=torch.float32)
        return self


def nearest_distances(patches: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(B, P, D) patches, (M, D) memory -> (B, P) Euclidean distance to the nearest."""
    flat = patches.reshape(-1, patches.shape[-1]).float()
    memory = memory.float()
    memory_sq = memory.pow(2).sum(dim=1)
    out = []
    for chunk in flat.split(QUERY_CHUNK):
        # |a - b|^2 = |a|^2 - 2 a.b + |b|^2, without the (chunk, M, D) difference tensor
        squared = chunk.pow(2).sum(dim=1, keepdim=True) - 2 * chunk @ memory.T + memory_sq
        out.append(squared.min(dim=1).values.clamp_min(0).sqrt())
    return torch.cat(out).reshape(patches.shape[:2])


def reduce_patches(distances: np.ndarray, reduction: str) -> np.ndarray:
    """(B, P) patch distances -> (B,) image scores."""
    distances = np.asarray(distances, dtype=np.float32)
    if reduction == "max":
        return distances.max(axis=1)
    if reduction == "top5":
        k = max(1, int(round(0.05 * distances.shape[1])))
        return np.sort(distances, axis=1)[:, -k:].mean(axis=1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def greedy_coreset(features: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of ``size`` rows chosen by greedy k-center (each next row the one farthest from
    those chosen), on a random projection of the rows to at most PROJECTION_DIM values."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    if size >= len(x):
        return np.arange(len(x))
    generator = torch.Generator().manual_seed(seed)
    if x.shape[1] > PROJECTION_DIM:
        projection = torch.randn(x.shape[1], PROJECTION_DIM, generator=generator)
        x = x @ (projection / PROJECTION_DIM**0.5)
    # squared distances as |x|^2 - 2 x.c + |c|^2: one matrix-vector product per step (about
    # 3 ms for 200,000 rows on two cores), not a (rows, dim) difference tensor (about 60 ms)
    norms = x.pow(2).sum(dim=1)

    def distances(index: int) -> torch.Tensor:
        return (norms - 2 * (x @ x[index]) + norms[index]).clamp_min_(0)

    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    nearest = distances(chosen[0])
    for _ in range(size - 1):
        index = int(nearest.argmax())
        chosen.append(index)
        nearest = torch.minimum(nearest, distances(index))
    return np.asarray(chosen)


@dataclass
class PatchMemory:
    """The coreset of normal training patches and how image scores are made from it."""

    features: np.ndarray  # (M, D) float32
    grid: int  # patches per side
    reduction: str = "max"
    source_patches: int = 0  # normal training patches the coreset was selected from

    @classmethod
    def fit(cls, patches: np.ndarray, grid: int, seed: int = 0) -> PatchMemory:
        """``patches``: (N, P, D) or (N * P, D) features of normal training images."""
        flat = np.asarray(patches, dtype=np.float32).reshape(-1, np.shape(patches)[-1])
        size = max(1, min(CORESET_MAX, int(np.ceil(CORESET_FRACTION * len(flat)))))
        chosen = greedy_coreset(flat, size, seed)
        return cls(flat[chosen], grid, "max", len(flat))

    def extended(self, patches: np.ndarray, seed: int = 0) -> PatchMemory:
        """A copy with a coreset of ``patches`` ((N, P, D) or (N * P, D): more normal images,
        a site's) added to the bank, selected as ``fit`` selects; the reduction is kept."""
        added = PatchMemory.fit(patches, self.grid, seed)
        return PatchMemory(
            np.concatenate([self.features, added.features]),
            self.grid,
            self.reduction,
            self.source_patches + added.source_patches,
        )

    def to_table(self) -> pa.Table:
        dim = self.features.shape[1]
        return pa.table(
            {"feature": pa.FixedSizeListArray.from_arrays(pa.array(self.features.ravel()), dim)},
            metadata={
                "grid": str(self.grid),
                "reduction": self.reduction,
                "source_patches": str(self.source_patches),
            },
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> PatchMemory:
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        column = table.column("feature").combine_chunks()
        features = column.flatten().to_numpy().reshape(-1, column.type.list_size)
        return cls(
            features.astype(np.float32),
            int(meta["grid"]),
            meta["reduction"],
            int(meta.get("source_patches", 0)),
        )
