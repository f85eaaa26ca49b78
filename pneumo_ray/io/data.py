"""A labelled image store -> listing with labels -> Ray Data datasets of decoded images.

The store is listed once (one recursive listing, sizes included), labelled from the Kaggle
layout and filenames, then read and decoded by Ray Data CPU tasks. A file that cannot be read
or decoded becomes a row with an ``error`` instead of failing its block, so training can skip
it and name it in the report.
"""

from __future__ import annotations

import csv
import hashlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray

from pneumo_ray import faults
from pneumo_ray.io import listing, stores
from pneumo_ray.io.images import (
    ImageDecodeError,
    decode_image,
    gpu_decodable,
    image_stats,
    scope_note,
)
from pneumo_ray.io.labels import (
    CLASS_DIRS,
    CLASS_LABELS,
    IMAGE_SUFFIXES,
    SPLITS,
    LabelError,
    LabelledImage,
    label_from_path,
)

DECODE_BATCH_SIZE = 64
READ_ATTEMPTS = 3
READ_BACKOFF_S = 0.5  # doubled after each failed attempt
PERMANENT, TRANSIENT = "permanent", "transient"


class StoreLayoutError(ValueError):
    """A labelled store that is not in the Kaggle layout, or misses a class."""


def read_image_bytes(uri: str) -> bytes:
    """Read a file, retrying transient failures (timeouts, throttling, I/O errors) with
    back-off; a missing file (StoreError) is not retried."""
    attempt = 0
    while True:
        try:
            faults.before_read(uri, attempt)
            return stores.read_bytes(uri)
        except stores.StoreError:
            raise
        except OSError:
            if attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(READ_BACKOFF_S * 2**attempt)
            attempt += 1


def error_kind(exc: Exception) -> str:
    """ "permanent" for what the same bytes will always give (corrupt, truncated, not an image,
    a decompression bomb, a missing file); "transient" for a read that may work next time."""
    if isinstance(exc, ImageDecodeError | stores.StoreError):
        return PERMANENT
    return TRANSIENT


def load_image(uri: str, image_size: int) -> np.ndarray:
    """Read and decode one image; raises ImageDecodeError, StoreError or OSError."""
    return decode_image(read_image_bytes(uri), image_size)


def decode_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data batch function: add ``image`` (B, S, S) uint8, its statistics (IMAGE_STATS:
    computed here, in the CPU pool, not in the model actor), ``error`` ("" when decoded) and
    ``error_kind``.

    Each row is decoded on its own; a bad file yields a zero image and its error message,
    never an exception (one raised here would fail the whole block, and the job).
    """
    uris = batch["image_uri"]
    images = np.zeros((len(uris), image_size, image_size), dtype=np.uint8)
    # "" rather than None for success: a column of only None would reach Arrow as NaNs.
    errors, kinds, notes = [""] * len(uris), [""] * len(uris), [""] * len(uris)
    for i, uri in enumerate(uris):
        try:
            data = read_image_bytes(str(uri))
            images[i] = decode_image(data, image_size)
            notes[i] = scope_note(data)
        except (ImageDecodeError, OSError) as exc:
            errors[i], kinds[i] = str(exc), error_kind(exc)
    return {
        **batch,
        "image": images,
        **image_stats(images),
        "scope_note": np.array(notes, dtype=object),
        "error": np.array(errors, dtype=object),
        "error_kind": np.array(kinds, dtype=object),
    }


def read_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data batch function for GPU decode: add ``image_data``, ``image_decoded``, ``error``
    ("" when usable) and ``error_kind``. Never raises.

    A JPEG that nvJPEG can take keeps its bytes, for the model actor to decode on its GPU.
    Any other file (PNG, DICOM, an EXIF-rotated or CMYK JPEG) is decoded here, in the CPU
    pool, and its row carries the ``(image_size, image_size)`` pixels instead, marked in
    ``image_decoded``. Decoded in a GPU actor, on its one CPU thread, a 10 MB DICOM kept the
    actor from its networks for about 0.1 s, and a block of such files carried gigabytes.
    """
    uris = batch["image_uri"]
    blobs: list[bytes] = [b""] * len(uris)
    decoded = np.zeros(len(uris), dtype=bool)
    errors, kinds, notes = [""] * len(uris), [""] * len(uris), [""] * len(uris)
    for i, uri in enumerate(uris):
        try:
            blobs[i] = read_image_bytes(str(uri))
            notes[i] = scope_note(blobs[i])
            if not gpu_decodable(blobs[i]):
                blobs[i], decoded[i] = decode_image(blobs[i], image_size).tobytes(), True
        except (ImageDecodeError, OSError) as exc:
            blobs[i], errors[i], kinds[i] = b"", str(exc), error_kind(exc)
    data = np.empty(len(uris), dtype=object)
    data[:] = blobs
    return {
        **batch,
        "image_data": data,
        "image_decoded": decoded,
        "scope_note": np.array(notes, dtype=object),
        "error": np.array(errors, dtype=object),
        "error_kind": np.array(kinds, dtype=object),
    }


def _drop_failed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ok = batch["error"] == ""
    return {key: value[ok] for key, value in batch.items() if key not in ("error", "error_kind")}


def _only_normal(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = batch["label_index"] == CLASS_LABELS.index("normal")
    return {key: value[keep] for key, value in batch.items()}


def list_store(uri: str) -> list[LabelledImage]:
    """List and label every image of a labelled store: a Kaggle-layout folder or prefix
    ``{train,val,test}/{NORMAL,PNEUMONIA}``, or a labels manifest (``.csv``/``.parquet``,
    see ``list_labels_manifest``).

    Raises StoreError for a missing store, StoreLayoutError for a store without images, and
    LabelError (naming the file or row) for an image without a label or patient.
    """
    if uri.lower().endswith(LABELS_MANIFEST_SUFFIXES) and stores.exists(uri):
        return list_labels_manifest(uri)
    if not stores.is_dir(uri):
        raise stores.StoreError(
            f"{uri}: image store not found (expected a folder, an s3:// prefix or a labels "
            "manifest .csv/.parquet)"
        )
    images: list[LabelledImage] = []
    root = stores.normalize(uri)
    for entry in stores.list_files(root, IMAGE_SUFFIXES):
        relative = stores.parts_below(root, entry.uri)
        if len(relative) != 3 or relative[0] not in SPLITS:
            continue  # README files, manifests, other folders: not part of the layout
        if relative[1].upper() not in CLASS_DIRS:
            raise LabelError(f"{entry.uri}: class folder must be NORMAL or PNEUMONIA")
        images.append(label_from_path(entry.uri, relative[0], entry.size, entry.mtime_ns))
    if not images:
        raise StoreLayoutError(
            f"{uri}: no images in {{train,val,test}}/{{NORMAL,PNEUMONIA}}/ "
            f"({'/'.join(IMAGE_SUFFIXES)})"
        )
    return images


def check_training_store(images: Sequence[LabelledImage], uri: str) -> None:
    """What training needs of a labelled store: every class among the train and val images,
    and normal and pneumonia test images (StoreLayoutError naming what is missing)."""
    train = Counter(image.label for image in images if image.split in ("train", "val"))
    for label in CLASS_LABELS:
        if not train[label]:
            raise StoreLayoutError(f"{uri}: the training images have no {label} image")
    test = Counter(image.label == "normal" for image in images if image.split == "test")
    for is_normal, folder in ((True, "NORMAL"), (False, "PNEUMONIA")):
        if not test[is_normal]:
            raise StoreLayoutError(f"{uri}: test/{folder} has no .jpeg/.jpg/.png images")


LABELS_MANIFEST_SUFFIXES = (".csv", ".parquet")
LABEL_NAMES = {
    "normal": "normal",
    "bacterial": "bacterial",
    "bacteria": "bacterial",
    "viral": "viral",
    "virus": "viral",
}


def list_labels_manifest(uri: str) -> list[LabelledImage]:
    """The images of a labels manifest: a CSV (with a header) or Parquet table with a column
    ``image_uri`` (or ``uri``, ``path``), ``label`` (normal, bacterial or viral), and optionally
    ``patient_id`` (or ``patient``; without it each image is its own patient) and ``split``
    (train, val or test; without it every row is a test row, what evaluation and adaptation
    read by default). URIs may be any file the decoder reads, DICOM without a suffix too;
    relative ones are relative to the manifest's folder."""
    table = _read_table(uri)
    names = table.schema.names
    uri_column = listing.first_column(names, listing.URI_COLUMNS)
    label_column = listing.first_column(names, ("label", "class"))
    if uri_column is None or label_column is None:
        raise LabelError(
            f"{uri}: a labels manifest needs a column image_uri (or uri, path) and a column "
            f"label; it has {', '.join(names)}"
        )
    patient_column = listing.first_column(names, ("patient_id", "patient"))
    split_column = listing.first_column(names, ("split",))
    rows = table.to_pylist()
    uris = listing.absolute_uris([str(row[uri_column] or "") for row in rows], uri)
    images, seen = [], {}
    for number, (row, image_uri, entry) in enumerate(
        zip(rows, uris, listing.stat_uris(uris), strict=True), start=2
    ):
        label = LABEL_NAMES.get(str(row[label_column] or "").strip().lower())
        split = str(row[split_column] or "").strip().lower() if split_column else "test"
        if not row[uri_column] or label is None or split not in SPLITS:
            raise LabelError(
                f"{uri}, row {number}: needs an image URI, a label of normal, bacterial or "
                f"viral, and a split of train, val or test; got {row!r}"
            )
        if image_uri in seen:
            raise LabelError(f"{uri}, row {number}: {image_uri} is on row {seen[image_uri]} too")
        seen[image_uri] = number
        patient = str(row[patient_column] or "") if patient_column else ""
        images.append(
            LabelledImage(image_uri, split, label, patient or image_uri, entry.size,
                          entry.mtime_ns)
        )  # fmt: skip
    if not images:
        raise StoreLayoutError(f"{uri}: the labels manifest has no rows")
    return images


def _read_table(uri: str) -> pa.Table:
    """A labels manifest as a table; a CSV's columns all as text (patient "007" stays so)."""
    fs, path = stores.resolve(uri)
    if uri.lower().endswith(".parquet"):
        with fs.open_input_file(path) as handle:
            return pq.read_table(handle)
    with fs.open_input_stream(path) as handle:
        # utf-8-sig: a spreadsheet's CSV often starts with a byte-order mark
        header = handle.read(64 * 1024).split(b"\n", 1)[0].decode("utf-8-sig", errors="replace")
    names = next(csv.reader([header]), [])
    convert = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in names}, strings_can_be_null=True
    )
    with fs.open_input_stream(path) as handle:
        return pacsv.read_csv(handle, convert_options=convert)


def fingerprint(images: Sequence[LabelledImage]) -> dict:
    """A stable summary of the data a model was trained on: URIs, sizes and modification
    times, hashed (a file rewritten in place changes it)."""
    digest = hashlib.sha256()
    for image in sorted(images, key=lambda i: i.uri):
        digest.update(f"{image.uri}\t{image.size}\t{image.mtime_ns}\n".encode())
    counts = Counter(image.label for image in images)
    return {
        "images": len(images),
        "bytes": sum(image.size for image in images),
        "class_counts": {label: counts.get(label, 0) for label in CLASS_LABELS},
        "sha256": digest.hexdigest(),
    }


@dataclass
class DecodedSplit:
    """A materialized dataset of decoded images, with what could not be used."""

    dataset: ray.data.Dataset  # columns: image_uri, label_index, image (S, S) uint8
    count: int
    failed: list[tuple[str, str]] = field(default_factory=list)  # (uri, why)


def decode_split(images: Sequence[LabelledImage], image_size: int, seed: int) -> DecodedSplit:
    """Decode a split with Ray Data and keep it in the object store.

    The rows are shuffled (seeded) before decoding so that blocks mix the classes: the training
    iterators only shuffle locally. Decoding once, here, leaves Ray Data no CPU work while the
    trainers run, so workers may take every CPU without starving it.
    """
    rows = [
        {"image_uri": image.uri, "label_index": CLASS_LABELS.index(image.label)} for image in images
    ]
    return decode_rows(rows, image_size, seed)


def decode_uris(uris: Sequence[str], image_size: int, seed: int) -> DecodedSplit:
    """``decode_split`` of unlabelled images (label_index -1)."""
    return decode_rows([{"image_uri": uri, "label_index": -1} for uri in uris], image_size, seed)


def decode_rows(rows: list[dict], image_size: int, seed: int) -> DecodedSplit:
    """``decode_split``'s work on rows of image_uri and label_index."""
    random.Random(seed).shuffle(rows)
    decoded = (
        ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // DECODE_BATCH_SIZE))
        .map_batches(
            decode_batch,
            fn_kwargs={"image_size": image_size},
            batch_size=DECODE_BATCH_SIZE,
            batch_format="numpy",
        )
        .materialize()
    )
    outcome = decoded.select_columns(["image_uri", "error"]).to_pandas()
    failed_rows = outcome[outcome["error"] != ""]
    failed = sorted(zip(failed_rows["image_uri"], failed_rows["error"], strict=True))
    dataset = decoded.map_batches(_drop_failed, batch_format="numpy").materialize()
    return DecodedSplit(dataset, len(rows) - len(failed), failed)


def normal_only(split: DecodedSplit) -> ray.data.Dataset:
    """The normal images of a decoded split (the autoencoder's training data)."""
    return split.dataset.map_batches(_only_normal, batch_format="numpy").materialize()
