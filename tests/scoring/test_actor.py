"""The scoring job's model actor: its rows, built from whole arrays, equal the row-by-row
construction it replaced; image statistics agree wherever they are computed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

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
        missing = [None] * len(index)  # a column the bundle does not compute: null
        for row, value in zip(index, predictions.get(name, missing), strict=True):
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
    from_actor = actor(read_batch(dict(batch_of_files), SIZE))
    assert from_actor.column("error").is_null().equals(from_task.column("error").is_null())
    for name in IMAGE_STATS:
        task_values = np.array(from_task.column(name).to_pylist(), dtype=float)[ok]
        actor_values = np.array(from_actor.column(name).to_pylist(), dtype=float)[ok]
        np.testing.assert_allclose(actor_values, task_values, rtol=1e-5, atol=1e-6)
        assert task_values.std() > 0  # real, differing images


@pytest.fixture(scope="module")
def mixed_files(tmp_path_factory):
    """What a hospital store holds besides baseline JPEGs: a 16-bit DICOM, a 16-bit PNG, an
    EXIF-rotated JPEG, beside two plain JPEGs, a corrupt file and a missing one."""
    from PIL import Image

    from ..dicom import write_dicom

    folder = tmp_path_factory.mktemp("mixed")
    jpegs = sorted((CHEST_XRAY / "test").rglob("*.jpeg"))[:3]
    gray = np.asarray(Image.open(jpegs[2]).convert("L"))
    write_dicom(folder / "a.dcm", gray, bits=16)
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "b.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.fromarray(gray).save(folder / "c.jpeg", exif=exif)
    (folder / "d.jpeg").write_bytes(b"\xff\xd8 not a jpeg")
    names = ["a.dcm", "b.png", "c.jpeg", "d.jpeg", "gone.png"]
    uris = [str(jpegs[0]), *(str(folder / name) for name in names), str(jpegs[1])]
    return {
        "image_uri": np.array(uris, dtype=object),
        "image_bytes": np.arange(len(uris), dtype=np.int64) + 100,
        "image_mtime_ns": np.full(len(uris), 7, dtype=np.int64),
    }


def test_gpu_decode_tasks_pass_jpeg_bytes_and_decode_every_other_file(mixed_files):
    from pneumo_ray.io.images import decode_image

    read = read_batch(dict(mixed_files), SIZE)
    uris = mixed_files["image_uri"]
    assert read["image_decoded"].tolist() == [False, True, True, True, False, False, False]
    files = [Path(uri).read_bytes() if Path(uri).exists() else b"" for uri in uris]
    for i in (0, 6):  # JPEGs nvJPEG can take: their bytes, untouched
        assert read["image_data"][i] == files[i]
    for i in (1, 2, 3):  # DICOM, 16-bit PNG, rotated JPEG: decoded here, as pixels
        assert read["image_data"][i] == decode_image(files[i], SIZE).tobytes()
    assert read["error_kind"].tolist() == ["", "", "", "", "permanent", "permanent", ""]
    assert "not a readable image" in read["error"][4] and read["image_data"][4] == b""


def test_the_actor_scores_gpu_decode_rows_as_it_scores_cpu_decoded_ones(actor, mixed_files):
    from_task = actor(decode_batch(dict(mixed_files), SIZE))
    from_bytes = actor(read_batch(dict(mixed_files), SIZE))
    # Pillow names a BytesIO's address in its message; the rest of each error agrees
    errors = [
        [e and e.split(" <")[0] for e in t.column("error").to_pylist()]
        for t in (from_task, from_bytes)
    ]
    assert errors[0] == errors[1] and errors[0].count(None) == 5
    # the statistics come from numpy in the decode task, from torch in the actor
    for name in IMAGE_STATS:
        np.testing.assert_allclose(
            np.array(from_bytes.column(name).to_pylist(), dtype=float),
            np.array(from_task.column(name).to_pylist(), dtype=float),
            rtol=1e-5,
            atol=1e-6,
        )
    rest = ["scored_at", "error", *IMAGE_STATS]
    assert from_bytes.drop_columns(rest).equals(from_task.drop_columns(rest))
