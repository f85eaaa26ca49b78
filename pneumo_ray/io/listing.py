"""What a scoring job was given to score, as a stream of Arrow batches in bounded memory.

    --input folder | s3:// prefix  -> a streamed walk (os.scandir; S3 ListObjectsV2 pages)
    --input manifest.parquet|.csv  -> read in batches (S3 Inventory reports work as they are)
    --input manifest.txt           -> one URI per line
        -> batches of (image_uri, image_bytes, image_mtime_ns), PAGE rows at most

A manifest may carry each image's size and modification time (columns ``size`` or
``image_bytes``; ``mtime_ns``, ``image_mtime_ns`` or ``last_modified``); without them its URIs
are looked up in bulk, a page at a time. A URI that does not exist is kept with size -1, so that
it gets a row saying so. Relative URIs are relative to the manifest's folder.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pneumo_ray.errors import ConfigError
from pneumo_ray.io import stores

SCORABLE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm", ".dicom")
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
PAGE = 50_000
URI_COLUMNS = ("image_uri", "uri", "path", "key")
SIZE_COLUMNS = ("image_bytes", "size")
MTIME_COLUMNS = ("image_mtime_ns", "mtime_ns")

LISTING_SCHEMA = pa.schema(
    [("image_uri", pa.string()), ("image_bytes", pa.int64()), ("image_mtime_ns", pa.int64())]
)


def _page(entries: list[stores.FileEntry]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [
            pa.array([e.uri for e in entries], pa.string()),
            pa.array([e.size for e in entries], pa.int64()),
            pa.array([-1 if e.mtime_ns is None else e.mtime_ns for e in entries], pa.int64()),
        ],
        schema=LISTING_SCHEMA,
    )


def _paged(entries: Iterator[stores.FileEntry]) -> Iterator[pa.RecordBatch]:
    page: list[stores.FileEntry] = []
    for entry in entries:
        page.append(entry)
        if len(page) == PAGE:
            yield _page(page)
            page = []
    if page:
        yield _page(page)


def stat_uris(uris: list[str]) -> list[stores.FileEntry]:
    """Sizes and mtimes of explicit URIs, asked for in bulk per filesystem."""
    entries = []
    by_store: dict[str, list[str]] = {}
    for uri in uris:
        by_store.setdefault(uri.split("://", 1)[0] if stores.is_remote(uri) else "", []).append(uri)
    for group in by_store.values():
        fs, _ = stores.resolve(group[0])
        infos = fs.get_file_info([stores.resolve(u)[1] for u in group])
        for uri, info in zip(group, infos, strict=True):
            found = info.type == pafs.FileType.File
            entries.append(
                stores.FileEntry(uri, info.size if found else -1, info.mtime_ns if found else None)
            )
    return entries


def absolute_uris(uris: list[str], manifest: str) -> list[str]:
    base = manifest.rsplit("/", 1)[0]
    return [
        stores.normalize(u if stores.is_remote(u) or os.path.isabs(u) else stores.join(base, u))
        for u in uris
    ]


def first_column(names: list[str], candidates: tuple[str, ...]) -> str | None:
    lower = {name.lower(): name for name in names}
    return next((lower[c] for c in candidates if c in lower), None)


def _manifest_page(table: pa.Table | pa.RecordBatch, manifest: str) -> pa.RecordBatch:
    """A batch of manifest rows -> a listing page (stat only when sizes/mtimes are missing)."""
    names = table.schema.names
    uri_column = first_column(names, URI_COLUMNS) or names[0]
    uris = absolute_uris([u for u in table.column(uri_column).to_pylist() if u], manifest)
    size_column, mtime_column = (
        first_column(names, SIZE_COLUMNS),
        first_column(names, MTIME_COLUMNS),
    )
    modified = first_column(names, ("last_modified", "last_modified_date"))
    if size_column is None or (mtime_column is None and modified is None):
        return _page(stat_uris(uris))
    valid = pc.is_valid(table.column(uri_column))
    sizes = pc.filter(table.column(size_column), valid).cast(pa.int64())
    if mtime_column is not None:
        mtimes = pc.filter(table.column(mtime_column), valid).cast(pa.int64())
    else:
        stamps = pc.filter(table.column(modified), valid)
        if not pa.types.is_timestamp(stamps.type):
            stamps = pc.strptime(stamps, format="%Y-%m-%dT%H:%M:%S.%fZ", unit="ns")
        mtimes = stamps.cast(pa.timestamp("ns")).cast(pa.int64())
    return pa.RecordBatch.from_arrays(
        [pa.array(uris, pa.string()), sizes, pc.fill_null(mtimes, -1)], schema=LISTING_SCHEMA
    )


def _csv_has_header(first_line: str) -> bool:
    row = next(csv.reader([first_line]), [])
    return bool(row) and row[0].strip().lower() in URI_COLUMNS


def _read_manifest(uri: str) -> Iterator[pa.RecordBatch]:
    fs, path = stores.resolve(uri)
    lower = uri.lower()
    if lower.endswith(".parquet"):
        with fs.open_input_file(path) as handle:
            manifest = pq.ParquetFile(handle)
            if first_column(manifest.schema_arrow.names, URI_COLUMNS) is None:
                raise ConfigError(
                    f"{uri}: a Parquet manifest needs a column image_uri, uri or path"
                )
            for batch in manifest.iter_batches(batch_size=PAGE):
                yield _manifest_page(batch, uri)
        return
    with fs.open_input_stream(path) as handle:
        head = handle.read(64 * 1024)
    first_line = head.split(b"\n", 1)[0].decode(errors="replace")
    if lower.endswith(".csv"):
        # A CSV parser, not split(","): a quoted URI may hold commas.
        header = _csv_has_header(first_line)
        options = pacsv.ReadOptions(
            autogenerate_column_names=not header, block_size=8 * 1024 * 1024
        )
        convert = pacsv.ConvertOptions(strings_can_be_null=True)
        with fs.open_input_stream(path) as handle:
            reader = pacsv.open_csv(handle, read_options=options, convert_options=convert)
            for batch in reader:
                yield _manifest_page(batch, uri)
        return
    # .txt: one URI per line, taken whole (commas and all); a header line is skipped.
    with fs.open_input_stream(path) as handle:
        lines = io.TextIOWrapper(handle, encoding="utf-8")
        page: list[str] = []
        for number, line in enumerate(lines):
            line = line.strip()
            if not line or (number == 0 and line.lower() in URI_COLUMNS):
                continue
            page.append(line)
            if len(page) == PAGE:
                yield _page(stat_uris(absolute_uris(page, uri)))
                page = []
        if page:
            yield _page(stat_uris(absolute_uris(page, uri)))


def iter_listing(
    inputs: list[str], report: Callable[[str], None] | None = None
) -> Iterator[pa.RecordBatch]:
    """Every image of the inputs as listing pages; an image named twice comes twice (the
    planner keeps one). ``report`` is told, per folder or prefix, how many files it left out
    for their names (DICOM exports often name files without a suffix)."""
    for uri in inputs:
        if uri.lower().endswith(MANIFEST_SUFFIXES) and not stores.is_dir(uri):
            if not stores.exists(uri):
                raise stores.StoreError(f"{uri}: no such manifest")
            yield from _read_manifest(uri)
        elif stores.is_dir(uri):
            skipped: Counter = Counter()
            yield from _paged(stores.walk_files(uri, SCORABLE_SUFFIXES, skipped))
            if skipped and report is not None:
                report(skipped_line(uri, skipped))
        elif stores.exists(uri):
            yield from _paged(iter(stores.list_files(uri)))
        else:
            raise stores.StoreError(f"{uri}: no such folder, prefix or file")


def skipped_line(uri: str, skipped: Counter) -> str:
    """What a walk of ``uri`` left out, the commonest suffixes first, and how to score them."""
    total = sum(skipped.values())
    kinds = [
        f"{count:,} {suffix or 'without a suffix'}" for suffix, count in skipped.most_common(3)
    ]
    more = ", ..." if len(skipped) > 3 else ""
    return (
        f"{uri}: left out {total:,} file(s) not named as images ({', '.join(kinds)}{more}); "
        f"scored are {' '.join(SCORABLE_SUFFIXES)} in any case; a manifest (--input "
        "list.txt) scores files of any name, DICOM exports without a suffix too"
    )
