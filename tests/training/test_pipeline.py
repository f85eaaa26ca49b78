"""Choices the training pipeline makes on validation outputs, on synthetic outputs."""

from __future__ import annotations

import numpy as np

from pneumo_ray.config import TrainConfig
from pneumo_ray.io.labels import CLASS_LABELS
from pneumo_ray.models.knn import KNN_K_CANDIDATES
from pneumo_ray.training.pipeline import _choose_knn


def outputs(n: int, flip: float, seed: int) -> dict:
    """Three-class outputs near each class's corner; a ``flip`` share of labels is wrong."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, n)
    probs = np.eye(3)[truth] * 0.5 + rng.normal(0, 0.3, (n, 3))
    labels = np.where(rng.random(n) < flip, rng.integers(0, 3, n), truth)
    return {
        "image_uri": np.array([f"file:///r/{i}.jpeg" for i in range(n)]),
        "label_index": labels,
        "probs": probs.astype(np.float32),
        "embedding": rng.normal(0, 1, (n, 8)).astype(np.float32),  # no signal
    }


def test_knn_k_auto_keeps_the_best_validation_k():
    # Noisy reference labels: more neighbours outvote the wrong ones.
    train, val = outputs(900, flip=0.4, seed=0), outputs(300, flip=0.0, seed=1)
    knn, accuracy = _choose_knn(TrainConfig.from_flat(data="/s", output="/o"), train, val)
    assert knn.feature_kind == "softmax"
    assert set(accuracy) == {"softmax", "embedding"}
    assert set(accuracy["softmax"]) == {str(k) for k in KNN_K_CANDIDATES}
    assert accuracy["softmax"][str(knn.k)] == max(accuracy["softmax"].values())
    assert accuracy["softmax"]["51"] > accuracy["softmax"]["5"] + 0.05
    assert knn.k > 5


def test_knn_k_given_or_limited_by_the_reference_size():
    train, val = outputs(900, flip=0.4, seed=0), outputs(300, flip=0.0, seed=1)
    knn, accuracy = _choose_knn(TrainConfig.from_flat(data="/s", output="/o", knn_k=5), train, val)
    assert knn.k == 5 and set(accuracy["softmax"]) == {"5"}
    small = {key: value[:20] for key, value in train.items()}
    knn, accuracy = _choose_knn(TrainConfig.from_flat(data="/s", output="/o"), small, val)
    assert set(accuracy["softmax"]) == {"5", "15"} and knn.k in (5, 15)


def test_training_reads_a_labels_manifest_by_its_split_column(ray_local, tmp_path):
    import pytest

    from pneumo_ray.io import data
    from pneumo_ray.io.synthetic import write_synthetic_store
    from pneumo_ray.training.pipeline import list_and_decode

    store = write_synthetic_store(str(tmp_path / "store"), per_class=6, test_per_class=2, size=32)
    images = data.list_store(store)
    rows = [f"{i.uri},{i.label},{i.patient_id},{i.split}" for i in images]
    manifest = tmp_path / "labels.csv"
    manifest.write_text("image_uri,label,patient_id,split\n" + "\n".join(rows) + "\n")
    config = TrainConfig.from_flat(data=str(manifest), output=str(tmp_path / "b"), image_size=32)
    splits = list_and_decode(config)
    pool = {i.uri for i in images if i.split in ("train", "val")}
    assert {i.uri for i in splits.train_images + splits.val_images} == pool
    assert {i.uri for i in splits.test_images} == {i.uri for i in images if i.split == "test"}
    assert splits.train.count == len(splits.train_images)  # decoded, by the manifest's URIs
    # without a split column every row is a test row, which training refuses by name
    manifest.write_text("image_uri,label\n" + "\n".join(r.rsplit(",", 2)[0] for r in rows))
    with pytest.raises(data.StoreLayoutError, match="training images have no normal image"):
        list_and_decode(config)
    # too few patients to hold any out: a sentence, not a failure inside Ray Data
    small = TrainConfig.from_flat(data=str(manifest), output="/o", image_size=32, val_fraction=0.01)
    first = {i.label: i for i in reversed(images) if i.split == "train"}  # one per class
    kept = [*first.values(), *(i for i in images if i.split == "test")]
    rows = [f"{i.uri},{i.label},{i.patient_id},{i.split}" for i in kept]
    manifest.write_text("image_uri,label,patient_id,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="to validate on at --val-fraction 0.01"):
        list_and_decode(small)


def test_a_learned_framing_reference_reaches_the_training_batches(ray_local, tmp_path, monkeypatch):
    """--framing-reference learned: every training film gets its predicted frame, by URI, and
    the CNNs' training batches carry them in the dataset's order; without the column they
    carry none. The fit is seeded: the same films give the same frames."""
    import torch

    from pneumo_ray.io.synthetic import write_synthetic_store
    from pneumo_ray.models import reframing
    from pneumo_ray.training.loop import training_batches
    from pneumo_ray.training.pipeline import frame_training_films, list_and_decode, with_frames

    monkeypatch.setattr(reframing, "FIT_EPOCHS", 2)
    store = write_synthetic_store(str(tmp_path / "store"), per_class=8, test_per_class=1, size=48)
    config = TrainConfig.from_flat(
        data=store, output=str(tmp_path / "b"), image_size=32,
        framing_augmentation=True, framing_reference="learned",
    )  # fmt: skip
    splits = list_and_decode(config)
    fitted = frame_training_films(config, splits)
    frames = fitted.frames
    assert set(frames) == {i.uri for i in splits.train_images}
    values = np.array(list(frames.values()))
    assert values.shape == (len(frames), 4) and np.isfinite(values).all()
    assert (values[:, 2] > values[:, 0]).all() and (values[:, 3] > values[:, 1]).all()
    assert frame_training_films(config, splits).frames == frames
    areas = fitted.summary["median_frame_area"]
    assert set(areas) == set(CLASS_LABELS) and all(a > 0 for a in areas.values())
    assert fitted.summary["films"] == len(frames) and fitted.summary["epochs"] == 2

    framed = with_frames(splits.train.dataset, frames)
    rows = framed.select_columns(["image_uri", reframing.FRAME_COLUMN]).take_all()
    expected = torch.tensor([frames[row["image_uri"]] for row in rows], dtype=torch.float32)
    batches = list(training_batches(framed, 5, torch.device("cpu"), None))
    assert torch.equal(torch.cat([batch[2] for batch in batches]), expected)
    assert batches[0][0].shape[1:] == (1, 32, 32)
    plain = training_batches(splits.train.dataset, 5, torch.device("cpu"), None)
    assert all(batch[2] is None for batch in plain)


def test_the_training_films_frames_are_kept_and_not_fitted_twice(ray_local, tmp_path, monkeypatch):
    """training_frames fits once and keeps the frames beside the networks' results; a rerun
    (or one that trains a single CNN anew) reads them back, and the card's record with them.
    A kept file that a killed run left unreadable is fitted again; a rerun that trains
    nothing fits nothing."""
    from pneumo_ray.io import stores
    from pneumo_ray.io.synthetic import write_synthetic_store
    from pneumo_ray.models import reframing
    from pneumo_ray.training import pipeline

    monkeypatch.setattr(reframing, "FIT_EPOCHS", 1)
    store = write_synthetic_store(str(tmp_path / "store"), per_class=6, test_per_class=1, size=48)
    settings = dict(
        data=store, output=str(tmp_path / "b"), image_size=32,
        framing_augmentation=True, framing_reference="learned",
    )  # fmt: skip
    config = TrainConfig.from_flat(**settings)
    splits = pipeline.list_and_decode(config)
    assert pipeline.training_frames(config, splits, fit=False) is None
    first = pipeline.training_frames(config, splits)
    uri = pipeline.frames_uri(config, splits.training_fingerprint)
    assert stores.exists(uri) and uri.startswith(str(tmp_path / "b" / "checkpoints"))

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted again")

    monkeypatch.setattr(pipeline, "frame_training_films", no_fit)
    again = pipeline.training_frames(config, splits)
    assert again.frames == first.frames and again.summary == first.summary
    other_seed = TrainConfig.from_flat(**settings, seed=1)
    assert pipeline.frames_uri(other_seed, splits.training_fingerprint) != uri

    monkeypatch.undo()
    monkeypatch.setattr(reframing, "FIT_EPOCHS", 1)
    stores.write_bytes(uri, b'{"summary": {"films"')  # cut short
    refitted = pipeline.training_frames(config, splits)
    assert refitted.frames.keys() == first.frames.keys()
    assert pipeline.training_frames(config, splits).summary == refitted.summary
