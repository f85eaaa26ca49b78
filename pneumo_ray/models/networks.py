"""The three networks by name, as the card names them."""

from pneumo_ray.models.autoencoder import ConvAutoencoder
from pneumo_ray.models.cnn import build_cnn

NETWORKS = ("binary", "multiclass", "autoencoder")


def build_network(name: str, image_size: int, spec: dict | None = None):
    """One of the three networks, or ``patchcore``'s feature extractor. ``spec`` (the card's
    ``network`` entry of the model) gives the CNNs' ``architecture``, ``normalization``,
    ``pretrained`` weights and ``freeze_blocks``; None or a missing key is the design's (seed
    architecture, no normalization, random weights)."""
    spec = spec or {}
    if name == "autoencoder":
        return ConvAutoencoder(image_size)
    if name == "patchcore":  # the anomaly score's frozen ImageNet patch features
        from pneumo_ray.models.patchcore import PatchFeatures

        return PatchFeatures(spec["architecture"], pretrained=spec.get("pretrained") == "imagenet")
    if name == "scope":  # the scope check's frozen ImageNet features (weights: the bundle's)
        from pneumo_ray.models.scope import ScopeFeatures

        return ScopeFeatures(spec["architecture"], pretrained=spec.get("pretrained") == "imagenet")
    if name not in ("binary", "multiclass"):
        raise ValueError(f"unknown network {name!r}; expected one of {NETWORKS}")
    return build_cnn(
        1 if name == "binary" else 3,
        image_size,
        spec.get("architecture", "seed"),
        spec.get("normalization", "none"),
        spec.get("pretrained"),
        spec.get("freeze_blocks", -1),
    )
