"""Site fine-tuning of the CNNs' heads (issue 32, point 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pneumo_ray.io.images import to_model_input
from pneumo_ray.models.cnn import build_cnn
from pneumo_ray.models.outputs import network_outputs
from pneumo_ray.training.finetune import (
    FineTuneSettings,
    cross_fitted_logits,
    example_weights,
    fine_tune_head,
    head_inputs,
    head_logits,
)

SIZE = 32


def squares(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images with a bright square in the left half (class 1) or the right half (class 0)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 60, (n, SIZE, SIZE)).astype(np.uint8)
    for image, label in zip(images, labels, strict=True):
        top = rng.integers(4, SIZE - 12)
        left = rng.integers(2, SIZE // 2 - 10) + (0 if label else SIZE // 2)
        image[top : top + 8, left : left + 8] = 230
    return images, labels


def backbone_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("features.")}


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_cnn(1, SIZE).eval()


def test_head_logits_are_the_networks_own(network):
    """The head on cached features gives what the whole network gives, flip TTA included."""
    images, _ = squares(20, 0)
    features = head_inputs(network, images, tta="flip")
    assert features.shape[:2] == (20, 2)
    expected = network_outputs({"binary": network}, to_model_input(images), "flip")
    np.testing.assert_allclose(
        head_logits(network, features), expected["binary_logit"], rtol=1e-4, atol=1e-5
    )


def test_fine_tuning_learns_the_site_and_leaves_the_backbone(network):
    """A head refitted on the site's labels separates the site's classes, which the untrained
    network does not; the backbone and the network it came from do not change."""
    site, site_y = squares(120, 1)
    train, train_y = squares(60, 2)
    test, test_y = squares(100, 3)
    before_backbone, before_head = backbone_state(network), network.head.weight.clone()
    site_f, train_f, test_f = (head_inputs(network, x) for x in (site, train, test))
    auc_before = roc_auc_score(test_y, head_logits(network, test_f))
    tuned = fine_tune_head(
        network, site_f, site_y, train_f, train_y, FineTuneSettings(epochs=30, lr=3e-3)
    )
    auc_after = roc_auc_score(test_y, head_logits(tuned, test_f))
    assert auc_after > 0.9 and auc_after > auc_before + 0.2, (auc_before, auc_after)
    for name, value in backbone_state(tuned).items():
        torch.testing.assert_close(value, before_backbone[name])
    torch.testing.assert_close(network.head.weight, before_head)
    assert not torch.equal(tuned.head.weight, network.head.weight)


def test_fine_tuning_is_seeded(network):
    site, site_y = squares(60, 4)
    features = head_inputs(network, site)
    settings = FineTuneSettings(epochs=2, seed=3)
    a, b = (
        head_logits(fine_tune_head(network, features, site_y, features, site_y, settings), features)
        for _ in range(2)
    )
    np.testing.assert_array_equal(a, b)


def test_cross_fitted_logits_never_come_from_a_head_that_saw_the_patient(network):
    """Labels that only identify patients (random per patient) cannot be learned across
    patients: in-sample logits memorise them, cross-fitted ones do not."""
    rng = np.random.default_rng(5)
    patients = np.repeat(np.arange(60), 2)  # two identical films per patient
    patient_y = rng.integers(0, 2, 60)
    images = np.repeat(rng.integers(0, 255, (60, SIZE, SIZE)).astype(np.uint8), 2, axis=0)
    features, targets = head_inputs(network, images), patient_y[patients]
    settings = FineTuneSettings(epochs=60, lr=3e-3, site_share=1.0)
    rows = np.arange(len(images))
    in_sample = head_logits(
        fine_tune_head(network, features, targets, features[:0], targets[:0], settings), features
    )
    crossed = cross_fitted_logits(
        network, features, rows, targets, patients, features[:0], targets[:0], settings
    )
    assert roc_auc_score(targets, in_sample) > 0.95
    assert roc_auc_score(targets, crossed) < 0.75


def test_cross_fitted_logits_of_unlabelled_rows_average_both_heads(network):
    site, site_y = squares(40, 6)
    features = head_inputs(network, site)
    labelled = np.arange(30)
    settings = FineTuneSettings(epochs=1)
    logits = cross_fitted_logits(
        network, features, labelled, site_y[:30], np.arange(40), features[:0], site_y[:0], settings
    )
    assert logits.shape == (40,) and np.isfinite(logits).all()


def test_example_weights_give_each_part_and_class_its_share():
    targets = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 1])
    is_site = np.arange(10) < 4
    w = example_weights(targets, is_site, 0.5)
    assert w.sum() == pytest.approx(10)
    assert w[is_site].sum() == pytest.approx(w[~is_site].sum())
    assert w[is_site & (targets == 0)].sum() == pytest.approx(w[is_site & (targets == 1)].sum())
    assert w[~is_site & (targets == 0)].sum() == pytest.approx(w[~is_site & (targets == 1)].sum())


def test_settings_reject_nonsense():
    with pytest.raises(ValueError, match="site_share"):
        FineTuneSettings(site_share=0.0)
    with pytest.raises(ValueError, match="epoch"):
        FineTuneSettings(epochs=0)


def test_the_site_head_of_pneumo_adapt_fine_tune(monkeypatch):
    """fine_tune_site_head: refuses too few images and a missing class; otherwise gives the
    bundle a site head whose three-class logits learned the site (a class the trained head
    does not know, here: bright squares are viral), out-of-fold logits for the operating
    point, and the card's record; the trained network is left as it was."""
    from pneumo_ray.errors import SiteError
    from pneumo_ray.training import finetune

    from ..models.test_bundle import tiny_bundle

    bundle = tiny_bundle()
    trained_state = {k: v.clone() for k, v in bundle.multiclass.state_dict().items()}
    images, square_left = squares(120, 0)
    labels = np.where(square_left == 1, 2, 0)  # viral or normal
    labels[::10] = 1  # and a few bacterial
    groups = np.arange(120) // 2
    train_images, train_left = squares(60, 1)
    monkeypatch.setattr(
        finetune, "training_examples",
        lambda bundle, seed=0: (train_images, np.where(train_left == 1, 2, 0)),
    )  # fmt: skip
    outputs = {"label_index": labels, "multiclass_logits": np.zeros((120, 3), np.float32)}
    settings = FineTuneSettings(epochs=20, lr=3e-3)
    with pytest.raises(SiteError, match="at least 100 labelled images"):
        finetune.fine_tune_site_head(
            bundle, {"label_index": labels[:99]}, images[:99], groups[:99], settings
        )
    with pytest.raises(SiteError, match="every class is needed"):
        finetune.fine_tune_site_head(
            bundle, {"label_index": np.minimum(labels, 1)}, images, groups, settings
        )
    assert bundle.multiclass_site is None
    is_viral = labels == 2
    assert roc_auc_score(is_viral, bundle.predict(images)["p_viral"]) < 0.8  # as trained

    out, record = finetune.fine_tune_site_head(bundle, outputs, images, groups, settings)
    assert bundle.multiclass_site is not None
    assert record["images"] == 120 and record["patients"] == 60
    counts = np.bincount(labels, minlength=3).tolist()
    assert list(record["class_counts"].values()) == counts and counts[1] == 12
    assert record["training_images"] == 60 and record["settings"]["epochs"] == 20
    site_probs = bundle.predict(images)["p_viral"]
    assert roc_auc_score(is_viral, site_probs) > 0.9
    assert roc_auc_score(is_viral, out["multiclass_logits"][:, 2]) > 0.8  # out of fold
    for key, value in bundle.multiclass.state_dict().items():
        assert torch.equal(value, trained_state[key]), key
