"""The counterfactual robustness check (pneumo_ray.models.counterfactual)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pneumo_ray.io.edits import CHECK_EDITS, Edit
from pneumo_ray.io.labels import CLASS_LABELS
from pneumo_ray.models.counterfactual import (
    border_share,
    cnn_calls,
    counterfactual_rows,
    format_check,
    robustness_check,
    select_validation,
    summarize,
)

from .test_bundle import SIZE, tiny_bundle


class RegionReader(nn.Module):
    """A binary 'network' whose logit is the brightness of one region: the outer 10% band
    (a framing shortcut) or the centre (the lungs)."""

    def __init__(self, region: str) -> None:
        super().__init__()
        self.region = region
        self.scale = nn.Parameter(torch.tensor(40.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1]
        w = round(0.1 * side)
        if self.region == "centre":
            mean = x[:, 0, side // 4 : -side // 4, side // 4 : -side // 4].mean(dim=(1, 2))
        else:
            inner = x[:, 0, w:-w, w:-w].sum(dim=(1, 2))
            mean = (x[:, 0].sum(dim=(1, 2)) - inner) / (side * side - (side - 2 * w) ** 2)
        return self.scale * (mean - 0.5)


def films(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Dark-bordered films with a dim or bright centre; labels cycle through the classes."""
    rng = np.random.default_rng(0)
    images = np.full((n, SIZE, SIZE), 20, dtype=np.uint8)
    images[:, 4:-4, 4:-4] = rng.integers(40, 90, (n, 1, 1))
    images[n // 2 :, 4:-4, 4:-4] = rng.integers(170, 230, (n - n // 2, 1, 1))
    return images, np.arange(n) % 3


def test_the_check_tells_a_framing_shortcut_from_a_lung_reader():
    images, labels = films(12)
    white_band = [e for e in CHECK_EDITS if e.name in ("white band 0.08", "R top right")]
    moved = {}
    for region in ("border", "centre"):
        bundle = tiny_bundle()
        bundle.binary = RegionReader(region).eval()
        rows = counterfactual_rows(bundle, images, labels, white_band)
        moved[region] = {
            (r["edit"], r["label"]): (r["binary_flips"], r["median_shift"]) for r in rows
        }
    for label in CLASS_LABELS:
        # the white band lights the border: every call of the border reader moves to pneumonia
        flips, shift = moved["border"][("white band 0.08", label)]
        assert flips > 0.3 and shift > 0.1
        # the lung reader's calls stay where they were under both edits
        for edit in ("white band 0.08", "R top right"):
            flips, shift = moved["centre"][(edit, label)]
            assert flips == 0.0 and abs(shift) < 0.05


def test_rows_cover_every_edit_and_class_and_an_identity_edit_moves_nothing():
    images, labels = films(9)
    identity = Edit("none", "identity", lambda x, s: x.copy())
    rows = counterfactual_rows(tiny_bundle(), images, labels, [identity, CHECK_EDITS[0]])
    assert [(r["edit"], r["label"]) for r in rows] == [
        (edit, label) for edit in ("none", CHECK_EDITS[0].name) for label in CLASS_LABELS
    ]
    for r in rows[:3]:
        assert r["images"] == 3
        assert r["median_abs_shift"] == 0.0 and r["binary_flips"] == 0.0
        assert r["multiclass_flips"] == 0.0


def test_rows_from_calls_the_caller_already_has_are_the_same_rows():
    """``base``: the unedited films' calls, passed in by a caller that has them (the
    re-framing benchmark) instead of computed again; wrong ones change the rows."""
    bundle, (images, labels) = tiny_bundle(), films(9)
    edits = CHECK_EDITS[:2]
    computed = counterfactual_rows(bundle, images, labels, edits)
    given = counterfactual_rows(bundle, images, labels, edits, base=cnn_calls(bundle, images))
    assert given == computed
    other = cnn_calls(bundle, np.zeros_like(images))
    assert counterfactual_rows(bundle, images, labels, edits, base=other) != computed


def test_border_share_of_uniform_central_and_border_maps():
    side = 50
    uniform = np.ones((1, side, side))
    centre = np.zeros((1, side, side))
    centre[:, 20:30, 20:30] = 1.0
    edge = np.zeros((1, side, side))
    edge[:, :2] = 1.0
    shares = border_share(np.concatenate([uniform, centre, edge]))
    assert shares[0] == pytest.approx(1 - 0.8**2)
    assert shares[1] == pytest.approx(0.0)
    assert shares[2] == pytest.approx(1.0)


def test_the_whole_check_has_grad_cam_rows_and_a_summary():
    _, labels = films(6)
    # textured images: a flat film gives an untrained network no gradient to map
    images = np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE), dtype=np.uint8)
    check = robustness_check(tiny_bundle(), images, labels)
    assert len(check["edits"]) == len(CHECK_EDITS) * len(CLASS_LABELS)
    networks = {(r["network"], r["label"]) for r in check["grad_cam"]}
    assert ("binary", "all") in networks and ("multiclass", "viral") in networks
    assert all(0.0 <= r["mean_border_share"] <= 1.0 for r in check["grad_cam"])
    summary = check["summary"]
    assert summary["images"] == 6
    assert summary["max_binary_flips"] == max(r["binary_flips"] for r in check["edits"])
    text = format_check(check)
    assert "crop 0.8" in text and "Grad-CAM" in text and "largest share" in text


def test_summary_names_the_worst_edit():
    rows = [
        {"edit": "a", "family": "framing", "label": "normal", "images": 5,
         "binary_flips": 0.2, "multiclass_flips": 0.0, "median_abs_shift": 0.01},
        {"edit": "b", "family": "marker", "label": "normal", "images": 5,
         "binary_flips": 0.0, "multiclass_flips": 0.4, "median_abs_shift": 0.3},
    ]  # fmt: skip
    summary = summarize(rows, [])
    assert summary["max_binary_flips_at"] == "a (normal)"
    assert summary["max_multiclass_flips_at"] == "b (normal)"
    assert summary["framing_max_median_abs_shift"] == 0.01  # markers are not framing


def test_select_validation_takes_up_to_n_per_class_seeded():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    chosen = select_validation(labels, 5, seed=1)
    assert np.bincount(labels[chosen]).tolist() == [5, 3, 5]
    assert np.array_equal(chosen, select_validation(labels, 5, seed=1))
    assert not np.array_equal(chosen, select_validation(labels, 5, seed=2))
