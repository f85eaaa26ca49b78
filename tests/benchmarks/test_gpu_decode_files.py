"""benchmarks/benchmark_gpu_decode_files.py: where GPU-decode scoring decodes DICOM and PNG."""

from __future__ import annotations

from ..conftest import FULLRES
from . import load_benchmark


def test_dicom_and_png_leave_the_actor_and_the_block_as_pixels(tmp_path):
    script = load_benchmark("benchmark_gpu_decode_files")
    sources = sorted(FULLRES.rglob("*.jpeg"))[:2]
    rows = {}
    for kind in ("dicom", "png16", "jpeg"):
        paths = script.make_files(sources, tmp_path, kind, side=600)
        rows[kind] = script.measure(paths, image_size=64, repeats=1)
    for kind in ("dicom", "png16"):
        m = rows[kind]
        assert m["decoded_in_task"] == 1.0
        assert m["block_now_mb"] == script.BLOCK_ROWS * 64 * 64 / 1e6 < m["block_before_mb"]
    assert rows["jpeg"]["decoded_in_task"] == 0.0
    assert rows["jpeg"]["block_now_mb"] == rows["jpeg"]["block_before_mb"]
