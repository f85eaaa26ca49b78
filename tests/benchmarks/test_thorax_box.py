"""benchmarks/thorax_box.py: label-free thorax boxes and how framing moves them."""

from __future__ import annotations

import numpy as np
import pytest

from . import load_benchmark


def phantom() -> np.ndarray:
    """A 224 px film: black background, a bright body (rows 40-200, columns 30-194) holding
    two dark lungs (rows 70-160; columns 50-100 and 124-174)."""
    film = np.zeros((224, 224), dtype=np.uint8)
    film[40:200, 30:194] = 200
    film[70:160, 50:100] = 40
    film[70:160, 124:174] = 40
    return film


def test_the_boxes_find_the_body_and_the_lungs():
    script = load_benchmark("thorax_box")
    top, left, bottom, right = script.body_box(phantom())
    assert top == pytest.approx(40 / 224, abs=0.05) and bottom == pytest.approx(200 / 224, abs=0.05)
    assert left == pytest.approx(30 / 224, abs=0.05) and right == pytest.approx(194 / 224, abs=0.05)
    top, left, bottom, right = script.lung_box(phantom())
    assert top == pytest.approx(70 / 224 - 0.06, abs=0.04)
    assert right == pytest.approx(174 / 224 + 0.06, abs=0.04)
    assert script.lung_box(np.full((224, 224), 128, dtype=np.uint8)) is None


def test_iou_and_the_crop_edits_coordinates():
    script = load_benchmark("thorax_box")
    whole = (0.0, 0.0, 1.0, 1.0)
    assert script.iou(whole, whole) == 1.0
    # A crop that finds the whole edited film maps back to the edit's central 80%.
    assert script.in_film_coordinates(whole) == pytest.approx((0.1, 0.1, 0.9, 0.9))
    assert script.iou(whole, script.in_film_coordinates(whole)) == pytest.approx(0.64)
