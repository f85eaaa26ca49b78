"""What a nightly scoring run leaves for its operator: report, drift verdicts, heatmaps, console.

Two stores are scored with the session's trained bundle: the bundle's own validation images
(its drift reference, so nothing may drift) and the same images blurred and darkened, as
another site's scanner might deliver them (drift must be found, and --fail-on-drift exits 3).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from pneumo_ray.models.bundle import DRIFT_REFERENCE_FILE as REFERENCE_FILE
from pneumo_ray.monitoring.drift import STATISTICS
from pneumo_ray.scoring.score import DRIFT_EXIT_CODE, read_scores

from ..conftest import run_job

RAY_INFO = re.compile(r"\bINFO\b|streaming_executor|Running Dataset|Execution plan")


@pytest.fixture(scope="module")
def stores(trained, tmp_path_factory):
    """(unchanged store, drifted store) of the bundle's validation images."""
    bundle, _ = trained
    root = tmp_path_factory.mktemp("sites")
    same, drifted = root / "same", root / "drifted"
    same.mkdir()
    drifted.mkdir()
    uris = pq.read_table(bundle / REFERENCE_FILE).column("image_uri").to_pylist()
    for uri in uris:
        name = Path(uri).name
        shutil.copy(uri, same / name)
        image = Image.open(uri).convert("L").filter(ImageFilter.GaussianBlur(3))
        ImageEnhance.Brightness(image).enhance(0.6).save(drifted / name, quality=90)
    return same, drifted, len(uris)


def _score(bundle, store, output, env, *extra):
    args = ["--model", str(bundle), "--input", str(store), "--output", str(output), *extra]
    result = run_job("score.py", *args, env=env)
    return result, result.stdout + result.stderr


def _report_dir(output: Path) -> Path:
    (run,) = list((output / "_reports").iterdir())
    return run


@pytest.fixture(scope="module")
def unchanged_run(trained, stores, tmp_path_factory, job_env):
    bundle, _ = trained
    output = tmp_path_factory.mktemp("scores") / "same"
    result, log = _score(bundle, stores[0], output, job_env, "--fail-on-drift")
    assert result.returncode == 0, log[-5000:]
    return output, log


@pytest.fixture(scope="module")
def drifted_run(trained, stores, tmp_path_factory, job_env):
    bundle, _ = trained
    output = tmp_path_factory.mktemp("scores") / "drifted"
    result, log = _score(
        bundle, stores[1], output, job_env, "--fail-on-drift", "--heatmaps", "none", "--verbose"
    )
    return output, log, result.returncode


def test_an_unchanged_store_reports_no_drift(unchanged_run, stores):
    output, log = unchanged_run
    summary = json.loads((_report_dir(output) / "summary.json").read_text())
    assert summary["scored"] == stores[2] and summary["listed"] == stores[2]
    assert summary["reference"]["images"] == stores[2]
    assert set(summary["drift"]) == {stat.name for stat in STATISTICS}
    assert summary["drifted"] == []
    for result in summary["drift"].values():  # the very images of the reference
        assert result["psi"] == pytest.approx(0.0, abs=1e-6) and not result["drift"]
    for rate in summary["flagged"].values():
        assert rate["run"] == pytest.approx(rate["reference"])
    assert "drift: none found" in log


def test_a_blurred_darkened_store_drifts_and_fails_the_job(drifted_run, stores):
    output, log, code = drifted_run
    assert code == DRIFT_EXIT_CODE, log[-5000:]
    summary = json.loads((_report_dir(output) / "summary.json").read_text())
    assert {"image_mean", "image_sharpness"} <= set(summary["drifted"])
    mean = summary["drift"]["image_mean"]
    assert mean["run_mean"] < mean["reference_mean"] and mean["psi"] >= 0.25
    assert f"exit {DRIFT_EXIT_CODE}" in log and "DRIFT against the bundle's reference" in log
    # The rows are committed all the same: drift is news, not a failure to score.
    assert read_scores(str(output)).num_rows == stores[2]


def test_a_drifting_store_the_bundle_was_never_adapted_to_gets_a_line_and_a_labelling_list(
    unchanged_run, drifted_run, stores
):
    output, log, _ = drifted_run
    summary = json.loads((_report_dir(output) / "summary.json").read_text())
    site = summary["site"]
    assert site["act"] and not site["adapted_to_store"]
    balance = site["class_balance"]
    assert 0.0 < balance["pneumonia_estimated"] < 1.0
    assert balance["from_images"] == summary["images_profiled"] > 0  # the images in scope
    assert "was never adapted to this store" in log and "pneumo-adapt" in log
    listed = Path(site["labelling_list"])
    rows = listed.read_text().splitlines()
    assert rows[0].startswith("image_uri,label,patient_id")
    assert len(rows) - 1 == min(50, summary["images_profiled"])  # drawn from the in-scope images
    assert all(row.endswith(",random draw") for row in rows[1:])  # the default rule
    assert "never adapted" in (_report_dir(output) / "report.html").read_text()
    # a quiet night says nothing of it
    quiet = json.loads((_report_dir(unchanged_run[0]) / "summary.json").read_text())["site"]
    assert not quiet["act"] and "labelling_list" not in quiet


def test_adapted_to_knows_a_store_by_its_inputs_and_their_folders():
    from pneumo_ray.scoring.run_report import adapted_to

    card = {"site_adaptations": [{"inputs": ["s3://pacs/night/"]}, {"store": "/data/site"}]}
    assert adapted_to(card, ["s3://pacs/night"])
    assert adapted_to(card, ["s3://pacs/night/2026-12-07"])
    assert adapted_to(card, ["/data/site/test"])
    assert not adapted_to(card, ["s3://pacs/nightly"])
    assert not adapted_to({}, ["/data/site"])


def test_heatmaps_for_flagged_images_and_none_when_asked(unchanged_run, drifted_run):
    output, _ = unchanged_run
    rows = read_scores(str(output)).to_pandas()
    # flagged (binary call pneumonia, or anomalous) and in scope: no heatmap out of scope
    flagged = ((rows["pred_binary"] == "pneumonia") | rows["is_anomaly"]) & rows["in_scope"]
    assert flagged.any() and rows["heatmap_uri"].notna().tolist() == flagged.tolist()
    for uri in rows["heatmap_uri"].dropna():
        assert Path(uri).parent == _report_dir(output) / "heatmaps"
        picture = Image.open(uri)
        assert picture.format == "PNG" and picture.width > 2 * picture.height
    assert len(list((_report_dir(output) / "heatmaps").iterdir())) == int(flagged.sum())
    drifted_output, _, _ = drifted_run
    assert read_scores(str(drifted_output)).column("heatmap_uri").null_count == len(rows)
    assert not (_report_dir(drifted_output) / "heatmaps").exists()


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag in ("a", "link", "script"):
            self.links.append(attrs.get("href") or attrs.get("src") or "")


def test_the_html_report_is_self_contained_and_embeds_every_plot(unchanged_run):
    output, _ = unchanged_run
    page = (_report_dir(output) / "report.html").read_text()
    parser = _Images()
    parser.feed(page)
    parser.close()
    assert parser.links == []  # no script, stylesheet or link to fetch
    plots = [img for img in parser.images if img.get("class") == "plot"]
    assert sorted(img["alt"] for img in plots) == sorted(stat.name for stat in STATISTICS)
    for img in parser.images:  # every picture is inside the page and decodes
        kind, _, data = img["src"].partition(";base64,")
        assert kind in ("data:image/png", "data:image/jpeg"), img["src"][:40]
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    summary = json.loads((_report_dir(output) / "summary.json").read_text())
    heatmaps = [img for img in parser.images if img.get("alt") == "Grad-CAM"]
    flagged = round(summary["flagged"]["either"]["run"] * summary["scored"])
    assert len(heatmaps) == min(12, flagged) > 0
    assert "No drift" in page and "Top flagged images" in page and "KNN neighbours" in page


def test_the_console_is_quiet_by_default_and_verbose_on_request(unchanged_run, drifted_run):
    _, quiet = unchanged_run
    assert not [line for line in quiet.splitlines() if RAY_INFO.search(line)]
    assert re.search(r"scoring \[#+\] \d+/\d+ images \(100%\)", quiet)
    assert "log file:" in quiet and "images listed:" in quiet
    log_file = re.search(r"log file: (\S+)", quiet).group(1)
    assert RAY_INFO.search(Path(log_file).read_text())  # Ray's logs went to the file
    # Ray Data's native constructor-arguments notice: in the file, not on a healthy console
    assert "constructor arguments" not in quiet and "ERROR" not in quiet
    assert "constructor arguments in the object store" in Path(log_file).read_text()
    _, verbose, _ = drifted_run
    assert [line for line in verbose.splitlines() if RAY_INFO.search(line)]


def test_the_training_console_shows_epochs_and_no_ray_info(trained):
    _, log = trained
    assert not [line for line in log.splitlines() if RAY_INFO.search(line)]
    assert "constructor arguments" not in log  # the model actors' passes after training
    for network in ("binary", "multiclass", "autoencoder"):
        assert re.search(rf"^\[{network}\] epoch 1/\d+ train_loss=\S+ val_loss=", log, re.M)
    assert re.search(r"^\[binary\] epoch \d+/\d+ .*val_accuracy=", log, re.M)


def test_the_out_of_scope_section_counts_reasons_and_says_when_the_check_is_missing(tmp_path):
    from pneumo_ray.scoring.run_report import _scope

    image = tmp_path / "ct.png"
    Image.new("L", (64, 64), 90).save(image)
    summary = {
        "scope": {
            "available": True,
            "what": "in scope: a frontal chest X-ray of a child",
            "out_of_scope": {"not a radiograph": 3, "far from the training images": 1},
            "examples": [{"image_uri": str(image), "scope_reason": "not a radiograph: DICOM "
                          "Modality CT", "scope_score": 2.5, "p_pneumonia": 0.9}],
        }
    }  # fmt: skip
    html = _scope(summary)
    assert "not a radiograph" in html and ">3<" in html and "data:image/jpeg;base64," in html
    summary["scope"].update(available=False, out_of_scope={}, examples=[])
    assert "scope check was not available" in _scope(summary)
