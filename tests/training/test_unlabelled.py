"""pneumo-adapt --unlabelled: a bundle adapted to a site from the site's unlabelled images."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from pneumo_ray.cli import adapt_parser
from pneumo_ray.errors import SiteError
from pneumo_ray.io.data import list_labels_manifest
from pneumo_ray.io.images import image_stats, to_model_input
from pneumo_ray.io.labels import CLASS_LABELS, class_label
from pneumo_ray.models import calibration
from pneumo_ray.models.bundle import load_bundle, write_bundle
from pneumo_ray.models.calibration import beyond_noise, em_class_prior
from pneumo_ray.models.labelling import (
    LABELLING_COLUMNS,
    select_for_labelling,
    write_labelling_list,
)
from pneumo_ray.models.outputs import network_outputs
from pneumo_ray.monitoring.drift import reference_table
from pneumo_ray.training import unlabelled
from pneumo_ray.training.unlabelled import adapt_unlabelled, batchnorm_states

from ..conftest import CHEST_XRAY, run_job
from ..models.test_bundle import SIZE, tiny_bundle

# --- the class balance ------------------------------------------------------------------------


def calibrated_posteriors(prior_train: np.ndarray, prior_site: np.ndarray, n: int, seed: int):
    """Posteriors under ``prior_train`` of images drawn with ``prior_site``: class k's score is
    N(2k, 1), and the posterior is Bayes' rule with the training prior (a calibrated model)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(prior_site), n, p=prior_site)
    x = rng.normal(2.0 * labels, 1.0)
    likelihood = np.exp(-0.5 * (x[:, None] - 2.0 * np.arange(len(prior_site))) ** 2)
    joint = likelihood * prior_train
    return joint / joint.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(
    "train, site",
    [([0.27, 0.73], [0.63, 0.37]), ([0.25, 0.5, 0.25], [0.4, 0.35, 0.25])],
)
def test_em_recovers_a_known_class_balance(train, site):
    posteriors = calibrated_posteriors(np.array(train), np.array(site), 8000, seed=1)
    naive = posteriors.mean(axis=0)  # the mean posterior is pulled toward the training prior
    estimate = em_class_prior(posteriors, train)
    assert np.abs(estimate - site).max() < 0.02
    assert np.abs(estimate - site).max() < np.abs(naive - site).max()


def test_em_keeps_the_training_prior_on_training_like_images():
    train = np.array([0.3, 0.7])
    posteriors = calibrated_posteriors(train, train, 4000, seed=2)
    estimate = em_class_prior(posteriors, train)
    assert np.abs(estimate - train).max() < 0.02
    assert not beyond_noise(train, estimate, 4000)
    assert beyond_noise(train, [0.5, 0.5], 400)
    assert not beyond_noise(train, [0.35, 0.65], 50)  # 50 images cannot tell 0.30 from 0.35


def test_the_class_prior_moves_probabilities_and_keeps_them_when_equal():
    p = np.array([0.2, 0.5, 0.9])
    assert np.allclose(calibration.binary_prior_corrected(p, 0.7, 0.7), p)
    lower = calibration.binary_prior_corrected(p, 0.7, 0.4)
    assert (lower < p).all() and (np.argsort(lower) == np.argsort(p)).all()
    logits = np.array([[0.0, 1.0, 2.0]])
    out = calibration.calibrated_outputs(
        np.array([0.5]), logits, {"binary": 1.0, "multiclass": 1.0}, "network",
        class_prior={"multiclass": {"training": [0.2, 0.4, 0.4], "site": [0.6, 0.2, 0.2]}},
    )  # fmt: skip
    plain = calibration.softmax(logits)
    assert out["probs"][0, 0] > plain[0, 0] and out["probs"].sum() == pytest.approx(1.0)


# --- BatchNorm ---------------------------------------------------------------------------------


def textured(n: int, mean: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(mean, 0.12, (n, SIZE, SIZE)) + rng.normal(0, 0.05, (n, 1, 1))
    return np.clip(base * 255, 0, 255).astype(np.uint8)


def test_batchnorm_states_change_the_running_statistics_and_nothing_else():
    bundle = tiny_bundle()
    frozen = next(m for m in bundle.binary.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen.weight.requires_grad_(False)  # as a frozen early block's layer is
    before = {name: {k: v.clone() for k, v in getattr(bundle, name).state_dict().items()}
              for name in ("binary", "multiclass")}  # fmt: skip
    states = batchnorm_states(bundle, textured(40, 0.7, 0))
    for name, state in states.items():
        changed = {k for k, v in state.items() if not torch.equal(v, before[name][k])}
        assert changed, name
        assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                   for k in changed), changed  # fmt: skip
        # the bundle's own networks are left as they were
        assert all(torch.equal(v, before[name][k])
                   for k, v in getattr(bundle, name).state_dict().items())  # fmt: skip
    frozen_name = next(k for k, m in bundle.binary.named_modules() if m is frozen)
    assert torch.equal(
        states["binary"][f"{frozen_name}.running_mean"], frozen.running_mean
    )  # a frozen layer keeps its statistics


# --- the whole adaptation, in-process ---------------------------------------------------------


def outputs_of(bundle, pixels: np.ndarray, uris: list[str]) -> dict[str, np.ndarray]:
    x = to_model_input(pixels)
    raw = network_outputs(bundle.networks, x, bundle.tta, bundle.inpaint)
    return {**raw, **image_stats(pixels), "image_uri": np.array(uris)}


def site_bundle():
    """A tiny bundle with a training card and a drift reference on 'validation' images."""
    bundle = tiny_bundle()
    bundle.card["training"] = {"class_counts": {"normal": 30, "bacterial": 40, "viral": 30}}
    bundle.card["calibration"] = {"temperatures": {"binary": 1.0, "multiclass": 1.0}}
    pixels = textured(120, 0.4, seed=10)
    uris = [f"/val/{i}.jpeg" for i in range(len(pixels))]
    raw = outputs_of(bundle, pixels, uris)
    bundle.drift_reference = reference_table(
        raw["image_uri"], bundle.finish(raw), raw, [50_000] * len(uris)
    )
    return bundle


def adapt_to(bundle, pixels: np.ndarray, sizes: int = 50_000) -> dict:
    uris = [f"/site/{i}.jpeg" for i in range(len(pixels))]
    return adapt_unlabelled(
        bundle, pixels, uris, [sizes] * len(uris),
        lambda b: outputs_of(b, pixels, uris), {"inputs": ["/site"]},
    )  # fmt: skip


def test_a_site_whose_images_differ_gets_new_batchnorm_statistics_recorded_in_the_card():
    bundle = site_bundle()
    weights = {k: v.clone() for k, v in bundle.binary.state_dict().items()}
    record = adapt_to(bundle, textured(120, 0.75, seed=3))
    assert record["batchnorm"]["adapted"]
    assert record["image_shift"]["image_mean"]["drift"]
    assert "image_mean" in record["batchnorm"]["why"]
    changed = {k for k, v in bundle.binary.state_dict().items() if not torch.equal(v, weights[k])}
    assert changed and all("running" in k or "num_batches" in k for k in changed)
    assert bundle.card["site_adaptations"][-1] is record
    assert record["images"] == 120 and len(record["fingerprint"]) == 64
    assert set(record["class_prior"]) == {"binary", "multiclass", "images"}
    # the drift reference is now the site's
    assert bundle.drift_reference.column("image_uri")[0].as_py().startswith("/site/")


def test_a_site_like_validation_keeps_its_networks():
    bundle = site_bundle()
    weights = {k: v.clone() for k, v in bundle.binary.state_dict().items()}
    record = adapt_to(bundle, textured(120, 0.4, seed=4))
    assert not record["batchnorm"]["adapted"]
    assert all(torch.equal(v, weights[k]) for k, v in bundle.binary.state_dict().items())


def test_adapting_twice_from_the_same_images_gives_the_same_bundle(tmp_path):
    site = textured(60, 0.75, seed=5)
    cards = []
    for name in ("a", "b"):
        bundle = site_bundle()
        adapt_to(bundle, site)
        for record in bundle.card["site_adaptations"]:
            record.pop("adapted_at")
        cards.append(write_bundle(bundle, str(tmp_path / name)))
    assert cards[0]["files"] == cards[1]["files"]  # every file's hash
    assert cards[0]["model_version"] == cards[1]["model_version"]


def test_too_few_images_are_refused_and_few_warned_about(capsys):
    with pytest.raises(SiteError, match="at least 20"):
        adapt_to(site_bundle(), textured(5, 0.5, seed=6))
    adapt_to(site_bundle(), textured(30, 0.5, seed=6))
    assert "rough" in capsys.readouterr().out


def test_a_one_class_store_is_warned_about_and_its_prior_bounded(capsys, monkeypatch):
    bundle = site_bundle()
    n = 200
    raw = outputs_of(bundle, textured(n, 0.4, 7), [f"/s/{i}" for i in range(n)])
    raw["binary_logit"] = np.full(n, 9.0, dtype=np.float32)  # every image called pneumonia
    raw["multiclass_logits"] = np.tile(np.float32([-9.0, 9.0, 0.0]), (n, 1))
    prior = unlabelled.estimate_class_prior(bundle, raw)
    assert prior["binary"]["site"] <= calibration.PRIOR_RANGE[1] + 1e-9
    # bacterial and viral keep the training proportion (40:30); the normal share is the binary's
    normal, bacterial, viral = prior["multiclass"]["site"]
    assert bacterial / viral == pytest.approx(40 / 30)
    assert normal == pytest.approx(1 - prior["binary"]["site"])
    assert "look like one class" in capsys.readouterr().out


# --- the labelling list -----------------------------------------------------------------------


def test_the_spread_rule_takes_the_threshold_band_and_the_whole_score_range():
    p = np.linspace(0.001, 0.999, 200)
    chosen, why = select_for_labelling(p, 0.5, 20, "spread")
    assert len(chosen) == 20 and len(set(chosen.tolist())) == 20
    near = chosen[np.array(why) == "near the threshold"]
    assert len(near) == 10 and np.abs(p[near] - 0.5).max() < 0.06
    spread = p[chosen[np.array(why) != "near the threshold"]]
    assert spread.min() < 0.05 and spread.max() > 0.95
    randomly, _ = select_for_labelling(p, 0.5, 20, "random", seed=1)
    assert len(set(randomly.tolist())) == 20
    assert np.array_equal(randomly, select_for_labelling(p, 0.5, 20, "random", seed=1)[0])


def test_the_default_labelling_rule_is_a_random_draw_everywhere():
    """The learning curve favoured random labels over `spread` (docs/results.md): the function,
    pneumo-adapt and the scoring job's list all default to it."""
    p = np.linspace(0.001, 0.999, 200)
    chosen, why = select_for_labelling(p, 0.5, 20)
    assert set(why) == {"random draw"}
    assert np.array_equal(chosen, select_for_labelling(p, 0.5, 20, "random", seed=0)[0])
    args = adapt_parser().parse_args(["--model", "m", "--unlabelled", "s", "--output", "o"])
    assert args.labelling_rule == "random"
    with pytest.raises(SystemExit):
        adapt_parser().parse_args(["--model", "m", "--unlabelled", "s", "--output", "o",
                                   "--labelling-rule", "nearest"])  # fmt: skip


def label_of(uri: str) -> str:
    """The label a radiologist would write in: here, from the Kaggle folder and file name."""
    folder, name = uri.rsplit("/", 2)[-2:]
    return class_label(folder, name)


def fill_in(path, rows: list[dict]) -> None:
    """The labelling list as a radiologist gives it back: every label written in."""
    for row in rows:
        row["label"] = label_of(row["image_uri"])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, LABELLING_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def test_the_labelling_list_is_a_labels_manifest_once_filled_in(tmp_path):
    uris = [str(p) for folder in ("NORMAL", "PNEUMONIA")
            for p in sorted((CHEST_XRAY / "test" / folder).glob("*.jpeg"))[:10]]  # fmt: skip
    p = np.linspace(0.05, 0.95, len(uris))
    path = tmp_path / "to_label.csv"
    assert write_labelling_list(str(path), uris, p, 0.5, 8, "spread") == 8
    rows = list(csv.DictReader(path.open()))
    assert tuple(rows[0]) == LABELLING_COLUMNS
    assert len(rows) == 8 and len({row["image_uri"] for row in rows}) == 8
    assert all(row["label"] == "" for row in rows)
    with pytest.raises(ValueError, match="label"):
        list_labels_manifest(str(path))  # not filled in yet: refused, naming the row
    fill_in(path, rows)
    images = list_labels_manifest(str(path))
    assert sorted(i.uri for i in images) == sorted(row["image_uri"] for row in rows)
    assert {i.label for i in images} <= set(CLASS_LABELS)


# --- the job ------------------------------------------------------------------------------------


def test_unlabelled_adapt_job_writes_a_new_bundle_and_a_labelling_list_it_takes_back(
    trained, subset_store, job_env, tmp_path
):
    bundle, _ = trained
    card_before = (bundle / "card.json").read_bytes()
    output, to_label = tmp_path / "adapted", tmp_path / "to_label.csv"
    result = run_job(
        "adapt.py", "--model", str(bundle), "--unlabelled", str(subset_store / "test"),
        "--output", str(output), "--labelling-list", str(to_label), "--labelling-images", "12",
        env=job_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (bundle / "card.json").read_bytes() == card_before
    card = json.loads((output / "card.json").read_text())
    record = card["site_adaptations"][-1]
    assert record["kind"] == "unlabelled" and record["images"] == 120
    assert card["model_version"] != json.loads(card_before)["model_version"]
    assert "class balance (EM)" in result.stdout and "labelling list" in result.stdout
    load_bundle(str(output))  # every file matches its card

    rows = list(csv.DictReader(to_label.open()))
    assert len(rows) == 12
    # the default rule is the learning curve's choice: a random draw
    assert {row["why"] for row in rows} == {"random draw"} and "(random)" in result.stdout
    fill_in(to_label, rows)
    labelled = run_job(
        "adapt.py", "--model", str(output), "--data", str(to_label),
        "--output", str(tmp_path / "labelled"), env=job_env,
    )  # fmt: skip
    assert labelled.returncode == 0, labelled.stdout[-3000:] + labelled.stderr[-3000:]
    kinds = [
        r.get("kind", "labelled")
        for r in json.loads((tmp_path / "labelled" / "card.json").read_text())["site_adaptations"]
    ]
    assert kinds == ["unlabelled", "labelled"]
