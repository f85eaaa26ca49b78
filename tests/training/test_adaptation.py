"""pneumo-adapt: a bundle's operating point re-chosen on a site's labelled images."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pneumo_ray.errors import ConfigError, SiteError
from pneumo_ray.io.labels import CLASS_LABELS, LabelledImage, patient_folds
from pneumo_ray.models import calibration
from pneumo_ray.models.bundle import load_bundle, write_bundle
from pneumo_ray.training import report
from pneumo_ray.training.adaptation import SiteRules, adapt, with_patch_distances

from ..conftest import run_job
from ..models.test_bundle import tiny_bundle

PER_CLASS = 40


def site(shift: float = 3.5, seed: int = 0) -> tuple[dict, list[LabelledImage]]:
    """Raw network outputs of a site where the binary network scores the normal images
    ``shift`` logits higher than where it was trained (normals at -3 + shift, pneumonias at 4),
    and the listed images they belong to (two images per patient)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), PER_CLASS)
    n = len(labels)
    names = {0: "NORMAL/IM-{:04d}-{:04d}.jpeg", 1: "PNEUMONIA/person{}_bacteria_{}.jpeg",
             2: "PNEUMONIA/person{}_virus_{}.jpeg"}  # fmt: skip
    images = [
        LabelledImage(
            f"/site/test/{names[label].format(1000 + i // 2, i)}",
            "test",
            CLASS_LABELS[label],
            f"{'IM-' if label == 0 else 'person'}{1000 + i // 2}",
            size=1000 + i,
        )
        for i, label in enumerate(labels)
    ]
    logits = rng.normal(0, 1, (n, 3)).astype(np.float32)
    logits[np.arange(n), labels] += 2.5
    outputs = {
        "image_uri": np.array([image.uri for image in images]),
        "label_index": labels,
        "binary_logit": np.where(labels > 0, 4.0, -3.0 + shift).astype(np.float32)
        + rng.normal(0, 1, n).astype(np.float32),
        "multiclass_logits": logits,
        "probs": calibration.softmax(logits).astype(np.float32),
        "embedding": rng.normal(0, 1, (n, 128)).astype(np.float32),
        "ae_mse": rng.random(n).astype(np.float32),
        "ae_code": rng.random((n, 480)).astype(np.float32),
        "image_mean": rng.random(n).astype(np.float32),
        "image_contrast": rng.random(n).astype(np.float32),
        "image_sharpness": rng.random(n).astype(np.float32),
    }
    return outputs, images


def trained_card(bundle) -> dict:
    """What the training job's card says that adaptation reads or replaces."""
    bundle.card["models"]["binary"].update(
        temperature=1.0,
        threshold_rule="highest threshold with validation sensitivity >= 0.95",
        validation={"sensitivity": 0.95, "specificity": 1.0},
    )
    bundle.card["models"]["multiclass"] = {"temperature": 1.0}
    bundle.card["models"]["knn"] = {"reference_images": len(bundle.knn.uris)}
    bundle.card["training"] = {
        "config": {
            "binary_threshold": "sensitivity",
            "target_sensitivity": 0.95,
            "anomaly_percentile": 95.0,
            "calibrate": True,
        }
    }
    bundle.card["metrics"] = {"test": {"binary": {"headline": {"accuracy": 0.9}}}}
    return bundle.card


@pytest.fixture
def bundle():
    b = tiny_bundle()
    trained_card(b)
    return b


def test_the_operating_point_is_rechosen_on_the_site_with_the_training_rules(bundle):
    outputs, images = site()
    is_pneumonia = outputs["label_index"] > 0
    previous_threshold = bundle.binary_threshold
    trained_reference = bundle.normal_reference
    before = bundle.finish(outputs)

    record = adapt(bundle, outputs, images, SiteRules.from_card(bundle.card), {"store": "/site"})

    binary, multiclass = bundle.card["models"]["binary"], bundle.card["models"]["multiclass"]
    # The temperatures are the site's NLL fits, the threshold the training rule on the site's
    # calibrated scores, the anomaly threshold the site normals' 95th percentile.
    t_binary = calibration.fit_temperature(outputs["binary_logit"], is_pneumonia)
    assert binary["temperature"] == pytest.approx(t_binary)
    assert multiclass["temperature"] == pytest.approx(
        calibration.fit_temperature(outputs["multiclass_logits"], outputs["label_index"])
    )
    # Then the score map: Platt scaling of the temperature-scaled score, on the site.
    p = calibration.sigmoid(outputs["binary_logit"] / t_binary)
    score_map = calibration.fit_score_map(p, is_pneumonia)
    assert bundle.card["calibration"]["score_maps"]["p_pneumonia"] == pytest.approx(score_map)
    p = calibration.apply_score_map(p, score_map)
    assert bundle.binary_threshold == pytest.approx(
        report.sensitivity_threshold(is_pneumonia, p, 0.95)
    )
    # The site's normal images joined the latent reference; each normal's score for the
    # threshold is against the reference with the other half of the normal patients only.
    normals = np.flatnonzero(~is_pneumonia)
    halves = np.array(patient_folds([images[i] for i in normals], 2, seed=0))
    held_out = np.empty(len(normals))
    for half in (0, 1):
        other = normals[halves != half]
        reference = trained_reference.extended(
            list(outputs["image_uri"][other]), outputs["ae_code"][other]
        )
        held_out[halves == half] = reference.score(outputs["ae_code"][normals[halves == half]])
    assert bundle.anomaly_threshold == pytest.approx(np.percentile(held_out, 95))
    assert len(bundle.normal_reference.uris) == len(trained_reference.uris) + PER_CLASS
    assert "site sensitivity >= 0.95" in binary["threshold_rule"]
    assert binary["site"]["sensitivity"] >= 0.95
    assert "validation" not in binary  # the training's operating point moved to "previous"

    # The site's normals were called pneumonia at the validation threshold; not after.
    after = bundle.finish(outputs)
    specificity = [
        np.mean(run["pred_binary"][~is_pneumonia] == "normal") for run in (before, after)
    ]
    assert specificity[0] < 0.5 and specificity[1] > 0.9
    drift = bundle.drift_reference.to_pydict()  # out-of-sample flags: about 5% of normals
    assert np.mean(np.asarray(drift["is_anomaly"])[~is_pneumonia]) == pytest.approx(0.05, abs=0.03)

    # The record keeps what was replaced, and what the site was.
    assert record["previous"]["binary"]["threshold"] == previous_threshold
    assert record["previous"]["binary"]["validation"] == {"sensitivity": 0.95, "specificity": 1.0}
    assert record["previous"]["metrics"]["test"]["binary"]["headline"]["accuracy"] == 0.9
    assert record["previous"]["anomaly_reference"] == {"images": len(trained_reference.uris)}
    assert "metrics" not in bundle.card  # the test figures were the old operating point's
    assert record["images"] == 3 * PER_CLASS and record["patients"] == 3 * PER_CLASS // 2
    assert record["class_counts"] == dict.fromkeys(CLASS_LABELS, PER_CLASS)
    assert record["store"] == "/site"
    assert bundle.card["site_adaptations"] == [record]
    # The site's scores sat too high as a whole: the map lowers them, the ECE falls.
    ece = bundle.card["calibration"]["site_ece"]
    assert ece["calibrated"]["p_pneumonia"] < 0.5 * ece["uncalibrated"]["p_pneumonia"]
    assert calibration.expected_calibration_error(after["p_pneumonia"], is_pneumonia) == (
        pytest.approx(ece["calibrated"]["p_pneumonia"])
    )


def test_no_score_map_keeps_the_temperatures_alone(bundle):
    outputs, images = site()
    adapt(bundle, outputs, images, SiteRules.from_card(bundle.card, score_map=False), {})
    assert "score_maps" not in bundle.card["calibration"]
    is_pneumonia = outputs["label_index"] > 0
    p = calibration.sigmoid(outputs["binary_logit"] / bundle.temperature("binary"))
    np.testing.assert_allclose(bundle.finish(outputs)["p_pneumonia"], p, rtol=1e-6)
    assert bundle.binary_threshold == pytest.approx(
        report.sensitivity_threshold(is_pneumonia, p, 0.95)
    )


def test_the_site_images_join_the_knn_references(bundle):
    outputs, images = site()
    old = len(bundle.knn.uris)
    adapt(bundle, outputs, images, SiteRules.from_card(bundle.card), {})
    assert len(bundle.knn.uris) == old + len(images)
    assert bundle.card["models"]["knn"]["reference_images"] == old + len(images)
    assert bundle.card["models"]["knn"]["site_reference_images"] == len(images)
    # A site image's nearest reference is itself, with its label.
    _, neighbours, distances = bundle.knn.query(outputs["probs"][:5])
    assert list(neighbours[:, 0]) == list(outputs["image_uri"][:5])
    np.testing.assert_allclose(distances[:, 0], 0, atol=1e-6)
    assert bundle.knn.k == 3


def test_knn_keep_leaves_the_references(bundle):
    outputs, images = site()
    uris = bundle.knn.uris.copy()
    adapt(bundle, outputs, images, SiteRules.from_card(bundle.card, knn="keep"), {})
    assert list(bundle.knn.uris) == list(uris)


def test_the_adapted_bundle_round_trips_with_a_new_version_and_a_site_drift_reference(
    bundle, tmp_path
):
    original = write_bundle(bundle, str(tmp_path / "trained"))
    outputs, images = site()
    adapt(bundle, outputs, images, SiteRules.from_card(bundle.card), {})
    adapted = write_bundle(bundle, str(tmp_path / "adapted"))
    assert adapted["model_version"] != original["model_version"]

    loaded = load_bundle(str(tmp_path / "adapted"))
    assert loaded.binary_threshold == pytest.approx(bundle.binary_threshold)
    assert loaded.temperature("binary") == pytest.approx(bundle.temperature("binary"))
    assert len(loaded.card["site_adaptations"]) == 1
    drift = pq.read_table(tmp_path / "adapted" / "drift_reference.parquet")
    assert drift.column("image_uri").to_pylist() == list(outputs["image_uri"])
    np.testing.assert_allclose(
        drift.column("p_pneumonia").to_numpy(), loaded.finish(outputs)["p_pneumonia"], rtol=1e-5
    )
    assert drift.column("image_bytes").to_pylist() == [image.size for image in images]
    assert "the 120 images of the site" in loaded.card["monitoring"]["reference"]


def patchcore_site(bundle, rng, n: int = 40):
    """PatchCore outputs (2 x 2 patches of 8 values) of a site whose images sit up to 3 away
    from the training normals' patches (along the diagonal, by an amount drawn per image), and
    whose pneumonia images each hold one patch moved off that line."""
    labels = np.repeat([0, 1], n)
    patches = rng.normal(0, 0.3, (2 * n, 4, 8)) + rng.uniform(0, 3, (2 * n, 1, 1))
    patches[labels == 1, 0, 0] += 3.0
    outputs, images = site()
    rows = np.r_[np.arange(n), PER_CLASS + np.arange(n)]  # n normal, then n bacterial
    outputs = {key: value[rows] for key, value in outputs.items()}
    outputs["label_index"] = labels
    outputs["patch_features"] = patches.reshape(2 * n, -1).astype(np.float32)
    return outputs, [images[i] for i in rows]


def test_the_site_normals_join_patchcores_memory_and_set_its_threshold_out_of_sample(bundle):
    from sklearn.metrics import roc_auc_score

    from pneumo_ray.models.patchcore import PatchFeatures, PatchMemory

    rng = np.random.default_rng(7)
    memory = PatchMemory.fit(rng.normal(0, 0.3, (60, 4, 8)).astype(np.float32), grid=2)
    memory.reduction = "max"
    bundle.patch_memory = memory
    bundle.patchcore = PatchFeatures("efficientnet_lite0", pretrained=False)
    bundle.card["models"]["autoencoder"]["score"] = "patchcore"
    bundle.card["models"]["patchcore"] = {"memory_patches": len(memory.features)}
    fit, fit_images = patchcore_site(bundle, rng)
    held, _ = patchcore_site(bundle, rng)  # other patients of the same site

    def held_out_auc() -> tuple[float, float]:
        out = bundle.finish(with_patch_distances(bundle, held))
        y = held["label_index"] > 0
        return roc_auc_score(y, out["anomaly_score"]), np.mean(out["is_anomaly"][~y])

    auc_before, _ = held_out_auc()
    record = adapt(bundle, fit, fit_images, SiteRules.from_card(bundle.card), {})
    auc_after, flagged = held_out_auc()
    # The site's normal patches were far from the training normals': its pneumonias' odd
    # patch hid among them. Measured against the site's normals as well, it stands out.
    assert auc_before < 0.8 and auc_after > 0.95
    assert flagged <= 0.15  # the threshold came from scores without their own patients
    added = len(bundle.patch_memory.features) - len(memory.features)
    assert 0 < added <= int(np.ceil(0.1 * 40 * 4))  # a coreset of the normals' patches
    assert bundle.card["models"]["patchcore"]["memory_patches"] == len(bundle.patch_memory.features)
    assert bundle.card["models"]["patchcore"]["site_memory_patches"] == added
    assert (bundle.patchcore.memory.numpy() == bundle.patch_memory.features).all()
    assert "joined PatchCore's memory bank" in record["rules"]["anomaly_reference"]
    assert record["previous"]["anomaly_reference"] == {"memory_patches": len(memory.features)}

    # Without patch features (distances only), a PatchCore bundle cannot adapt.
    distances_only = {k: v for k, v in fit.items() if k != "patch_features"}
    with pytest.raises(ValueError, match="patch features"):
        adapt(bundle, distances_only, fit_images, SiteRules.from_card(bundle.card), {})


def test_normals_keep_leaves_the_anomaly_reference(bundle):
    outputs, images = site()
    reference = bundle.normal_reference
    adapt(bundle, outputs, images, SiteRules.from_card(bundle.card, normals="keep"), {})
    assert bundle.normal_reference is reference
    is_pneumonia = outputs["label_index"] > 0
    in_sample = reference.score(outputs["ae_code"])[~is_pneumonia]
    assert bundle.anomaly_threshold == pytest.approx(np.percentile(in_sample, 95))


def test_a_site_without_normal_or_pneumonia_images_is_refused(bundle):
    outputs, images = site()
    pneumonia = outputs["label_index"] > 0
    only = {key: value[pneumonia] for key, value in outputs.items()}
    with pytest.raises(SiteError, match="0 normal and 80 pneumonia"):
        adapt(bundle, only, images, SiteRules.from_card(bundle.card), {})
    assert bundle.binary_threshold == 0.5  # nothing changed


def test_rules_come_from_the_card_unless_overridden(bundle):
    card = bundle.card
    card["training"]["config"].update(binary_threshold="youden", target_sensitivity=0.9)
    rules = SiteRules.from_card(card)
    assert (rules.binary_threshold, rules.target_sensitivity, rules.knn) == ("youden", 0.9, "add")
    rules = SiteRules.from_card(card, target_sensitivity=0.97, binary_threshold=None, knn="keep")
    assert (rules.binary_threshold, rules.target_sensitivity, rules.knn) == ("youden", 0.97, "keep")
    assert SiteRules.from_card({}) == SiteRules()  # a card from before the rules were recorded
    with pytest.raises(ConfigError, match="--target-sensitivity"):
        SiteRules.from_card(card, target_sensitivity=1.5)
    with pytest.raises(ConfigError, match="--knn"):
        SiteRules.from_card(card, knn="replace")
    with pytest.raises(ConfigError, match="--normals"):
        SiteRules.from_card(card, normals="replace")


# --- the job, on the bundle the training tests made -----------------------------------------


def test_adapt_job_writes_an_adapted_bundle_and_leaves_the_original(
    trained, subset_store, job_env, tmp_path
):
    bundle, _ = trained
    card_before = (bundle / "card.json").read_bytes()
    output = tmp_path / "adapted"
    result = run_job(
        "adapt.py", "--model", str(bundle), "--data", str(subset_store), "--split", "test",
        "--output", str(output), env=job_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (bundle / "card.json").read_bytes() == card_before

    card = json.loads((output / "card.json").read_text())
    record = card["site_adaptations"][0]
    original = json.loads(card_before)
    assert record["images"] == 120 and record["split"] == "test"
    assert record["previous"]["model_version"] == original["model_version"]
    assert card["model_version"] != original["model_version"]
    assert record["previous"]["binary"]["threshold"] == original["models"]["binary"]["threshold"]
    assert card["models"]["knn"]["reference_images"] == (
        original["models"]["knn"]["reference_images"] + 120
    )
    assert "site specificity" in result.stdout and "adapted bundle" in result.stdout
    load_bundle(str(output))  # every file matches its card

    refused = run_job(
        "adapt.py", "--model", str(bundle), "--data", str(subset_store), "--output",
        str(bundle), env=job_env,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "is the bundle being adapted" in refused.stderr.strip().splitlines()[-1]
    assert (bundle / "card.json").read_bytes() == card_before


def test_adapt_job_fine_tunes_a_three_class_site_head(trained, subset_store, job_env, tmp_path):
    """pneumo-adapt --fine-tune: the adapted bundle carries a three-class site head fitted on
    the site's images and the bundle's training images; its three-class columns come from
    it, its KNN (kept) from the trained head; the card says what was fitted on what."""
    from pneumo_ray.io.data import list_store, load_image
    from pneumo_ray.models.bundle import SITE_HEAD_FILE

    bundle, _ = trained
    output = tmp_path / "tuned"
    result = run_job(
        "adapt.py", "--model", str(bundle), "--data", str(subset_store), "--split", "test",
        "--output", str(output), "--fine-tune", "--knn", "keep", env=job_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"three-class site head fitted in \d+s", result.stdout)
    card = json.loads((output / "card.json").read_text())
    head = card["models"]["multiclass"]["site_head"]
    assert head["images"] == 120 and sum(head["class_counts"].values()) == 120
    assert 0 < head["training_images"] <= 600
    assert SITE_HEAD_FILE in card["files"]
    assert card["site_adaptations"][0]["rules"]["three_class_head"] == head["rule"]
    assert SITE_HEAD_FILE not in json.loads((bundle / "card.json").read_text())["files"]

    tuned, original = load_bundle(str(output)), load_bundle(str(bundle))
    test = [i for i in list_store(str(subset_store)) if i.split == "test"][:12]
    pixels = np.stack([load_image(i.uri, original.image_size) for i in test])
    after, before = tuned.predict(pixels), original.predict(pixels)
    assert not np.allclose(after["p_normal"], before["p_normal"], atol=1e-4)
    np.testing.assert_array_equal(after["knn_distances"], before["knn_distances"])
    for key, value in tuned.binary.state_dict().items():  # the binary network is not touched
        assert torch.equal(value, original.binary.state_dict()[key]), key

    from pneumo_ray.cli import adapt_main

    with pytest.raises(SystemExit, match="--fine-tune needs labelled images"):
        adapt_main(["--model", str(bundle), "--unlabelled", str(subset_store), "--output",
                    str(tmp_path / "x"), "--fine-tune"])  # fmt: skip
