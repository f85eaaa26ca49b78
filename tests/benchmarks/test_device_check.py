"""benchmarks/device_check.py: the parts of the GPU device check that need no GPU."""

from __future__ import annotations

import json
import math

import numpy as np

from . import load_benchmark


def test_a_failed_step_is_recorded_and_the_next_one_still_runs(tmp_path, capsys):
    check = load_benchmark("device_check")
    report = check.Report(tmp_path / "device_check.json", device="test")

    def broken():
        raise RuntimeError("no nvJPEG here")

    assert report.step("limits", broken) is None
    result = report.step("run", lambda: ({"images": 10, "network": object()}, "table"))
    assert result[1] == "table"  # the caller gets the whole result, the report the figures
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert saved == {
        "device": "test",
        "limits": {"error": "RuntimeError: no nvJPEG here"},
        "run": {"images": 10},
    }
    assert "limits: FAILED" in capsys.readouterr().out


def test_steady_rate_leaves_out_the_first_and_last_tenth_of_the_batches():
    check = load_benchmark("device_check")
    # Ten batches of 100 images, one a second, then a slow straggler batch 30 s later.
    times = np.repeat([*range(10), 40], 100)
    assert math.isclose(check.steady_rate(times), 100.0)  # 700 images from 1 s to 8 s
    assert math.isnan(check.steady_rate([5.0] * 64))  # one batch: no span


def test_the_pretrained_weights_are_asked_for_only_where_they_exist():
    check = load_benchmark("device_check")
    args = check.parse_args(["--data", "d", "--fullres", "f"])
    assert check.pretrained(args) == "imagenet"  # the gpu profile's Lite2
    none = check.parse_args(["--data", "d", "--fullres", "f", "--pretrained", "none"])
    seed = check.parse_args(["--data", "d", "--fullres", "f", "--architecture", "seed"])
    assert check.pretrained(none) is None and check.pretrained(seed) is None
    assert check.spec(none)["architecture"] == "efficientnet_lite2"
