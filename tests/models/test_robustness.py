"""Issue 11's levers one by one: architectures and their ImageNet weights, input
normalization, acquisition-shift augmentation, test-time augmentation, temperature scaling and
the combined binary score, and the inpainting anomaly score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumo_ray.config import ARCHITECTURES, LITE_ARCHITECTURES, ConfigError, TrainConfig
from pneumo_ray.io.images import AcquisitionShift, to_model_input
from pneumo_ray.models.anomaly import (
    hide,
    inpainting_error,
    inpainting_masks,
    masked_training_batch,
)
from pneumo_ray.models.autoencoder import ConvAutoencoder
from pneumo_ray.models.bundle import load_bundle, write_bundle
from pneumo_ray.models.calibration import (
    combined_score,
    expected_calibration_error,
    fit_temperature,
    sigmoid,
    softmax,
)
from pneumo_ray.models.cnn import ChestCNN, LiteCNN, TorchvisionCNN
from pneumo_ray.models.networks import build_network
from pneumo_ray.models.outputs import network_outputs

from ..conftest import write_imagenet_stand_in
from .test_bundle import SIZE, tiny_bundle

# --- architectures and pretrained weights ----------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("name", ["binary", "multiclass"])
def test_every_architecture_takes_one_channel_and_gives_logits_and_an_embedding(architecture, name):
    model = build_network(name, 64, {"architecture": architecture}).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        logits, embedding = model(x), model.embedding(x)
    assert logits.shape == ((2,) if name == "binary" else (2, 3))
    assert embedding.shape == (2, 128)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bundle_round_trip_keeps_every_architecture(tmp_path, architecture):
    bundle = tiny_bundle()
    spec = {"architecture": architecture, "normalization": "standardize"}
    torch.manual_seed(3)
    bundle.binary = build_network("binary", SIZE, spec).eval()
    bundle.multiclass = build_network("multiclass", SIZE, spec).eval()
    bundle.card["models"]["binary"].update(network=spec, temperature=1.7, score="combined")
    bundle.card["models"]["multiclass"] = {"network": spec, "temperature": 0.8}
    bundle.card["inference"] = {"tta": "flip"}
    images = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)
    before = bundle.predict(images)
    write_bundle(bundle, str(tmp_path / "b"))
    loaded = load_bundle(str(tmp_path / "b"))
    expected_type = (
        ChestCNN
        if architecture == "seed"
        else LiteCNN
        if architecture in LITE_ARCHITECTURES
        else TorchvisionCNN
    )
    assert isinstance(loaded.binary, expected_type)
    assert isinstance(loaded.multiclass, expected_type)
    after = loaded.predict(images)
    for column in ("p_pneumonia", "p_pneumonia_cnn", "p_normal", "p_viral"):
        np.testing.assert_allclose(after[column], before[column], rtol=1e-4, atol=1e-6)


def test_pretrained_imagenet_weights_load_through_torchvisions_weights_api(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source, path = write_imagenet_stand_in(tmp_path)
    for pretrained in ("imagenet", path):
        model = build_network(
            "binary", 64, {"architecture": "resnet18", "pretrained": pretrained}
        ).eval()
        deep = model.features.layer4[1].conv2.weight
        assert torch.equal(deep, source.layer4[1].conv2.weight)
        # The one-channel stem sums the RGB weights: a gray image gives what the RGB stem gave.
        gray = torch.rand(2, 1, 64, 64)
        with torch.inference_mode():
            expected = source.conv1(gray.repeat(1, 3, 1, 1))
            got = model.features.conv1(gray)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    fresh = build_network("binary", 64, {"architecture": "resnet18"})
    assert not torch.equal(fresh.features.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_pretrained_is_refused_for_the_seed_cnn_and_for_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="--pretrained needs a pretrained --architecture"):
        TrainConfig.from_flat(data="/s", output="/o", pretrained="imagenet")
    with pytest.raises(ConfigError, match="--pretrained must be imagenet or a state dict file"):
        TrainConfig.from_flat(
            data="/s", output="/o", architecture="resnet18", pretrained=str(tmp_path / "no.pth")
        )
    with pytest.raises(ConfigError, match="--architecture must be one of"):
        TrainConfig.from_flat(data="/s", output="/o", architecture="vgg")


def test_a_learned_framing_reference_needs_the_framing_augmentation():
    with pytest.raises(ConfigError, match="--framing-reference learned needs --framing-aug"):
        TrainConfig.from_flat(data="/s", output="/o", framing_reference="learned")
    with pytest.raises(ConfigError, match="--framing-reference must be one of"):
        TrainConfig.from_flat(
            data="/s", output="/o", framing_augmentation=True, framing_reference="thorax"
        )


def test_network_settings_change_the_run_key_and_the_designs_keep_it():
    base = TrainConfig.from_flat(data="/s", output="/o")
    for change in (
        {"architecture": "resnet18"},
        {"normalization": "standardize"},
        {"acquisition_shift": True},
        {"framing_augmentation": True},
    ):
        other = TrainConfig.from_flat(data="/s", output="/o", **change)
        assert other.run_key("binary") != base.run_key("binary"), change
        assert other.run_key("autoencoder") == base.run_key("autoencoder"), change
    framed = TrainConfig.from_flat(data="/s", output="/o", framing_augmentation=True)
    learned = TrainConfig.from_flat(
        data="/s", output="/o", framing_augmentation=True, framing_reference="learned"
    )
    assert learned.run_key("binary") != framed.run_key("binary")
    assert learned.run_key("autoencoder") == framed.run_key("autoencoder")
    masked = TrainConfig.from_flat(data="/s", output="/o", autoencoder_masking=0.5)
    assert masked.run_key("autoencoder") != base.run_key("autoencoder")
    assert masked.run_key("binary") == base.run_key("binary")
    # Inference-time choices do not retrain anything.
    for change in (
        {"tta": "flip"},
        {"binary_score": "network"},
        {"calibrate": False},
        {"counterfactual_images": 5},
    ):
        other = TrainConfig.from_flat(data="/s", output="/o", **change)
        assert other.run_key("binary") == base.run_key("binary"), change


# --- normalization and augmentation ----------------------------------------------------------


@pytest.mark.parametrize("architecture", ["seed", "resnet18"])
def test_standardized_networks_ignore_exposure_and_contrast(architecture):
    torch.manual_seed(0)
    spec = {"architecture": architecture, "normalization": "standardize"}
    model = build_network("binary", 64, spec).eval()
    plain = build_network("binary", 64, {"architecture": architecture}).eval()
    x = torch.rand(3, 1, 64, 64) * 0.5 + 0.2
    shifted = 0.6 * x + 0.25  # another site's window and level
    with torch.inference_mode():
        torch.testing.assert_close(model(shifted), model(x), rtol=1e-3, atol=1e-4)
        assert not torch.allclose(plain(shifted), plain(x), rtol=1e-3, atol=1e-4)


def _sharpness(image: torch.Tensor) -> float:
    laplacian = image[:, 1:-1, 1:-1] * 4 - image[:, :-2, 1:-1] - image[:, 2:, 1:-1]
    laplacian = laplacian - image[:, 1:-1, :-2] - image[:, 1:-1, 2:]
    return float(laplacian.std())


def test_acquisition_shift_draws_blur_sharpening_gamma_and_keeps_the_range():
    image = torch.rand(1, 64, 64)
    shift = AcquisitionShift()
    torch.manual_seed(0)
    outputs = [shift(image) for _ in range(60)]
    assert all(o.shape == image.shape and o.min() >= 0 and o.max() <= 1 for o in outputs)
    sharpness = np.array([_sharpness(o) for o in outputs])
    base = _sharpness(image)
    assert (sharpness < 0.7 * base).sum() >= 5  # blurred or resampled
    assert (sharpness > 1.05 * base).sum() >= 3  # sharpened or noisy
    means = np.array([float(o.mean()) for o in outputs])
    assert means.min() < float(image.mean()) - 0.03  # gamma above 1 darkens
    torch.manual_seed(0)
    again = [shift(image) for _ in range(60)]
    assert all(torch.equal(a, b) for a, b in zip(outputs, again, strict=True))  # seeded


# --- test-time augmentation ------------------------------------------------------------------


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    binary = build_network("binary", 32).eval()
    multiclass = build_network("multiclass", 32).eval()
    x = torch.rand(4, 1, 32, 32)
    models = {"binary": binary, "multiclass": multiclass}
    out = network_outputs(models, x, tta="flip")
    plain = network_outputs(models, x)
    mirrored = network_outputs(models, torch.flip(x, dims=(3,)))
    for key in ("binary_logit", "multiclass_logits", "embedding"):
        np.testing.assert_allclose(out[key], (plain[key] + mirrored[key]) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out["binary_logit"], plain["binary_logit"])
    # A mirror-symmetric image gets the same outputs with or without TTA.
    symmetric = torch.cat([x[..., :16], torch.flip(x[..., :16], dims=(3,))], dim=3)
    np.testing.assert_allclose(
        network_outputs(models, symmetric, tta="flip")["binary_logit"],
        network_outputs(models, symmetric)["binary_logit"],
        rtol=1e-5,
        atol=1e-6,
    )


# --- calibration and the combined score ------------------------------------------------------


def test_temperature_scaling_recovers_an_overconfidence_factor():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 20_000)
    labels = rng.random(20_000) < sigmoid(true_logit)
    assert fit_temperature(3.0 * true_logit, labels) == pytest.approx(3.0, rel=0.05)
    logits = rng.normal(0, 1.5, (20_000, 3))
    classes = np.array([rng.choice(3, p=p) for p in softmax(logits)])
    assert fit_temperature(0.5 * logits, classes) == pytest.approx(0.5, rel=0.05)
    assert fit_temperature(logits, np.zeros(20_000, dtype=int)) == 1.0  # one class: nothing to fit


def test_score_map_recovers_a_shift_and_a_scale_and_keeps_the_ranking():
    from pneumo_ray.models.calibration import apply_score_map, fit_score_map, logit

    rng = np.random.default_rng(3)
    true_logit = rng.normal(0, 2, 20_000)
    labels = rng.random(20_000) < sigmoid(true_logit)
    # Scores that sit 2.5 logits too high and 1.5 times too sure, as on another site:
    # logit(p) = 1.5 * true + 2.5, so true = a logit(p) + b with a = 1 / 1.5, b = -2.5 / 1.5.
    p = sigmoid(1.5 * true_logit + 2.5)
    score_map = fit_score_map(p, labels)
    assert score_map["a"] == pytest.approx(1 / 1.5, rel=0.05)
    assert score_map["b"] == pytest.approx(-2.5 / 1.5, abs=0.1)
    mapped = apply_score_map(p, score_map)
    assert expected_calibration_error(mapped, labels) < 0.02 < expected_calibration_error(p, labels)
    assert (np.argsort(mapped, kind="stable") == np.argsort(p, kind="stable")).all()
    assert np.isfinite(logit(np.array([0.0, 1.0]))).all()  # saturated scores stay finite
    assert fit_score_map(p, np.ones(20_000, dtype=bool)) == {"a": 1.0, "b": 0.0}


def test_expected_calibration_error_is_small_when_calibrated_and_large_when_not():
    rng = np.random.default_rng(1)
    p = rng.random(50_000)
    outcome = rng.random(50_000) < p
    assert expected_calibration_error(p, outcome) < 0.01
    overconfident = np.where(p > 0.5, 1.0, 0.0)
    assert expected_calibration_error(overconfident, outcome) > 0.2


def test_bundle_applies_its_temperatures_and_the_combined_score():
    bundle = tiny_bundle()
    bundle.card["models"]["binary"].update(temperature=2.5, score="combined", threshold=0.45)
    bundle.card["models"]["multiclass"] = {"temperature": 0.7}
    images = np.random.default_rng(2).integers(0, 256, (6, SIZE, SIZE), dtype=np.uint8)
    out = bundle.predict(images)
    raw = network_outputs(bundle.networks, to_model_input(images))
    p_cnn = sigmoid(raw["binary_logit"] / 2.5)
    probs = softmax(raw["multiclass_logits"] / 0.7)
    np.testing.assert_allclose(out["p_pneumonia_cnn"], p_cnn, rtol=1e-5)
    np.testing.assert_allclose(out["p_normal"], probs[:, 0], rtol=1e-5)
    combined = combined_score(p_cnn, probs[:, 0])
    np.testing.assert_allclose(out["p_pneumonia"], combined, rtol=1e-5)
    assert list(out["pred_binary"]) == list(np.where(combined >= 0.45, "pneumonia", "normal"))
    assert list(out["pred_class"]) == list(
        np.asarray(["normal", "bacterial", "viral"])[raw["probs"].argmax(axis=1)]
    )  # calibration never changes the argmax
    bundle.card["models"]["binary"]["score"] = "network"
    np.testing.assert_allclose(bundle.predict(images)["p_pneumonia"], p_cnn, rtol=1e-5)
    # A site's score maps (pneumo-adapt) apply after the temperatures, to both binary scores.
    from pneumo_ray.models.calibration import apply_score_map

    maps = {"p_pneumonia": {"a": 0.8, "b": -1.0}, "p_pneumonia_cnn": {"a": 1.2, "b": 0.5}}
    bundle.card["calibration"] = {"score_maps": maps}
    out = bundle.predict(images)
    for name in maps:
        np.testing.assert_allclose(out[name], apply_score_map(p_cnn, maps[name]), rtol=1e-5)
    assert list(out["pred_binary"]) == list(
        np.where(out["p_pneumonia"] >= 0.45, "pneumonia", "normal")
    )


# --- the inpainting anomaly score ------------------------------------------------------------


def test_inpainting_masks_hide_every_pixel_exactly_once():
    masks = inpainting_masks(64)
    assert masks.shape == (4, 1, 64, 64)
    assert torch.equal(masks.sum(dim=0), torch.ones(1, 64, 64, dtype=torch.long))
    assert all(float(m.float().mean()) == 0.25 for m in masks)
    assert masks[0, 0, 0, 0] and not masks[0, 0, 0, 8] and masks[3, 0, 8, 8]  # 8 px patches


class _Echo(torch.nn.Module):
    """An 'autoencoder' that returns its input: inpainting error = error of the fill."""

    def forward(self, x):
        return x


def test_inpainting_error_is_taken_on_the_hidden_patches_only():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 32, 32)
    masks = inpainting_masks(32)
    expected = torch.zeros_like(x)
    for mask in masks:
        expected = torch.where(mask, (hide(x, mask) - x).pow(2), expected)
    got = inpainting_error(_Echo(), x)
    torch.testing.assert_close(got, expected.mean(dim=(1, 2, 3)))
    # Patches filled exactly right cost nothing: an image equal to its own mean scores 0.
    flat = torch.full((1, 1, 32, 32), 0.4)
    assert float(inpainting_error(_Echo(), flat)) == pytest.approx(0.0, abs=1e-12)
    assert inpainting_error(ConvAutoencoder(32).eval(), x).shape == (3,)


def test_masked_training_hides_one_mask_per_chosen_image():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 32, 32) + 1.0  # never equal to a fill below 1
    assert torch.equal(masked_training_batch(x, 0.0), x)
    masked = masked_training_batch(x, 1.0)
    changed = (masked != x).float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(changed, torch.full((64,), 0.25))
    half = (masked_training_batch(x, 0.5) != x).flatten(1).any(dim=1).float().mean()
    assert 0.3 < float(half) < 0.7
