"""Thresholds, headline figures and patient-level bootstrap intervals (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pneumo_ray.io.labels import CLASS_LABELS
from pneumo_ray.training import report
from pneumo_ray.training.evaluation import (
    HEADLINE,
    bootstrap_intervals,
    headline_figures,
    results_table,
)


def test_sensitivity_threshold_is_the_highest_that_reaches_the_target():
    rng = np.random.default_rng(0)
    is_positive = rng.random(400) < 0.6
    scores = np.where(is_positive, rng.normal(1.0, 1.0, 400), rng.normal(-1.0, 1.0, 400))
    threshold = report.sensitivity_threshold(is_positive, scores, 0.95)
    reached = report.operating_point(is_positive, scores, threshold)
    assert reached["sensitivity"] >= 0.95
    # Any higher threshold loses the target: the next positive score above it drops out.
    higher = np.min(scores[is_positive][scores[is_positive] > threshold])
    assert report.operating_point(is_positive, scores, higher)["sensitivity"] < 0.95
    assert 0.0 < reached["specificity"] < 1.0


def test_sensitivity_threshold_edge_cases():
    assert report.sensitivity_threshold([True, True, False], [0.9, 0.2, 0.1], 1.0) == 0.2
    assert report.sensitivity_threshold([True, True, False], [0.9, 0.2, 0.1], 0.5) == 0.9
    with pytest.raises(ValueError, match="no positive"):
        report.sensitivity_threshold([False, False], [0.1, 0.2], 0.95)


def fake_predictions(n: int, seed: int = 0, images_per_patient: int = 1) -> dict:
    """Bundle-shaped predictions: informative scores, some wrong calls."""
    rng = np.random.default_rng(seed)
    patients = n // images_per_patient
    label = np.repeat(rng.choice(np.asarray(CLASS_LABELS), patients), images_per_patient)
    index = np.array([CLASS_LABELS.index(v) for v in label])
    logits = rng.normal(0, 1, (n, 3)) + 2.0 * np.eye(3)[index]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    p_pneumonia = 1 - probs[:, 0]
    anomaly = (index > 0) + rng.normal(0, 0.8, n)
    return {
        "image_uri": np.array(
            [f"/s/test/X/person{i // images_per_patient}_bacteria_{i}.jpeg" for i in range(n)]
        ),
        "label": label,
        "p_pneumonia": p_pneumonia,
        "pred_binary": np.where(p_pneumonia >= 0.5, "pneumonia", "normal"),
        "p_pneumonia_cnn": np.clip(p_pneumonia + rng.normal(0, 0.1, n), 0, 1),
        "p_normal": probs[:, 0],
        "p_bacterial": probs[:, 1],
        "p_viral": probs[:, 2],
        "pred_class": np.asarray(CLASS_LABELS)[probs.argmax(axis=1)],
        "knn_label": np.asarray(CLASS_LABELS)[(probs + rng.normal(0, 0.2, (n, 3))).argmax(1)],
        "anomaly_score": anomaly,
        "is_anomaly": anomaly > 0.5,
        "reconstruction_mse": -anomaly,
    }


def test_headline_figures_match_sklearn():
    p = fake_predictions(300)
    figures = headline_figures(p)
    assert set(figures) == set(HEADLINE)
    for model, names in HEADLINE.items():
        assert set(figures[model]) == set(names)
    is_pneumonia = p["label"] != "normal"
    assert figures["binary"]["roc_auc"] == pytest.approx(
        roc_auc_score(is_pneumonia, p["p_pneumonia"])
    )
    assert figures["binary"]["sensitivity"] == pytest.approx(
        np.mean(p["pred_binary"][is_pneumonia] == "pneumonia")
    )
    assert figures["multiclass"]["accuracy"] == pytest.approx(
        np.mean(p["pred_class"] == p["label"])
    )
    assert figures["autoencoder_mse"]["roc_auc"] == pytest.approx(
        1 - figures["autoencoder"]["roc_auc"]
    )


def test_bootstrap_intervals_bracket_the_estimate_and_shrink_with_more_data():
    small, large = fake_predictions(150, seed=1), fake_predictions(1500, seed=1)
    groups_small = np.arange(150)
    ci_small = bootstrap_intervals(small, groups_small, replicates=300)
    ci_large = bootstrap_intervals(large, np.arange(1500), replicates=300)
    point = headline_figures(small)
    for model, names in HEADLINE.items():
        for name in names:
            low, high = ci_small[model][name]
            assert low <= point[model][name] <= high, (model, name)
    small_width = ci_small["binary"]["accuracy"][1] - ci_small["binary"]["accuracy"][0]
    large_width = ci_large["binary"]["accuracy"][1] - ci_large["binary"]["accuracy"][0]
    assert large_width < small_width / 2
    # Same seed, same intervals.
    assert bootstrap_intervals(small, groups_small, replicates=300) == ci_small


def test_bootstrap_resamples_patients_not_images():
    # Each patient has four identical images: resampling images would pretend to have four
    # times the evidence; resampling patients gives the interval of the patients' count.
    p = fake_predictions(100, seed=3)
    repeated = {key: np.repeat(value, 4, axis=0) for key, value in p.items()}
    by_patient = np.repeat(np.arange(100), 4)
    by_image = np.arange(400)
    patients = bootstrap_intervals(repeated, by_patient, replicates=300)["binary"]["accuracy"]
    images = bootstrap_intervals(repeated, by_image, replicates=300)["binary"]["accuracy"]
    original = bootstrap_intervals(p, np.arange(100), replicates=300)["binary"]["accuracy"]
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(images) < 0.7 * width(patients)
    assert width(patients) == pytest.approx(width(original), rel=0.35)


def test_results_table_marks_targets():
    p = fake_predictions(200)
    metrics = {model: {"headline": figures} for model, figures in headline_figures(p).items()}
    auc = metrics["binary"]["headline"]["roc_auc"]
    table = results_table(metrics, {"binary": {"roc_auc": auc - 0.01}, "knn": {"accuracy": 1.01}})
    binary_auc_line = next(
        line for line in table.splitlines() if line.startswith("binary") and "roc_auc" in line
    )
    assert binary_auc_line.endswith("met") and "NOT MET" not in binary_auc_line
    knn_line = next(line for line in table.splitlines() if line.startswith("knn"))
    assert knn_line.endswith("NOT MET")


def test_figures_of_a_one_class_split_are_written_as_strict_json(tmp_path):
    p = fake_predictions(60)
    pneumonia = p["label"] != "normal"
    figures = headline_figures({key: value[pneumonia] for key, value in p.items()})
    assert np.isnan(figures["binary"]["roc_auc"])  # no normal image: no AUC
    path = tmp_path / "report" / "metrics.json"
    report.write_json({"headline": figures}, str(path))

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    loaded = json.loads(path.read_text(), parse_constant=reject)
    assert loaded["headline"]["binary"]["roc_auc"] is None
    assert loaded["headline"]["binary"]["sensitivity"] == figures["binary"]["sensitivity"]


def test_the_fast_roc_auc_is_sklearns_with_ties_and_for_three_classes():
    from pneumo_ray.training.evaluation import _ovr_auc, roc_auc

    rng = np.random.default_rng(3)
    for _ in range(20):
        truth = rng.integers(0, 2, size=60).astype(bool)
        truth[:2] = [True, False]
        score = np.round(rng.random(60), 1)  # many ties
        assert roc_auc(truth, score) == pytest.approx(roc_auc_score(truth, score), abs=1e-12)
    classes = rng.integers(0, 3, size=90)
    classes[:3] = [0, 1, 2]
    probs = rng.dirichlet([1, 1, 1], size=90)
    expected = roc_auc_score(classes, probs, multi_class="ovr", labels=np.arange(3))
    assert _ovr_auc(classes, probs) == pytest.approx(expected, abs=1e-12)
