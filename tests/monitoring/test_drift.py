"""Drift statistics (pneumo_ray.monitoring.drift): PSI with a chi-square gate, run profiles."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFilter

from pneumo_ray.io.images import image_stats
from pneumo_ray.monitoring.drift import (
    DRIFT_RULE,
    STATISTICS,
    TOP_FLAGGED,
    RunProfile,
    compare_counts,
    reference_table,
)
from pneumo_ray.scoring.ledger import OUTPUT_SCHEMA


def _xray_like(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 40, (size, size)).clip(0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(base).filter(ImageFilter.GaussianBlur(0.7)))


def test_image_statistics_see_blur_and_darkening():
    images = np.stack([_xray_like(i) for i in range(4)])
    blurred = np.stack(
        [np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(2))) for x in images]
    )
    darker = (images * 0.5).astype(np.uint8)
    plain, soft, dark = image_stats(images), image_stats(blurred), image_stats(darker)
    assert set(plain) == {"image_mean", "image_contrast", "image_sharpness"}
    assert plain["image_mean"].shape == (4,)
    assert np.all(soft["image_sharpness"] < 0.5 * plain["image_sharpness"])
    assert np.allclose(soft["image_mean"], plain["image_mean"], atol=0.02)
    assert np.all(dark["image_mean"] < 0.6 * plain["image_mean"])
    assert np.all(dark["image_contrast"] < 0.6 * plain["image_contrast"])


def test_compare_counts_needs_a_large_move_that_is_not_noise():
    same = compare_counts(np.array([50, 50, 50, 50]), np.array([50, 50, 50, 50]), DRIFT_RULE)
    assert same == {"psi": 0.0, "p_value": 1.0, "drift": False}
    moved = compare_counts(np.array([50, 50, 50, 50]), np.array([5, 5, 40, 150]), DRIFT_RULE)
    assert moved["drift"] and moved["psi"] >= DRIFT_RULE["psi"] and moved["p_value"] < 1e-6
    # Four images: PSI is large, but the chi-square test cannot tell it from noise.
    few = compare_counts(np.array([50, 50, 50, 50]), np.array([0, 0, 1, 3]), DRIFT_RULE)
    assert few["psi"] >= DRIFT_RULE["psi"] and few["p_value"] > DRIFT_RULE["p_value"]
    assert not few["drift"]
    # A million images: a tiny move is significant, but PSI says it is small.
    tiny = compare_counts(
        np.array([250_000] * 4), np.array([253_000, 247_000, 251_500, 248_500]), DRIFT_RULE
    )
    assert tiny["p_value"] < 0.01 and not tiny["drift"]


def _rows(n: int, seed: int, mean_shift: float = 0.0) -> pa.Table:
    """Scored rows in the output schema, with statistics drawn like a reference's."""
    rng = np.random.default_rng(seed)
    p = rng.beta(2, 2, n).astype(np.float32)
    columns = {name: pa.nulls(n, OUTPUT_SCHEMA.field(name).type) for name in OUTPUT_SCHEMA.names}
    columns.update(
        image_uri=pa.array([f"/s/{seed}/{i}.jpeg" for i in range(n)]),
        p_pneumonia=pa.array(p),
        pred_binary=pa.array(np.where(p >= 0.5, "pneumonia", "normal")),
        pred_class=pa.array(rng.choice(["normal", "bacterial", "viral"], n)),
        p_normal=pa.array((1 - p).astype(np.float32)),
        p_bacterial=pa.array((p / 2).astype(np.float32)),
        p_viral=pa.array((p / 2).astype(np.float32)),
        anomaly_score=pa.array(rng.gamma(2.0, 1.0, n).astype(np.float32)),
        is_anomaly=pa.array(rng.random(n) < 0.1),
        image_mean=pa.array((rng.normal(0.5, 0.05, n) + mean_shift).astype(np.float32)),
        image_contrast=pa.array(rng.normal(0.2, 0.02, n).astype(np.float32)),
        image_sharpness=pa.array(rng.normal(0.06, 0.01, n).astype(np.float32)),
        image_bytes=pa.array(rng.integers(20_000, 40_000, n)),
    )
    return pa.table([columns[name] for name in OUTPUT_SCHEMA.names], schema=OUTPUT_SCHEMA)


def _reference(n: int = 400, seed: int = 0) -> pa.Table:
    rows = _rows(n, seed)
    outputs = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names}
    stats = {name: outputs[name] for name in ("image_mean", "image_contrast", "image_sharpness")}
    return reference_table(outputs["image_uri"], outputs, stats, outputs["image_bytes"])


def test_a_run_like_the_reference_does_not_drift_and_a_darker_one_does():
    reference = _reference()
    like = RunProfile(reference)
    for seed in range(1, 6):  # 5 parts of 2,000 rows drawn like the reference
        like.add(_rows(2000, seed))
    assert like.images == 10_000
    assert not [name for name, r in like.drift().items() if r["drift"]]
    darker = RunProfile(reference)
    darker.add(_rows(2000, 7, mean_shift=-0.1))
    drifted = [name for name, r in darker.drift().items() if r["drift"]]
    assert drifted == ["image_mean"]
    assert set(darker.drift()) == {stat.name for stat in STATISTICS}


def test_a_profile_holds_fixed_bins_and_a_bounded_top_list():
    profile = RunProfile(_reference())
    sizes = {name: len(h.run) for name, h in profile.histograms.items()}
    for seed in range(1, 4):
        profile.add(_rows(3000, seed))
    assert {name: len(h.run) for name, h in profile.histograms.items()} == sizes
    top = profile.top_flagged()
    assert len(top) == TOP_FLAGGED
    p = [row["p_pneumonia"] for row in top]
    assert p == sorted(p, reverse=True) and p[0] > 0.98
    assert all(row["pred_binary"] == "pneumonia" or row["is_anomaly"] for row in top)


def test_rows_with_errors_are_counted_out_and_flag_rates_compare_with_the_reference():
    profile = RunProfile(_reference())
    rows = _rows(100, 3)
    errors = pa.array(["corrupt"] * 40 + [None] * 60)
    rows = rows.set_column(rows.schema.get_field_index("error"), "error", errors)
    profile.add(rows)
    assert profile.images == 60
    rates = profile.flagged_rates()
    assert set(rates) == {"binary", "anomaly", "either"}
    assert 0 < rates["binary"]["run"] < 1 and 0 < rates["binary"]["reference"] < 1


def test_a_bundle_without_a_reference_gives_no_verdicts():
    profile = RunProfile(None)
    profile.add(_rows(50, 1))
    assert profile.drift() == {} and profile.images == 50
    assert profile.flagged_rates()["binary"]["reference"] is None


@pytest.mark.parametrize("shift", [0.0, -0.1])
def test_psi_of_a_run_against_itself_is_zero_only_without_a_shift(shift):
    reference = _reference(seed=5)
    profile = RunProfile(reference)
    profile.add(_rows(400, 5, mean_shift=shift))
    psi = profile.drift()["image_mean"]["psi"]
    assert (psi == 0.0) if shift == 0.0 else (psi > 1.0)


def test_out_of_scope_images_are_counted_by_reason_and_left_out_of_the_other_statistics():
    reference = _reference()
    assert all(reference.column("in_scope").to_pylist())  # a check not run counts in scope
    rows = _rows(2000, 9)
    n = rows.num_rows
    outside = np.zeros(n, dtype=bool)
    outside[:600] = True  # 30% CT slices tonight
    reasons = np.where(np.arange(n) < 400, "not a radiograph: DICOM Modality CT",
                       "far from the training images: scope score 3.10 > 1")  # fmt: skip
    # the CT slices are dark: were they counted, the image mean would drift
    mean = rows.column("image_mean").to_numpy().copy()
    mean[outside] -= 0.3
    for name, values in (
        ("in_scope", pa.array(~outside)),
        ("scope_reason", pa.array(np.where(outside, reasons, None).tolist(), pa.string())),
        ("image_mean", pa.array(mean.astype(np.float32))),
    ):
        rows = rows.set_column(rows.schema.get_field_index(name), name, values)
    profile = RunProfile(reference)
    profile.add(rows)
    verdicts = profile.drift()
    assert verdicts["in_scope"]["drift"]  # the share out of scope is itself an alert
    assert not verdicts["image_mean"]["drift"]  # over the in-scope images only
    assert profile.images == n - 600
    assert profile.out_of_scope == {"not a radiograph": 400, "far from the training images": 200}
    assert len(profile.out_of_scope_examples) == 8
    assert profile.out_of_scope_examples[0]["scope_reason"].startswith("not a radiograph")
