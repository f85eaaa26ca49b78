"""benchmarks/reframing_check.py: does a learned re-framing keep the box on the anatomy, and
what does it do to a bundle's counterfactual check?"""

from __future__ import annotations

import numpy as np
import pytest

from pneumo_ray.io import edits
from pneumo_ray.models import reframing

from ..conftest import CHEST_XRAY
from . import load_benchmark


@pytest.mark.parametrize("kind, fraction", [("crop", 0.8), ("crop", 0.7), ("pad", 0.8)])
def test_the_edit_windows_are_the_check_edits_pixels(kind, fraction):
    script = load_benchmark("reframing_check")
    side = 224
    film = np.zeros((1, side, side), dtype=np.uint8)
    film[0, 60:170, 40:190] = 200  # a bright block: where it lands tells the geometry
    window = script.edit_windows(kind, fraction, side)
    edited = edits.crop(film, fraction) if kind == "crop" else edits.pad(film, fraction)
    ours = reframing.reframe(reframing.as_input(film), window, side)[0, 0].numpy() * 255
    assert np.abs(ours - edited[0]).mean() < 2.0


def test_the_check_on_training_images_has_every_framing_edit(tmp_path):
    script = load_benchmark("reframing_check")
    summary = script.main(["--store", str(CHEST_XRAY), "--images", "120", "--epochs", "2",
                           "--json", str(tmp_path / "out.json")])  # fmt: skip
    assert set(summary["edits"]) == {"crop 0.9", "crop 0.8", "crop 0.7", "pad 0.9", "pad 0.8"}
    # no re-framing keeps the edited film's own frame: (179 / 224)^2 of it for a crop to 80%
    assert summary["edits"]["crop 0.8"]["none"]["median"] == pytest.approx(0.639, abs=0.002)
    for name, row in summary["edits"].items():
        assert 0.0 <= row["learned"]["median"] <= 1.0
        assert ("body" in row) == name.startswith("crop")
    assert summary["fit_films"] + summary["held_out_films"] == 120
    assert (tmp_path / "out.json").exists()


def test_a_bundles_check_runs_both_ways(trained):
    script = load_benchmark("reframing_check")
    bundle, _ = trained
    summary = script.main(["--model", str(bundle), "--images", "60", "--epochs", "1",
                           "--per-class", "4"])  # fmt: skip
    check = summary["check"]
    assert set(check["validation"]) == {"as taken", "re-framed"}
    for figures in check["validation"].values():
        assert 0.0 <= figures["specificity"] <= 1.0 and 0.0 <= figures["roc_auc"] <= 1.0
    names = {e.name for e in edits.CHECK_EDITS}
    assert {key.split(" | ")[0] for key in check["edits"]} == names
    for ways in check["edits"].values():
        assert set(ways) == {"as taken", "re-framed"}
        assert ways["as taken"]["images"] == ways["re-framed"]["images"] <= 4
