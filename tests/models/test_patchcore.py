"""PatchCore on ImageNet EfficientNet-Lite patch features: the score, the coreset, storage."""

import numpy as np
import pytest
import torch

from pneumo_ray.models.patchcore import (
    PatchFeatures,
    PatchMemory,
    greedy_coreset,
    nearest_distances,
    reduce_patches,
)


def _chest_like(rng: np.random.Generator, size: int = 96) -> torch.Tensor:
    """A smooth 'normal' image: two dark lung fields on a bright body, mild noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = 0.75 - 0.45 * (
        np.exp(-(((xx - 0.3) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
        + np.exp(-(((xx - 0.7) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    )
    image = image + rng.normal(0, 0.02, image.shape)
    return torch.from_numpy(image.astype(np.float32))[None]


def test_an_out_of_place_patch_scores_higher_than_normal_images():
    rng = np.random.default_rng(0)
    extractor = PatchFeatures("efficientnet_lite0", pretrained=True)
    normal_train = torch.stack([_chest_like(rng) for _ in range(12)])
    normal_test = torch.stack([_chest_like(rng) for _ in range(4)])
    odd = torch.stack([_chest_like(rng) for _ in range(4)])
    odd[:, :, 30:54, 14:38] = torch.from_numpy(  # a checkered opacity in the left lung
        (np.indices((24, 24)).sum(axis=0) // 3 % 2).astype(np.float32)
    )
    with torch.inference_mode():
        features = extractor(normal_train)
    grid = 96 // 16
    assert features.shape[:2] == (12, grid * grid)
    memory = PatchMemory.fit(features.numpy(), grid)
    assert len(memory.features) == int(np.ceil(0.1 * 12 * grid * grid))
    extractor.set_memory(memory.features)
    with torch.inference_mode():
        normal_distances, odd_distances = extractor(normal_test), extractor(odd)
    assert normal_distances.shape == (4, grid * grid)
    for reduction in ("max", "top5"):
        normal_scores = reduce_patches(normal_distances.numpy(), reduction)
        odd_scores = reduce_patches(odd_distances.numpy(), reduction)
        assert odd_scores.min() > normal_scores.max(), reduction
    # the largest patch distance sits where the opacity is (grid rows 1-3, columns 0-2)
    where = odd_distances.reshape(4, grid, grid)[0].argmax()
    assert divmod(int(where), grid)[0] in (1, 2, 3) and divmod(int(where), grid)[1] in (0, 1, 2)


def test_nearest_distances_match_the_brute_force():
    rng = np.random.default_rng(1)
    patches = torch.from_numpy(rng.normal(size=(3, 7, 5)).astype(np.float32))
    memory = torch.from_numpy(rng.normal(size=(11, 5)).astype(np.float32))
    brute = torch.cdist(patches.reshape(-1, 5), memory).min(dim=1).values.reshape(3, 7)
    assert torch.allclose(nearest_distances(patches, memory), brute, atol=1e-5)


def test_greedy_coreset_covers_every_cluster():
    rng = np.random.default_rng(2)
    centers = rng.normal(scale=50, size=(5, 200))
    points = np.concatenate([c + rng.normal(size=(400, 200)) for c in centers])
    chosen = greedy_coreset(points.astype(np.float32), 5)
    assert sorted(set(chosen // 400)) == [0, 1, 2, 3, 4]  # one from each, nothing twice


def test_memory_round_trips_through_parquet_without_pickle():
    memory = PatchMemory(np.random.default_rng(3).random((20, 6), np.float32), 4, "top5", 80)
    back = PatchMemory.from_table(memory.to_table())
    assert np.array_equal(back.features, memory.features)
    assert (back.grid, back.reduction, back.source_patches) == (4, "top5", 80)
    with pytest.raises(ValueError, match="reduction"):
        reduce_patches(np.zeros((1, 4)), "mean")


def test_bundle_round_trip_with_a_lite_backbone_and_patchcore(tmp_path):
    """Fine-tuned Lite CNNs and the PatchCore score survive write and load: same outputs, the
    extractor as a weights-only state dict, the memory as Parquet, both under the card's
    sha256."""
    from pneumo_ray.models.bundle import load_bundle, write_bundle
    from pneumo_ray.models.cnn import LiteCNN
    from pneumo_ray.models.networks import build_network

    from .test_bundle import tiny_bundle

    size = 64
    bundle = tiny_bundle("patchcore")
    bundle.card["image_size"] = size
    spec = {"architecture": "efficientnet_lite0", "normalization": "standardize"}
    torch.manual_seed(4)
    bundle.binary = build_network("binary", size, {**spec, "pretrained": "imagenet"}).eval()
    bundle.multiclass = build_network("multiclass", size, spec).eval()
    bundle.autoencoder = build_network("autoencoder", size).eval()
    bundle.card["models"]["binary"]["network"] = spec
    bundle.card["models"]["multiclass"] = {"network": spec}
    bundle.card["models"]["patchcore"] = {"architecture": "efficientnet_lite0"}
    rng = np.random.default_rng(5)
    extractor = PatchFeatures("efficientnet_lite0").eval()
    with torch.inference_mode():
        normal = extractor(torch.rand(6, 1, size, size))
    bundle.patch_memory = PatchMemory.fit(normal.numpy(), size // 16)
    bundle.patch_memory.reduction = "top5"
    bundle.patchcore = extractor.set_memory(bundle.patch_memory.features)
    images = rng.integers(0, 256, (3, size, size), dtype=np.uint8)
    before = bundle.predict(images)
    card = write_bundle(bundle, str(tmp_path / "b"))
    assert {"patchcore.pt", "patchcore_memory.parquet"} <= set(card["files"])
    state = torch.load(tmp_path / "b" / "patchcore.pt", weights_only=True)
    assert set(state) == set(PatchFeatures("efficientnet_lite0", pretrained=False).state_dict())
    loaded = load_bundle(str(tmp_path / "b"))
    assert isinstance(loaded.binary, LiteCNN) and loaded.patch_memory.reduction == "top5"
    after = loaded.predict(images)
    for column in ("p_pneumonia", "p_normal", "anomaly_score", "reconstruction_mse"):
        np.testing.assert_allclose(after[column], before[column], rtol=1e-4, atol=1e-6)
    assert (after["anomaly_score"] > 0).all()
