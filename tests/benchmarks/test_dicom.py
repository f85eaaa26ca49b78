"""benchmarks/benchmark_dicom.py: DICOM decode cost, lookup table against per pixel."""

from __future__ import annotations

import numpy as np

from ..conftest import FULLRES
from . import load_benchmark


def test_both_dicom_paths_give_the_same_pixels_and_the_switch_is_restored(tmp_path):
    script = load_benchmark("benchmark_dicom")
    files = script.make_dicoms(sorted(FULLRES.rglob("*.jpeg"))[:1], tmp_path, side=300)
    assert list(files) == ["uncompressed", "JPEG Lossless"]
    before = script.images.DICOM_TABLE_LEVELS
    for blobs in files.values():
        by_table = script.images.decode_image(blobs[0], 64)
        np.testing.assert_array_equal(by_table, script._per_pixel(blobs[0], 64))
        assert by_table.std() > 10
        assert script.ms_per_image(blobs, 64, table=False, repeats=1) > 0
    after = script.images.DICOM_TABLE_LEVELS
    assert after == before
