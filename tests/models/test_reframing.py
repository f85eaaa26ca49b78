"""models.reframing: a learned, label-free re-framing of films (issue 31, point 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumo_ray.io import edits
from pneumo_ray.io.edits import CHECK_EDITS
from pneumo_ray.models import reframing
from pneumo_ray.models.counterfactual import counterfactual_rows
from pneumo_ray.training.finetune import one_thread

from .test_bundle import tiny_bundle
from .test_counterfactual import films


def phantoms(n: int, side: int = 64, seed: int = 0, noise: float = 8.0) -> np.ndarray:
    """Films of one anatomy, framed as a store frames it: a bright body with two dark lungs
    that fills the same part of every film, its brightness and texture varying."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    body = ((x - 0.5) / 0.38) ** 2 + ((y - 0.55) / 0.42) ** 2 < 1
    lungs = (((x - 0.33) / 0.1) ** 2 + ((y - 0.48) / 0.22) ** 2 < 1) | (
        ((x - 0.67) / 0.1) ** 2 + ((y - 0.48) / 0.22) ** 2 < 1
    )
    out = np.empty((n, side, side), dtype=np.uint8)
    for i in range(n):
        film = np.where(body, rng.uniform(150, 220), rng.uniform(10, 40))
        film = np.where(lungs, rng.uniform(50, 90), film) + rng.normal(0, noise, (side, side))
        out[i] = np.clip(film, 0, 255)
    return out


def test_the_whole_window_is_the_film_and_a_central_window_is_the_checks_crop():
    images = phantoms(4, noise=0.0)  # no pixel noise: the two resamplings differ at edges only
    x = reframing.as_input(images)
    whole = np.tile([0.0, 0.0, 1.0, 1.0], (4, 1))
    assert torch.allclose(reframing.reframe(x, whole, 64), x, atol=1e-5)
    keep, start = 51, 6  # edits.crop's central 80% of 64 px, in whole pixels
    central = np.tile([start / 64, start / 64, (start + keep) / 64, (start + keep) / 64], (4, 1))
    ours = reframing.reframe(x, central, 64)[:, 0].numpy() * 255
    theirs = edits.crop(images, 0.8).astype(np.float64)
    assert np.abs(ours - theirs).mean() < 2.0  # the same crop, up to interpolation


def test_window_coordinates_go_both_ways():
    rng = np.random.default_rng(1)
    windows = reframing.random_windows(200, rng)
    sides = windows[:, 2:] - windows[:, :2]
    assert (sides > 0.5).all() and (sides < 1.7).all()
    frames = reframing.frame_in_window(windows)
    assert np.allclose(reframing.in_film(frames, windows), [0.0, 0.0, 1.0, 1.0])
    boxes = rng.uniform(0, 0.4, (200, 4)) + [0, 0, 0.6, 0.6]
    assert np.allclose(reframing.in_window(reframing.in_film(boxes, windows), windows), boxes)
    assert reframing.box_iou(boxes, boxes) == pytest.approx(np.ones(200))
    assert reframing.box_iou(np.array([[0, 0, 1, 1.0]]), np.array([[0.1, 0.1, 0.9, 0.9]]))[
        0
    ] == pytest.approx(0.64)


def test_a_trained_reframer_finds_the_same_frame_on_a_tighter_film():
    with one_thread():  # a small network: a second thread only slows it on a busy machine
        net = reframing.train_reframer(phantoms(256), epochs=15, batch_size=32, seed=0)
    held_out = phantoms(32, seed=1)
    taken = reframing.predict_frames(net, held_out)
    assert np.median(reframing.box_iou(taken, np.tile([0, 0, 1, 1.0], (32, 1)))) > 0.8
    window = np.tile([0.1, 0.1, 0.9, 0.9], (32, 1))  # the check's crop to 80%
    tighter = reframing.in_film(reframing.predict_frames(net, edits.crop(held_out, 0.8)), window)
    # no re-framing keeps 0.64 of the film; the learned frame lands where the film's did
    assert np.median(reframing.box_iou(taken, tighter)) > 0.8
    out = reframing.apply_reframing(net, edits.crop(held_out, 0.8))
    assert out.shape == held_out.shape and out.dtype == np.uint8
    # re-framed, the tighter film looks like the film as taken again
    back = np.abs(out.astype(float) - held_out).mean()
    assert back < 0.6 * np.abs(edits.crop(held_out, 0.8).astype(float) - held_out).mean()


def test_training_is_seeded():
    images = phantoms(64)
    with one_thread():
        a, b, c = (reframing.predict_frames(reframing.train_reframer(images, epochs=1, seed=seed),
                                            images) for seed in (3, 3, 4))  # fmt: skip
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_the_checks_input_step_sees_every_film_edited_or_not():
    images, labels = films(9)
    seen = []

    def blank(x):  # every film the networks get is the same grey: no call can move
        seen.append(x.shape)
        return np.full_like(x, 128)

    rows = counterfactual_rows(tiny_bundle(), images, labels, CHECK_EDITS[:3], prepare=blank)
    assert len(seen) == 4  # the films as taken, then each edit's
    assert all(r["median_abs_shift"] == 0.0 and r["binary_flips"] == 0.0 for r in rows)
    unprepared = counterfactual_rows(tiny_bundle(), images, labels, CHECK_EDITS[:3])
    assert any(r["median_abs_shift"] > 0.0 for r in unprepared)
