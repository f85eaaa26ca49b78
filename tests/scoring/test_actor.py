"""The scoring job's model actor: its rows, built from whole arrays, equal the row-by-row
construction it replaced; image statistics agree wherever they are computed."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
import torch

from pneumo_ray.io.data import decode_batch, read_batch
from pneumo_ray.io.images import IMAGE_STATS, image_stats
from pneumo_ray.models.bundle import write_bundle
from pneumo_ray.scoring.ledger import OUTPUT_SCHEMA
from pneumo_ray.scoring.score import BundlePredictor

from ..conftest import CHEST_XRAY
from ..models.test_bundle import SIZE, tiny_bundle


@pytest.fixture(scope="module")
def batch_of_files(tmp_path_factory):
    """Eleven real X-rays and one corrupt file, as the scoring job's listing gives them."""
    folder = tmp_path_factory.mktemp("images")
    files = sorted((CHEST_XRAY / "test").rglob("*.jpeg"))[:11]
    corrupt = folder / "corrupt.jpeg"
    corrupt.write_bytes(b"\xff\xd8 not a jpeg")
    uris = [str(f) for f in files[:5]] + [str(corrupt)] + [str(f) for f in files[5:]]
    return {
        "image_uri": np.array(uris, dtype=object),
        "image_bytes": np.arange(len(uris), dtype=np.int64) + 100,
        "image_mtime_ns": np.array([-1] + [7] * (len(uris) - 1), dtype=np.int64),
    }


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("bundle") / "b")
    write_bundle(tiny_bundle(), uri)
    return BundlePredictor(uri, use_gpu=False, threads=1, gpu_decode=False)


def row_by_row(actor: BundlePredictor, batch: dict, now: dt.datetime) -> pa.Table:
    """The actor's rows as they were built before issue 22: the usable rows' predictions and
    numpy image statistics, placed into the schema one value at a time."""
    errors = [str(e) for e in batch["error"]]
    ok = np.array([not e for e in errors])
    predictions = {}
    if ok.any():
        usable = batch["image"][ok]
        predictions = actor.bundle.predict(usable)
        predictions.update(image_stats(usable))
        predictions["heatmap_uri"] = [None] * int(ok.sum())
    index = np.flatnonzero(ok)
    n = len(errors)

    def column(name: str) -> pa.Array:
        values: list = [None] * n
        for row, value in zip(index, predictions.get(name, []), strict=True):
            values[row] = value.tolist() if isinstance(value, np.ndarray) else value
        return pa.array(values, type=OUTPUT_SCHEMA.field(name).type)

    columns = {
        "image_uri": pa.array(batch["image_uri"].tolist(), pa.string()),
        "model_version": pa.array([actor.bundle.model_version] * n, pa.string()),
        "scored_on": pa.array([actor.node] * n, pa.string()),
        "scored_at": pa.array([now] * n, OUTPUT_SCHEMA.field("scored_at").type),
        "error": pa.array([e or None for e in errors], pa.string()),
        "error_kind": pa.array([k or None for k in batch["error_kind"]], pa.string()),
        "image_bytes": pa.array(batch["image_bytes"].tolist(), pa.int64()),
        "image_mtime_ns": pa.array(
            [None if m < 0 else int(m) for m in batch["image_mtime_ns"]], pa.int64()
        ),
    }
    for name in OUTPUT_SCHEMA.names:
        if name not in columns:
            columns[name] = column(name)
    return pa.table([columns[name] for name in OUTPUT_SCHEMA.names], schema=OUTPUT_SCHEMA)


def without_time(table: pa.Table) -> pa.Table:
    return table.drop_columns(["scored_at"])


def test_rows_equal_the_row_by_row_construction(actor, batch_of_files):
    batch = decode_batch(dict(batch_of_files), SIZE)
    assert batch["error"][5] and not any(batch["error"][:5])  # the corrupt file is a row too
    rows = actor(batch)
    expected = row_by_row(actor, batch, dt.datetime.now(dt.UTC))
    assert rows.schema == OUTPUT_SCHEMA
    assert without_time(rows).equals(without_time(expected))
    assert rows.column("p_pneumonia").null_count == 1
    assert rows.column("knn_neighbors")[5].as_py() is None
    assert len(rows.column("knn_neighbors")[0].as_py()) == actor.bundle.knn.k


def test_a_batch_without_usable_rows_gives_null_scores(actor, batch_of_files):
    batch = decode_batch({key: value[5:6] for key, value in batch_of_files.items()}, SIZE)
    rows = actor(batch)
    assert rows.num_rows == 1 and rows.column("error_kind").to_pylist() == ["permanent"]
    assert rows.column("knn_distances").to_pylist() == [None]
    assert without_time(rows).equals(
        without_time(row_by_row(actor, batch, dt.datetime.now(dt.UTC)))
    )


def test_image_statistics_agree_between_decode_task_and_actor(actor, batch_of_files):
    decoded = decode_batch(dict(batch_of_files), SIZE)
    ok = decoded["error"] == ""
    on_device = image_stats(torch.from_numpy(decoded["image"]))  # an actor's torch path
    for name in IMAGE_STATS:
        np.testing.assert_allclose(on_device[name], decoded[name], rtol=1e-5, atol=1e-6)
    # the whole actor: CPU decode (statistics from the decode task) against bytes decoded in
    # the actor (statistics computed there)
    from_task = actor(decoded)
    from_actor = actor(read_batch(dict(batch_of_files)))
    assert from_actor.column("error").is_null().equals(from_task.column("error").is_null())
    for name in IMAGE_STATS:
        task_values = np.array(from_task.column(name).to_pylist(), dtype=float)[ok]
        actor_values = np.array(from_actor.column(name).to_pylist(), dtype=float)[ok]
        np.testing.assert_allclose(actor_values, task_values, rtol=1e-5, atol=1e-6)
        assert task_values.std() > 0  # real, differing images
