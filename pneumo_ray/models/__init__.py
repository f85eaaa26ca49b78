"""The four models: binary and three-class CNNs, the KNN over the latter, the autoencoder."""

from pneumo_ray.models.autoencoder import ConvAutoencoder, reconstruction_error
from pneumo_ray.models.cnn import ChestCNN, TorchvisionCNN, binary_cnn, build_cnn, multiclass_cnn
from pneumo_ray.models.knn import KnnReference

NETWORKS = ("binary", "multiclass", "autoencoder")


def build_network(name: str, image_size: int, spec: dict | None = None):
    """One of the three networks. ``spec`` (the card's ``network`` entry of the model) gives
    the CNNs' ``architecture``, ``normalization`` and ``pretrained`` weights; None or a
    missing key is the design's (seed architecture, no normalization, random weights)."""
    spec = spec or {}
    if name == "autoencoder":
        return ConvAutoencoder(image_size)
    if name not in ("binary", "multiclass"):
        raise ValueError(f"unknown network {name!r}; expected one of {NETWORKS}")
    return build_cnn(
        1 if name == "binary" else 3,
        image_size,
        spec.get("architecture", "seed"),
        spec.get("normalization", "none"),
        spec.get("pretrained"),
    )


__all__ = [
    "ChestCNN",
    "ConvAutoencoder",
    "KnnReference",
    "NETWORKS",
    "TorchvisionCNN",
    "binary_cnn",
    "build_cnn",
    "build_network",
    "multiclass_cnn",
    "reconstruction_error",
]
