"""benchmarks/data_stats.py: exposure and sharpness per split and class."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from ..conftest import run_job
from . import load_benchmark


def load_script():
    return load_benchmark("data_stats")


def test_laplacian_energy_falls_when_an_image_is_blurred():
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    blurred = np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(1.5)))
    stats = load_script().image_row
    assert stats(blurred)[2] < 0.5 * stats(sharp)[2]
    assert abs(stats(blurred)[0] - stats(sharp)[0]) < 0.02  # same exposure


def test_script_prints_one_row_per_split_and_class(subset_store, job_env):
    result = run_job(
        "../benchmarks/data_stats.py", "--data", str(subset_store), env=job_env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "skipped unreadable image" in result.stderr  # the subset's corrupt file
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert {(r[0], r[1]) for r in rows} == {
        ("train", "normal"),
        ("train", "bacterial"),
        ("train", "viral"),
        ("test", "normal"),
        ("test", "bacterial"),
        ("test", "viral"),
    }
