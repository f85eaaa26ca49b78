"""The four models: binary and three-class CNNs, the KNN over the latter, the autoencoder."""

from pneumo_ray.models.autoencoder import ConvAutoencoder, reconstruction_error
from pneumo_ray.models.cnn import ChestCNN, binary_cnn, multiclass_cnn
from pneumo_ray.models.knn import KnnReference

__all__ = [
    "ChestCNN",
    "ConvAutoencoder",
    "KnnReference",
    "binary_cnn",
    "multiclass_cnn",
    "reconstruction_error",
]
