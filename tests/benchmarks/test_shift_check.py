"""benchmarks/shift_check.py: a bundle's binary call on clean and shifted validation images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ..conftest import run_job
from . import load_benchmark


def load_script():
    return load_benchmark("shift_check")


@pytest.mark.integration
def test_clean_row_reproduces_the_cards_validation_choice(trained, job_env):
    bundle, _ = trained
    card = json.loads((bundle / "card.json").read_text())
    result = run_job(
        "../benchmarks/shift_check.py", "--model", str(bundle), "--draws", "1",
        env=job_env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        line.split()[0]: line.split()[2:]
        for line in result.stdout.splitlines()
        if line.split()[:2] in (["clean", "all"], ["shift1", "all"])
    }
    assert set(rows) == {"clean", "shift1"}
    sensitivity, specificity, *_, threshold, temperature = map(float, rows["clean"])
    binary = card["models"]["binary"]
    # the split is rebuilt from the card: same images, same outputs, same choices
    assert sensitivity == pytest.approx(binary["validation"]["sensitivity"], abs=1e-3)
    assert specificity == pytest.approx(binary["validation"]["specificity"], abs=1e-3)
    assert threshold == pytest.approx(binary["threshold"], abs=1e-3)
    assert temperature == pytest.approx(binary["temperature"], abs=1e-2)
    assert all(0 <= float(v) <= 1 for v in rows["shift1"][:3])


def test_shift_changes_pixels_and_is_seeded():
    module = load_script()
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    first, again, other = (module.shifted(pixels, s) for s in (1, 1, 2))
    assert first.shape == pixels.shape and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, pixels)
