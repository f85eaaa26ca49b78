from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pneumo_ray.models.anomaly import NormalReference, autoencoder_outputs
from pneumo_ray.models.autoencoder import ConvAutoencoder, reconstruction_error
from pneumo_ray.models.cnn import binary_cnn, multiclass_cnn
from pneumo_ray.models.knn import KnnReference, multiclass_outputs, select_features


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Four conv blocks (3x3 conv + bias, BatchNorm gamma/beta) of 32/64/128/256 filters on 1 channel.
CONV_BLOCKS = sum(
    9 * cin * cout + cout + 2 * cout for cin, cout in [(1, 32), (32, 64), (64, 128), (128, 256)]
)


@pytest.mark.parametrize("size", [64, 224])
def test_binary_cnn_shape_and_parameter_count(size):
    model = binary_cnn(size).eval()
    dense = 256 * (size // 16) ** 2 * 128 + 128
    assert n_params(model) == CONV_BLOCKS + dense + 2 * 128 + (128 + 1)  # + BN1d + head
    assert model(torch.rand(3, 1, size, size)).shape == (3,)


@pytest.mark.parametrize("size", [64, 224])
def test_multiclass_cnn_shape_and_parameter_count(size):
    model = multiclass_cnn(size).eval()
    dense = 256 * (size // 16) ** 2 * 128 + 128
    assert n_params(model) == CONV_BLOCKS + dense + (128 * 3 + 3)  # no BN1d in this design
    x = torch.rand(2, 1, size, size)
    assert model(x).shape == (2, 3)
    probs, embedding = multiclass_outputs(model, x)
    assert embedding.shape == (2, 128)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2))


def test_dropout_placement_follows_the_design():
    def dropouts(model):
        return [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]

    assert dropouts(binary_cnn(64)) == [0.2, 0.3, 0.4, 0.5]
    assert dropouts(multiclass_cnn(64)) == [0.2, 0.3, 0.5]


def test_autoencoder_reconstructs_input_shape_in_unit_range():
    model = ConvAutoencoder(64).eval()
    decoder = sum(cin * cout * 4 + cout for cin, cout in [(256, 128), (128, 64), (64, 32), (32, 1)])
    assert n_params(model) == CONV_BLOCKS + decoder + 2 * (128 + 64 + 32)
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 1, 64, 64)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("size", [30, 40, 8])
def test_image_size_must_survive_four_poolings(size):
    with pytest.raises(ValueError, match="multiple of 16"):
        binary_cnn(size)


def test_knn_reference_round_trips_through_parquet(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 3)).astype(np.float32)
    labels = ["normal", "bacterial", "viral"] * 10
    uris = [f"/store/train/X/img{i}.jpeg" for i in range(30)]
    knn = KnnReference.fit(uris, labels, features, k=5, feature_kind="softmax")
    pq.write_table(knn.to_table(), tmp_path / "ref.parquet")
    again = KnnReference.from_table(pq.read_table(tmp_path / "ref.parquet"))
    assert (again.k, again.feature_kind) == (5, "softmax")
    query = rng.normal(size=(7, 3)).astype(np.float32)
    assert list(again.predict(query)) == list(knn.predict(query))
    _, neighbour_uris, distances = again.query(query)
    assert neighbour_uris.shape == (7, 5) and set(neighbour_uris.ravel()) <= set(uris)
    assert np.all(np.diff(distances, axis=1) >= 0)  # nearest first


@pytest.mark.parametrize("k", [4, 5])  # an even k makes tied votes
def test_one_knn_query_gives_predicts_labels_and_the_neighbours(k):
    rng = np.random.default_rng(1)
    labels = list(rng.choice(["normal", "bacterial", "viral"], 200))
    uris = [f"/ref/{i}.jpeg" for i in range(200)]
    knn = KnnReference.fit(uris, labels, rng.random((200, 3)), k=k, feature_kind="softmax")
    query = rng.random((500, 3)).astype(np.float32)
    voted, neighbour_uris, distances = knn.query(query)
    assert list(voted) == list(knn.predict(query))
    expected_distances, index = knn.classifier.kneighbors(query)
    assert np.array_equal(neighbour_uris, knn.uris[index])
    assert np.array_equal(distances, expected_distances.astype(np.float32))


def test_knn_needs_k_reference_images_and_a_known_feature_kind():
    with pytest.raises(ValueError, match="at least k=5"):
        KnnReference.fit(["a"], ["normal"], np.zeros((1, 3)), k=5, feature_kind="softmax")
    with pytest.raises(ValueError, match="feature kind"):
        select_features(np.zeros((1, 3)), np.zeros((1, 128)), "pixels")


def test_autoencoder_outputs_give_the_pixel_error_and_a_pooled_code():
    torch.manual_seed(0)
    model = ConvAutoencoder(64).eval()
    x = torch.rand(3, 1, 64, 64)
    mse, code = autoencoder_outputs(model, x)
    with torch.inference_mode():
        np.testing.assert_allclose(mse.numpy(), reconstruction_error(model, x).numpy(), rtol=1e-6)
    assert code.shape == (3, 32 + 64 + 128 + 256)


def test_normal_reference_scores_distance_to_normal_images(tmp_path):
    rng = np.random.default_rng(0)
    normal = rng.normal(0, 1, (200, 16)).astype(np.float32)
    reference = NormalReference.fit([f"/n/{i}.jpeg" for i in range(200)], normal, k=5)
    typical = rng.normal(0, 1, (50, 16))
    unusual = rng.normal(3, 1, (50, 16))
    assert reference.score(unusual).min() > np.median(reference.score(typical))

    pq.write_table(reference.to_table(), tmp_path / "ref.parquet")
    loaded = NormalReference.from_table(pq.read_table(tmp_path / "ref.parquet"))
    assert loaded.k == 5 and list(loaded.uris) == list(reference.uris)
    np.testing.assert_allclose(loaded.score(unusual), reference.score(unusual), rtol=1e-6)
    with pytest.raises(ValueError, match="more than k=5"):
        NormalReference.fit(["/a"] * 5, normal[:5], k=5)
