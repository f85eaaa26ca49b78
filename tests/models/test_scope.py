"""The scope check (pneumo_ray.models.scope): out-of-scope pictures are told from chest films."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumo_ray.io.data import load_image
from pneumo_ray.models.bundle import load_bundle, withhold_out_of_scope, write_bundle
from pneumo_ray.models.scope import Gaussian, ScopeFeatures, ScopeReference

from ..benchmarks import load_benchmark
from ..conftest import CHEST_XRAY
from .test_bundle import SIZE, tiny_bundle


def test_mahalanobis_distance_and_the_percentile_threshold():
    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 0.0], [0.0, 0.25]])
    train = rng.multivariate_normal([1.0, -1.0], cov, 4000)
    gaussian = Gaussian.fit(train)
    # along the wide axis a step of 2 is one standard deviation; along the narrow one, four
    d = gaussian.distance(np.array([[3.0, -1.0], [1.0, 1.0]]))
    assert d[0] == pytest.approx(1.0, rel=0.08) and d[1] == pytest.approx(4.0, rel=0.08)
    val = rng.multivariate_normal([1.0, -1.0], cov, 2000)
    both = {"imagenet": val, "embedding": val}
    reference = ScopeReference.fit({"imagenet": train, "embedding": train}, both, 99.0)
    marked = reference.score(both) > 1.0
    assert marked.mean() == pytest.approx(0.01, abs=0.005)


def test_the_reference_round_trips_through_parquet():
    rng = np.random.default_rng(1)
    features = {"imagenet": rng.normal(size=(50, 6)), "embedding": rng.normal(size=(50, 3))}
    reference = ScopeReference.fit(features, features)
    again = ScopeReference.from_table(reference.to_table())
    probe = {"imagenet": rng.normal(size=(5, 6)), "embedding": rng.normal(size=(5, 3))}
    np.testing.assert_allclose(again.score(probe), reference.score(probe))
    assert again.fit_images == 50 and again.percentile == reference.percentile


def test_scope_features_are_frozen_pooled_imagenet_features():
    model = ScopeFeatures(pretrained=True)
    model.train()
    assert not model.training  # ImageNet statistics, always
    with torch.inference_mode():
        out = model(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 2 * (40 + 112 + 320))


@pytest.fixture(scope="module")
def films():
    paths = sorted((CHEST_XRAY / "train" / "NORMAL").glob("*.jpeg"))[:150]
    paths += sorted((CHEST_XRAY / "train" / "PNEUMONIA").glob("*.jpeg"))[:150]
    return np.stack([load_image(str(p), SIZE) for p in paths])


@pytest.fixture(scope="module")
def scoped(films):
    """A tiny bundle with a scope check fitted on 240 real films, thresholds on 60 others."""
    benchmark = load_benchmark("scope_check")
    bundle = tiny_bundle()
    bundle.scope = ScopeFeatures(pretrained=True)
    order = np.random.default_rng(0).permutation(len(films))
    train, held_out = films[order[:240]], films[order[240:]]
    bundle.scope_reference = ScopeReference.fit(
        benchmark.scope_inputs(bundle, train), benchmark.scope_inputs(bundle, held_out)
    )
    bundle.card["scope"] = {"architecture": bundle.scope.architecture}
    return bundle


def test_the_pixel_check_catches_other_pictures_and_keeps_chest_films(scoped, films):
    benchmark = load_benchmark("scope_check")
    pictures = benchmark.out_of_scope_pictures(SIZE, films[240:270])
    for group in ("ct_mr", "ct_phantom", "photo", "document"):
        assert pictures[group], group
        marked = ~scoped.predict(np.stack(pictures[group]))["in_scope"]
        assert marked.all(), group
    unseen = np.stack([load_image(str(p), SIZE) for p in
                       sorted((CHEST_XRAY / "test" / "NORMAL").glob("*.jpeg"))[:40]])  # fmt: skip
    kept = scoped.predict(unseen)["in_scope"]
    # a reference fitted on 240 films at 32 px; a bundle's is fitted on its whole training
    # split (benchmarks/scope_check.py gives those figures)
    assert kept.mean() >= 0.8


def test_scope_columns_metadata_first_and_the_calls_withheld(scoped, films):
    notes = np.array(["lateral or oblique view: DICOM ViewPosition LL", ""], dtype=object)
    columns = scoped.predict(films[:2], notes)
    assert not columns["in_scope"][0] and columns["scope_reason"][0].startswith("lateral")
    assert np.isfinite(columns["scope_score"]).all()
    withheld = withhold_out_of_scope(columns)
    assert withheld["pred_binary"][0] is None and withheld["knn_label"][0] is None
    assert withheld["p_pneumonia"][0] == columns["p_pneumonia"][0]  # probabilities stay
    if columns["in_scope"][1]:
        assert withheld["pred_binary"][1] == columns["pred_binary"][1]


def test_a_bundle_with_the_check_round_trips_and_one_without_scores_as_before(
    scoped, films, tmp_path
):
    write_bundle(scoped, str(tmp_path / "with"))
    loaded = load_bundle(str(tmp_path / "with"))
    np.testing.assert_allclose(
        loaded.predict(films[:4])["scope_score"], scoped.predict(films[:4])["scope_score"],
        rtol=1e-4,
    )  # fmt: skip
    old = tiny_bundle()  # no scope reference: as before, and the columns say so
    columns = old.predict(films[:4])
    assert columns["in_scope"].all() and "scope_score" not in columns
    assert all(reason is None for reason in columns["scope_reason"])


def test_a_widened_reference_takes_in_a_sites_images_and_keeps_the_training_ones():
    rng = np.random.default_rng(2)

    def draw(centre: float, n: int) -> dict[str, np.ndarray]:
        return {
            "imagenet": rng.normal(centre, 1.0, (n, 4)),
            "embedding": rng.normal(centre, 1.0, (n, 3)),
        }

    reference = ScopeReference.fit(draw(0.0, 400), draw(0.0, 200))
    site, training, elsewhere = draw(6.0, 300), draw(0.0, 100), draw(-8.0, 50)
    assert (reference.score(site) > 1).all()
    widened = reference.widened(site)
    assert (widened.score(site) <= 1).mean() > 0.9
    assert (widened.score(training) <= 1).mean() > 0.9
    assert (widened.score(elsewhere) > 1).all()  # what is near neither stays out
    again = ScopeReference.from_table(widened.to_table())  # the site's Gaussians are stored
    np.testing.assert_allclose(again.score(site), widened.score(site))
    # widening twice replaces the site's Gaussians rather than piling them up
    assert len(widened.widened(site).gaussians) == len(widened.gaussians) == 4


def test_adapt_refuses_an_unknown_scope_rule():
    from pneumo_ray.errors import ConfigError
    from pneumo_ray.training.adaptation import SiteRules

    with pytest.raises(ConfigError, match="--scope"):
        SiteRules(scope="widen").check()
