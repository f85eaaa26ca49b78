from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pneumo_ray.io import data, stores
from pneumo_ray.io.images import decode_image
from pneumo_ray.io.labels import LabelError
from pneumo_ray.io.synthetic import write_synthetic_store

from ..conftest import CHEST_XRAY


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    return write_synthetic_store(
        str(tmp_path_factory.mktemp("store")), per_class=4, test_per_class=2, size=64
    )


def _copy(store: str, tmp_path) -> str:
    target = tmp_path / "copy"
    shutil.copytree(store, target)
    return str(target)


def test_list_store_labels_every_image(synthetic_store):
    images = data.list_store(synthetic_store)
    assert len(images) == 3 * (4 + 2 + 2)
    assert {i.split for i in images} == {"train", "val", "test"}
    assert {i.label for i in images} == {"normal", "bacterial", "viral"}
    assert all(i.size > 0 and i.uri.startswith("/") for i in images)


def test_list_store_on_the_real_data_set_matches_its_manifest():
    images = data.list_store(str(CHEST_XRAY))
    manifest = {
        line.split(",")[4]: line.split(",")[2]
        for line in (CHEST_XRAY / "manifest.csv").read_text().splitlines()[1:]
    }
    assert len(images) == len(manifest) == 5617
    mapping = {"bacteria": "bacterial", "virus": "viral", "normal": "normal"}
    assert all(mapping[manifest[i.uri.rsplit("/", 1)[1]]] == i.label for i in images)


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(stores.StoreError, match="image store not found"):
        data.list_store(str(tmp_path / "nowhere"))


def test_empty_class_is_a_clear_error(synthetic_store, tmp_path):
    store = _copy(synthetic_store, tmp_path)
    shutil.rmtree(f"{store}/test/NORMAL")
    with pytest.raises(data.StoreLayoutError, match="test/NORMAL has no"):
        data.check_training_store(data.list_store(store), store)
    store2 = _copy(synthetic_store, tmp_path / "b")
    for path in (tmp_path / "b" / "copy").glob("*/PNEUMONIA/*virus*"):
        path.unlink()
    with pytest.raises(data.StoreLayoutError, match="no viral image"):
        data.check_training_store(data.list_store(store2), store2)


def test_a_site_store_with_only_its_test_split_is_listed_for_evaluation(synthetic_store, tmp_path):
    from pneumo_ray.training.evaluation import split_images

    store = _copy(synthetic_store, tmp_path)
    for split in ("train", "val"):
        shutil.rmtree(f"{store}/{split}", ignore_errors=True)
    images = split_images(store, "test")
    assert images and {i.split for i in images} == {"test"}
    with pytest.raises(data.StoreLayoutError, match="no images in the 'val' split"):
        split_images(store, "val")
    with pytest.raises(data.StoreLayoutError, match="training images have no normal"):
        data.check_training_store(images, store)  # what training asks, and a site store lacks
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.StoreLayoutError, match="no images in"):
        data.list_store(str(tmp_path / "empty"))


def test_a_labels_manifest_names_any_files_with_labels_and_patients(tmp_path):
    from ..dicom import write_dicom

    folder = tmp_path / "export" / "ST0"
    folder.mkdir(parents=True)
    jpegs = sorted((CHEST_XRAY / "test" / "NORMAL").glob("*.jpeg"))[:2]
    gray = np.asarray(Image.open(jpegs[0]).convert("L"))
    write_dicom(folder / "IM000001", gray, bits=16)  # a PACS export: no suffix
    shutil.copy(jpegs[1], folder / "scan 2, lateral.jpeg")  # a comma in the name
    manifest = tmp_path / "export" / "labels.csv"
    manifest.write_text(
        "\ufeffpatient_id,image_uri,label\n"  # as a spreadsheet saves it: a byte-order mark
        "007,ST0/IM000001,Normal\n"
        '007,"ST0/scan 2, lateral.jpeg",virus\n'
        f"12,{jpegs[0]},bacterial\n"
    )
    images = data.list_store(str(manifest))
    assert [(i.label, i.patient_id, i.split) for i in images] == [
        ("normal", "007", "test"),  # no split column: test rows, what evaluation reads
        ("viral", "007", "test"),
        ("bacterial", "12", "test"),
    ]
    assert images[0].uri == str(folder / "IM000001")  # relative to the manifest's folder
    assert images[0].size == (folder / "IM000001").stat().st_size
    assert decode_image((folder / "IM000001").read_bytes(), 32).std() > 0  # by its bytes

    table = pa.table(
        {
            "uri": [str(jpegs[0]), str(jpegs[1])],
            "label": ["normal", "viral"],
            "split": ["train", "test"],
        }
    )
    pq.write_table(table, tmp_path / "labels.parquet")
    images = data.list_store(str(tmp_path / "labels.parquet"))
    assert [(i.split, i.patient_id) for i in images] == [
        ("train", str(jpegs[0])),  # no patient column: each image its own patient
        ("test", str(jpegs[1])),
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("path,diagnosis\na.jpeg,normal\n", "needs a column image_uri .* and a column label"),
        ("image_uri,label\na.jpeg,normal\nb.jpeg,pneumonia\n", "row 3: needs .* normal"),
        ("image_uri,label,split\na.jpeg,normal,holdout\n", "row 2: .* split of train"),
        ("uri,label\na.jpeg,normal\nb.jpeg,viral\na.jpeg,viral\n", "row 4: .*a.jpeg is on row 2"),
    ],
)
def test_a_bad_labels_manifest_names_the_row(tmp_path, text, match):
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(LabelError, match=match):
        data.list_store(str(tmp_path / "labels.csv"))


def test_unknown_filename_pattern_is_an_error_naming_the_file(synthetic_store, tmp_path):
    store = _copy(synthetic_store, tmp_path)
    shutil.copy(f"{store}/train/NORMAL/IM-0001-0001.jpeg", f"{store}/train/PNEUMONIA/scan7.jpeg")
    with pytest.raises(LabelError, match="scan7.jpeg"):
        data.list_store(store)


def test_corrupt_file_among_good_ones_is_skipped_and_named(synthetic_store, tmp_path, ray_local):
    store = _copy(synthetic_store, tmp_path)
    bad = f"{store}/train/PNEUMONIA/person9_bacteria_99.jpeg"
    with open(bad, "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0 truncated jpeg")
    images = [i for i in data.list_store(store) if i.split == "train"]
    split = data.decode_split(images, image_size=32, seed=0)
    assert split.count == len(images) - 1
    assert [uri for uri, _ in split.failed] == [bad]
    assert "not a readable image" in split.failed[0][1]
    rows = split.dataset.take_all()
    assert len(rows) == split.count and bad not in {r["image_uri"] for r in rows}
    assert rows[0]["image"].shape == (32, 32) and rows[0]["image"].dtype == np.uint8
    normals = data.normal_only(split).take_all()
    assert normals and all(r["label_index"] == 0 for r in normals)


def test_fingerprint_changes_with_the_data(synthetic_store):
    images = data.list_store(synthetic_store)
    first = data.fingerprint(images)
    assert first["images"] == len(images)
    assert data.fingerprint(images[1:])["sha256"] != first["sha256"]
    assert data.fingerprint(list(reversed(images)))["sha256"] == first["sha256"]


def test_a_file_rewritten_in_place_changes_the_fingerprint_and_the_run_key(
    synthetic_store, tmp_path
):
    from pneumo_ray.config import TrainConfig

    store = _copy(synthetic_store, tmp_path)
    config = TrainConfig.from_flat(data=store, output=str(tmp_path / "bundle"))
    before = data.fingerprint(data.list_store(store))
    victim = sorted(Path(store).rglob("*.jpeg"))[0]
    stat = victim.stat()
    victim.write_bytes(victim.read_bytes())  # same URI, same size, new content time
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = data.fingerprint(data.list_store(store))
    assert after["bytes"] == before["bytes"] and after["sha256"] != before["sha256"]
    assert config.run_key("binary", {"train": before["sha256"]}) != config.run_key(
        "binary", {"train": after["sha256"]}
    )
