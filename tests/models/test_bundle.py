from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pneumo_ray.io.images import to_model_input
from pneumo_ray.io.labels import CLASS_LABELS
from pneumo_ray.models.anomaly import NormalReference, autoencoder_outputs
from pneumo_ray.models.autoencoder import ConvAutoencoder, reconstruction_error
from pneumo_ray.models.bundle import Bundle, BundleError, load_bundle, write_bundle
from pneumo_ray.models.cnn import binary_cnn, multiclass_cnn
from pneumo_ray.models.knn import KnnReference

SIZE = 32


def tiny_bundle(anomaly_score: str = "latent") -> Bundle:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    knn = KnnReference.fit(
        [f"/ref/{i}.jpeg" for i in range(12)],
        list(CLASS_LABELS) * 4,
        rng.random((12, 3)).astype(np.float32),
        k=3,
        feature_kind="softmax",
    )
    reference = NormalReference.fit(
        [f"/normal/{i}.jpeg" for i in range(10)], rng.random((10, 480)).astype(np.float32), k=3
    )
    card = {
        "image_size": SIZE,
        "models": {
            "binary": {"threshold": 0.5},
            "autoencoder": {"threshold": 0.01, "score": anomaly_score},
        },
    }
    return Bundle(
        card,
        binary_cnn(SIZE).eval(),
        multiclass_cnn(SIZE).eval(),
        ConvAutoencoder(SIZE).eval(),
        knn,
        normal_reference=reference,
    )


def test_a_site_head_gives_the_three_class_columns_and_the_trained_head_the_knn(tmp_path):
    """pneumo-adapt --fine-tune's site head: the three-class probabilities and class come from
    it, the KNN (built on the trained head's softmax) and the binary call do not move; a copy
    of the trained head changes nothing; the head round-trips through the bundle's files."""
    from pneumo_ray.models.bundle import SITE_HEAD_FILE
    from pneumo_ray.models.cnn import SiteHead

    bundle = tiny_bundle()
    images = np.random.default_rng(2).integers(0, 256, (6, SIZE, SIZE), dtype=np.uint8)
    trained = bundle.predict(images)
    bundle.multiclass_site = SiteHead(bundle.multiclass).eval()
    copied = bundle.predict(images)
    for column in ("p_normal", "p_bacterial", "p_pneumonia", "knn_distances"):
        np.testing.assert_allclose(copied[column], trained[column], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        bundle.multiclass_site.head.bias.copy_(torch.tensor([-4.0, 0.0, 4.0]))
    site = bundle.predict(images)
    assert (site["p_viral"] > trained["p_viral"]).all() and set(site["pred_class"]) == {"viral"}
    for column in ("knn_distances", "p_pneumonia_cnn"):
        np.testing.assert_array_equal(site[column], trained[column])
    assert list(site["knn_label"]) == list(trained["knn_label"])

    card = write_bundle(bundle, str(tmp_path / "bundle"))
    assert SITE_HEAD_FILE in card["files"]
    loaded = load_bundle(str(tmp_path / "bundle"))
    np.testing.assert_allclose(loaded.predict(images)["p_viral"], site["p_viral"], rtol=1e-5)
    assert SITE_HEAD_FILE not in write_bundle(tiny_bundle(), str(tmp_path / "plain"))["files"]


def test_bundle_round_trip_predicts_the_same(tmp_path):
    bundle = tiny_bundle()
    images = np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE), dtype=np.uint8)
    before = bundle.predict(images)
    card = write_bundle(bundle, str(tmp_path / "bundle"))
    assert {
        "binary.pt",
        "multiclass.pt",
        "autoencoder.pt",
        "knn_reference.parquet",
        "normal_reference.parquet",
    } == set(card["files"])
    assert card["model_version"].startswith("pneumo-")
    # Weights are plain state dicts that load without running code.
    state = torch.load(tmp_path / "bundle" / "binary.pt", weights_only=True)
    assert set(state) == set(binary_cnn(SIZE).state_dict())

    loaded = load_bundle(str(tmp_path / "bundle"))
    after = loaded.predict(images)
    assert loaded.model_version == card["model_version"]
    for column in (
        "p_pneumonia",
        "p_normal",
        "anomaly_score",
        "reconstruction_mse",
        "knn_distances",
    ):
        np.testing.assert_allclose(after[column], before[column], rtol=1e-5, atol=1e-6)
    for column in ("pred_binary", "pred_class", "knn_label"):
        assert list(after[column]) == list(before[column])
    np.testing.assert_allclose(
        after["p_normal"] + after["p_bacterial"] + after["p_viral"], 1, rtol=1e-5
    )
    assert after["knn_neighbors"].shape == (5, 3)


def test_tampered_bundle_file_fails_with_a_clear_error(tmp_path):
    write_bundle(tiny_bundle(), str(tmp_path / "b"))
    weights = tmp_path / "b" / "multiclass.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BundleError, match="multiclass.pt.*does not match the card"):
        load_bundle(str(tmp_path / "b"))


def test_missing_card_or_file_is_a_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(str(tmp_path))
    write_bundle(tiny_bundle(), str(tmp_path / "b"))
    (tmp_path / "b" / "knn_reference.parquet").unlink()
    with pytest.raises(BundleError, match="knn_reference.parquet: missing"):
        load_bundle(str(tmp_path / "b"))
    card = json.loads((tmp_path / "b" / "card.json").read_text())
    card["format"] = "something/else"
    (tmp_path / "b" / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="format"):
        load_bundle(str(tmp_path / "b"))


@pytest.mark.parametrize("kind", ["latent", "mse"])
def test_anomaly_score_is_the_one_the_card_names(kind):
    bundle = tiny_bundle(kind)
    images = np.random.default_rng(2).integers(0, 256, (4, SIZE, SIZE), dtype=np.uint8)
    out = bundle.predict(images)
    x = to_model_input(images)
    with torch.inference_mode():
        mse = reconstruction_error(bundle.autoencoder, x).numpy()
        code = autoencoder_outputs(bundle.autoencoder, x)[1].numpy()
    np.testing.assert_allclose(out["reconstruction_mse"], mse, rtol=1e-5)
    expected = bundle.normal_reference.score(code) if kind == "latent" else mse
    np.testing.assert_allclose(out["anomaly_score"], expected, rtol=1e-5)
    assert list(out["is_anomaly"]) == list(expected > bundle.anomaly_threshold)


def test_latent_score_without_its_reference_is_a_bundle_error(tmp_path):
    write_bundle(tiny_bundle("latent"), str(tmp_path / "b"))
    card = json.loads((tmp_path / "b" / "card.json").read_text())
    del card["files"]["normal_reference.parquet"]
    (tmp_path / "b" / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="latent anomaly score needs normal_reference"):
        load_bundle(str(tmp_path / "b"))
