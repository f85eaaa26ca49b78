"""benchmarks/site_adaptation.py: a bundle adapted on some of a site's patients, evaluated on
the others."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from pneumo_ray.io.labels import LabelledImage

from . import load_benchmark


def images(patients_per_label: int = 30) -> list[LabelledImage]:
    """Patients of each label with one to three images each."""
    out = []
    for label, prefix in (("normal", "IM-"), ("bacterial", "person"), ("viral", "person")):
        for p in range(patients_per_label):
            pid = f"{prefix}{label}{p}"
            out += [LabelledImage(f"/s/{pid}_{i}", "test", label, pid, 1) for i in range(p % 3 + 1)]
    return out


@pytest.mark.parametrize("folds", [2, 5])
def test_patient_folds_keep_patients_together_and_the_class_mix(folds):
    script = load_benchmark("site_adaptation")
    listed = images()
    fold = script.patient_folds(listed, folds, seed=0)
    by_patient: dict[str, set[int]] = {}
    for image, f in zip(listed, fold, strict=True):
        by_patient.setdefault(image.patient_id, set()).add(int(f))
    assert all(len(fs) == 1 for fs in by_patient.values())  # a patient in one fold
    for label in ("normal", "bacterial", "viral"):
        patients = Counter(
            next(iter(by_patient[i.patient_id])) for i in {x.patient_id: x for x in listed}.values()
            if i.label == label
        )  # fmt: skip
        assert set(patients) == set(range(folds))
        assert max(patients.values()) - min(patients.values()) <= 1
    assert list(script.patient_folds(listed, folds, seed=0)) == list(fold)
    assert list(script.patient_folds(listed, folds, seed=1)) != list(fold)


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
