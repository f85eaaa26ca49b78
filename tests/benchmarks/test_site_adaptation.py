"""benchmarks/site_adaptation.py: a bundle adapted on some of a site's patients, evaluated on
the others."""

from __future__ import annotations

import json

import numpy as np
import pytest

from . import load_benchmark


@pytest.mark.integration
def test_the_as_trained_figures_are_the_cards_and_every_image_is_predicted_once(trained, tmp_path):
    bundle, _ = trained
    card = json.loads((bundle / "card.json").read_text())
    data = card["training"]["config"]["data"]
    out = tmp_path / "site.json"
    summary = load_benchmark("site_adaptation").main(
        ["--model", str(bundle), "--data", data, "--bootstrap", "50", "--json", str(out)]
    )
    assert json.loads(out.read_text())["folds"] == 2
    # In this process, on the same images: the training job's own test figures.
    for model in ("binary", "multiclass", "knn", "autoencoder"):
        assert summary["as_trained"][model]["headline"] == pytest.approx(
            card["metrics"]["test"][model]["headline"], nan_ok=True, abs=1e-6
        )
    folds = summary["per_fold"]
    assert sum(f["predicted"] for f in folds) == 120
    assert all(f["adapted_on"] + f["predicted"] == 120 for f in folds)
    # Each fold's operating point was chosen on the other fold, not taken from the card.
    assert all(f["binary_threshold"] != card["models"]["binary"]["threshold"] for f in folds)
    adapted = summary["adapted"]["binary"]["headline"]
    assert np.isfinite([adapted["sensitivity"], adapted["specificity"], adapted["ece"]]).all()
    assert summary["adapted"]["binary"]["headline"]["roc_auc"] == pytest.approx(
        summary["as_trained"]["binary"]["headline"]["roc_auc"], abs=0.02
    )  # monotone maps: the ranking within a fold is kept


@pytest.mark.integration
def test_the_learning_curve_has_a_row_per_label_count_and_rule(trained):
    bundle, _ = trained
    data = json.loads((bundle / "card.json").read_text())["training"]["config"]["data"]
    summary = load_benchmark("site_adaptation").main(
        ["--model", str(bundle), "--data", data, "--curve", "--labels", "0,30,all",
         "--draws", "2", "--rules", "spread,random", "--fine-tune", "--fine-tune-min", "30"]
    )  # fmt: skip
    assert set(summary["curve"]) == {
        "0/-", "30/spread", "30/random", "all/-", "30/spread+ft", "30/random+ft", "all/+ft"
    }  # fmt: skip
    for row in summary["curve"].values():
        specificity = row["binary.specificity"]
        assert len(specificity["values"]) == 2  # one figure per patient draw
        assert specificity["min"] <= specificity["median"] <= specificity["max"]
        assert 0.0 <= specificity["median"] <= 1.0
    # with every label of the half, both rules take the same images: one row, not two
    assert "all/spread" not in summary["curve"]
    assert summary["as_trained"]["binary"]["roc_auc"] > 0.5
    # Fine-tuned heads can move the ranking that re-chosen thresholds keep.
    kept, tuned = summary["curve"]["all/-"], summary["curve"]["all/+ft"]
    assert kept["binary.roc_auc"]["values"] != tuned["binary.roc_auc"]["values"]
    assert np.isfinite(tuned["multiclass.accuracy"]["values"]).all()


def test_the_benchmark_needs_a_store_or_the_bundles_validation(capsys):
    with pytest.raises(SystemExit):
        load_benchmark("site_adaptation").main(["--model", "b"])
    assert "--validation" in capsys.readouterr().err
