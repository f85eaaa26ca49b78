"""jobs/train.py end to end on a small subset of the real chest X-rays."""

from __future__ import annotations

import json
import math
import re

import pyarrow.parquet as pq
import pytest
import torch

from pneumo_ray.io.edits import CHECK_EDITS
from pneumo_ray.models.bundle import load_bundle
from pneumo_ray.models.cnn import binary_cnn
from pneumo_ray.models.knn import KNN_K_CANDIDATES

from ..conftest import CHEST_XRAY, CORRUPT, SIZE, TRAIN_ARGS, run_job

MODELS = ("binary", "multiclass", "knn", "autoencoder", "autoencoder_mse")


def test_bundle_holds_every_file(trained):
    bundle, _ = trained
    for name in (
        "binary.pt",
        "multiclass.pt",
        "autoencoder.pt",
        "knn_reference.parquet",
        "normal_reference.parquet",
        "card.json",
        "report/metrics.json",
        "report/predictions.parquet",
        "report/roc.png",
        "report/training_curves.png",
        "report/autoencoder_reconstructions.png",
        *(f"report/confusion_{m}.png" for m in MODELS),
    ):
        assert (bundle / name).is_file() and (bundle / name).stat().st_size > 0, name
    state = torch.load(bundle / "binary.pt", weights_only=True)
    binary_cnn(SIZE).load_state_dict(state)  # the state dict fits the architecture

    card = json.loads((bundle / "card.json").read_text())
    assert card["image_size"] == SIZE
    assert card["models"]["binary"]["labels"] == ["normal", "pneumonia"]
    assert card["models"]["multiclass"]["labels"] == ["normal", "bacterial", "viral"]
    assert 0.0 < card["models"]["binary"]["threshold"] < 1.0
    assert card["models"]["autoencoder"]["threshold"] > 0.0
    knn = card["models"]["knn"]
    assert knn["feature_kind"] == "softmax"  # the default
    assert set(knn["validation_accuracy"]) == {"softmax", "embedding"}
    softmax_accuracy = knn["validation_accuracy"]["softmax"]
    assert set(softmax_accuracy) == {str(k) for k in KNN_K_CANDIDATES}
    assert softmax_accuracy[str(knn["k"])] == max(softmax_accuracy.values())
    assert (
        card["data_fingerprint"]["train"]["images"] + card["data_fingerprint"]["val"]["images"]
        == 121
    )
    assert len(card["data_fingerprint"]["train"]["sha256"]) == 64
    assert card["versions"]["ray"] == "2.60.0"
    assert set(card["metrics"]["test"]) == {*MODELS, "binary_cnn"}  # + the binary network alone
    assert card["metrics"]["bootstrap"]["replicates"] == 1000
    assert card["training"]["class_weights"]["binary"][0] > 1.0  # normal is the minority
    rates = card["training"]["learning_rates"]
    assert rates["binary"] == pytest.approx(1e-3) and "--lr-scaling none" in rates["rule"]
    history = card["training"]["history"]
    assert history["binary"][0]["lr"] == pytest.approx(rates["binary"])  # the rate it used
    assert history["multiclass"][0]["lr"] == pytest.approx(rates["multiclass"])

    reference = pq.read_table(bundle / "knn_reference.parquet")
    assert reference.column_names == ["image_uri", "label", "feature"]
    assert reference.num_rows == card["models"]["knn"]["reference_images"]
    assert all(
        uri.startswith(str(CHEST_XRAY.parent)) is False
        for uri in reference.column("image_uri").to_pylist()
    )  # the subset's own files
    load_bundle(str(bundle))  # verifies every sha256


def test_report_holds_the_counterfactual_check_on_validation(trained):
    bundle, output = trained
    check = json.loads((bundle / "report" / "counterfactual.json").read_text())
    card = json.loads((bundle / "card.json").read_text())
    edits = card["robustness_check"]["edits"]
    assert len(edits) == len(CHECK_EDITS) and card["robustness_check"]["split"] == "validation"
    assert {(r["edit"], r["label"]) for r in check["edits"]} == {
        (edit, label) for edit in edits for label in ("normal", "bacterial", "viral")
    }
    validation = card["data_fingerprint"]["val"]["images"]
    assert check["summary"]["images"] == min(validation, check["summary"]["images"])
    assert 0 < check["summary"]["images"] <= 3 * 10  # --counterfactual-images 10 per class
    shares = card["robustness_check"]["cam_border_share"]
    assert set(shares) == {"binary", "multiclass"}
    assert "largest share of calls moved by an edit" in output
    assert (bundle / "report" / "counterfactual.txt").read_text().startswith("edit")


def test_metrics_report_every_model(trained):
    bundle, output = trained
    metrics = json.loads((bundle / "report" / "metrics.json").read_text())["test"]
    for name in MODELS:
        m = metrics[name]
        assert m["n"] == 120
        assert 0.0 <= m["accuracy"] <= 1.0
        assert sum(map(sum, m["confusion_matrix"])) == 120
        assert all(
            {"precision", "recall", "f1", "support"} <= set(c) for c in m["per_class"].values()
        )
    assert "roc_auc" in metrics["binary"] and "roc_auc" in metrics["multiclass"]
    assert "epoch 4/4" in output and "binary" in output  # progress every epoch
    assert "accuracy" in output and "roc_auc" in output  # the closing metrics table


def test_thresholds_and_anomaly_score_are_chosen_on_validation(trained):
    bundle, output = trained
    card = json.loads((bundle / "card.json").read_text())
    binary = card["models"]["binary"]
    assert "validation sensitivity >= 0.95" in binary["threshold_rule"]
    assert binary["validation"]["sensitivity"] >= 0.95
    autoencoder = card["models"]["autoencoder"]
    scores = autoencoder["scores"]
    assert set(scores) == {"latent", "inpaint", "mse"}
    best = max(scores, key=lambda kind: scores[kind]["validation_auc"])
    assert autoencoder["score"] == best
    assert "highest validation ROC AUC" in autoencoder["score_rule"]
    assert autoencoder["threshold"] == scores[best]["threshold"]
    assert "percentile" in autoencoder["threshold_rule"]
    reference = pq.read_table(bundle / "normal_reference.parquet")
    assert reference.num_rows == autoencoder["normal_reference"]["images"]
    assert all("/NORMAL/" in uri for uri in reference.column("image_uri").to_pylist())
    assert f"anomaly score {best}" in output
    # The design's pixel error is reported beside the chosen score.
    metrics = json.loads((bundle / "report" / "metrics.json").read_text())["test"]
    assert metrics["autoencoder_mse"]["score"] == "mse"
    for model in MODELS:
        for figure, value in metrics[model]["headline"].items():
            if figure == "ece":
                continue  # biased upward in every resample: its interval may lie above it
            low, high = metrics[model]["ci95"][figure]
            assert low <= value <= high, (model, figure)


def test_the_passes_after_training_run_each_network_once_per_image(trained):
    """Three model-actor passes before the evaluation (each starts its actors: seconds
    apiece): normal training images, validation, and the training images with the shifted
    copies of both splits, split back by variant and image for the KNN and the scope check's
    Gaussians and thresholds."""
    bundle, output = trained
    after_training = output.split("choosing thresholds and KNN features on validation")[1]
    before_evaluation = after_training.split("evaluating on the test split")[0]
    assert "(1 model actor(s)" in output
    assert before_evaluation.count("model actor ready on node") == 3, before_evaluation[-3000:]
    card = json.loads((bundle / "card.json").read_text())
    train_images = card["models"]["knn"]["reference_images"]  # every usable training image
    assert card["scope"]["fit_images"] == 2 * train_images  # each clean and shifted
    rule = card["scope"]["threshold_rule"]
    val_images = int(re.search(r"distances of (\d+) validation", rule)[1])
    assert val_images % 2 == 0 and 0 < val_images < train_images


def test_cosine_schedule_and_weight_decay_reach_every_network(trained):
    bundle, _ = trained
    card = json.loads((bundle / "card.json").read_text())
    for name in ("binary", "multiclass", "autoencoder"):
        settings = card["training"]["config"][name]
        assert settings["lr_schedule"] == "cosine"
        history = card["training"]["history"][name]
        base = settings["lr"]
        expected = [base * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(len(history))]
        assert [row["lr"] for row in history] == pytest.approx(expected)
    assert card["training"]["config"]["binary"]["weight_decay"] == 1e-4
    assert card["training"]["config"]["autoencoder"]["weight_decay"] == 0.0  # CNNs only


def test_binary_model_beats_chance_on_the_test_images(trained):
    bundle, _ = trained
    binary = json.loads((bundle / "report" / "metrics.json").read_text())["test"]["binary"]
    recall = [c["recall"] for c in binary["per_class"].values()]
    assert binary["roc_auc"] > 0.75, binary
    assert sum(recall) / 2 > 0.6, binary  # balanced accuracy at the bundle's threshold


def test_corrupt_training_image_is_skipped_counted_and_named(trained, subset_store):
    bundle, output = trained
    bad = str(subset_store / CORRUPT)
    report = json.loads((bundle / "report" / "metrics.json").read_text())
    assert [s["image_uri"] for s in report["skipped_images"]] == [bad]
    assert "not a readable image" in report["skipped_images"][0]["error"]
    assert f"skipped unreadable image {bad}" in output


def test_a_rerun_keeps_the_networks_whose_settings_did_not_change(
    trained, subset_store, job_env, tmp_path
):
    """The session's training command again, with only the autoencoder's epochs changed and
    the same checkpoint storage: the two CNNs are taken as trained (their results under their
    own run keys), the autoencoder trains anew. (An unchanged rerun resumes from the run's
    last checkpoint: the demo test in tests/test_paths.py.)"""
    bundle, _ = trained
    first = json.loads((bundle / "card.json").read_text())
    output = tmp_path / "rerun"
    result = run_job(
        "train.py", "--data", str(subset_store), "--output", str(output), *TRAIN_ARGS,
        "--autoencoder-epochs", "2", "--storage-path", str(bundle / "checkpoints"), env=job_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output_text = result.stdout + result.stderr
    for network in ("binary", "multiclass"):
        assert f"[{network}] resuming after epoch 4 from {bundle / 'checkpoints' / 'results'}" in (
            output_text
        ), output_text[-3000:]
        assert f"[{network}] epoch 1/" not in output_text  # not retrained
    assert "[autoencoder] epoch 2/2" in output_text and "[autoencoder] resuming" not in output_text
    again = json.loads((output / "card.json").read_text())
    assert again["files"]["binary.pt"] == first["files"]["binary.pt"]
    assert again["files"]["multiclass.pt"] == first["files"]["multiclass.pt"]
    assert [row["epoch"] for row in again["training"]["history"]["autoencoder"]] == [1, 2]


def test_missing_store_fails_with_a_clear_message(tmp_path, job_env):
    result = run_job(
        "train.py",
        "--data",
        str(tmp_path / "absent"),
        "--output",
        str(tmp_path / "out"),
        env=job_env,
        timeout=120,
    )
    assert result.returncode != 0
    assert "image store not found" in result.stderr


def test_bad_flag_value_names_the_flag(tmp_path, job_env):
    result = run_job(
        "train.py",
        "--data",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
        "--image-size",
        "100",
        env=job_env,
        timeout=120,
    )
    assert result.returncode != 0 and "--image-size" in result.stderr
