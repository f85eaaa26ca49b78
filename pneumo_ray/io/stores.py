"""Where data lives: local paths and ``s3://`` URIs, through ``pyarrow.fs``.

Every read and write of the package goes through here, so that a local folder and an S3 prefix
behave the same. S3 uses the standard AWS settings: the credentials chain, ``AWS_REGION`` and
``AWS_ENDPOINT_URL`` (for S3-compatible stores such as MinIO).
"""

from __future__ import annotations

import calendar
import functools
import json
import math
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs


class StoreError(FileNotFoundError):
    """A store, folder or file that is missing or cannot be read."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a listing: its URI and size in bytes."""

    uri: str
    size: int
    mtime_ns: int | None = None


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


@functools.lru_cache(maxsize=16)
def _filesystem_for(scheme: str, bucket: str) -> pafs.FileSystem:
    if scheme == "s3":
        # from_uri reads the credentials chain and the region; AWS_ENDPOINT_URL is honoured by
        # recent pyarrow, but older releases ignore it, so pass it explicitly when set.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict = {}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs)
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    return fs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or a URI."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    return _filesystem_for(scheme, bucket), rest.rstrip("/")


def normalize(uri: str) -> str:
    """The one form of a location, given once where it enters the package (a flag, a public
    function): a local path absolute, with ``~``, ``./``, ``..`` and symbolic links resolved;
    a URI (``s3://...``) as given, less a trailing slash. Below that edge paths are only
    joined, never compared as strings of different forms."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if is_remote(uri):
        return uri.rstrip("/")
    return os.path.realpath(os.path.expanduser(uri))


def normalize_optional(uri: str | None) -> str | None:
    """``normalize``, for a location that may be unset."""
    return None if uri is None else normalize(uri)


def parts_below(root: str, uri: str) -> list[str]:
    """The path components of ``uri`` below the folder ``root`` (``a/b/c.jpeg`` -> ``["a", "b",
    "c.jpeg"]``), compared component by component, never by string length; ValueError if
    ``uri`` is not below ``root``. Both in the same form: ``uri`` from a listing of ``root``."""
    base = [part for part in root.split("/") if part]
    below = [part for part in uri.split("/") if part]
    if below[: len(base)] != base:
        raise ValueError(f"{uri} is not below {root}")
    return below[len(base) :]


def _uri_for(base_uri: str, path: str) -> str:
    """URI of ``path`` (as the filesystem names it) in the same store as ``base_uri``."""
    if is_remote(base_uri):
        return f"{base_uri.split('://', 1)[0]}://{path}"
    return path


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` (local paths too)."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[FileEntry]:
    """Every file under ``uri``, recursively, with sizes from the listing itself.

    One recursive listing: on S3 that is paged ListObjectsV2 calls, never a HEAD per object.
    """
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise StoreError(f"{uri}: no such folder or prefix")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    entries = []
    for item in infos:
        if item.type != pafs.FileType.File:
            continue
        if suffixes and not item.path.lower().endswith(suffixes):
            continue
        entries.append(FileEntry(_uri_for(uri, item.path), item.size, item.mtime_ns))
    entries.sort(key=lambda e: e.uri)
    return entries


def walk_files(
    uri: str, suffixes: tuple[str, ...] | None = None, skipped: Counter | None = None
) -> Iterator[FileEntry]:
    """Every file under the folder or prefix ``uri`` whose name ends in one of ``suffixes``
    (any case; every file without them), streamed: memory stays flat however many files there
    are (a local walk with ``os.scandir``; on S3, ListObjectsV2 pages of 1,000). Not sorted. A
    symlink counts as the file it points to; a broken one gets size -1. ``skipped`` counts the
    files left out by their suffix ("" for none); hidden files are not counted."""
    if is_remote(uri):
        yield from _walk_s3(uri, suffixes, skipped)
        return
    stack = [normalize(uri)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif _wanted(entry.name, suffixes, skipped):
                    try:
                        stat = entry.stat()
                        yield FileEntry(entry.path, stat.st_size, stat.st_mtime_ns)
                    except FileNotFoundError:
                        yield FileEntry(entry.path, -1, None)


def _wanted(name: str, suffixes: tuple[str, ...] | None, skipped: Counter | None) -> bool:
    """Whether a file ``name`` ends in one of ``suffixes``; if not, counted in ``skipped``."""
    if not suffixes or name.lower().endswith(suffixes):
        return True
    if skipped is not None and name and not name.startswith("."):  # not a folder marker
        skipped[os.path.splitext(name)[1].lower()] += 1
    return False


def _walk_s3(
    uri: str, suffixes: tuple[str, ...] | None, skipped: Counter | None
) -> Iterator[FileEntry]:
    client, bucket, key = s3_client(uri)
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{key}/" if key else ""
    )
    for page in pages:
        for item in page.get("Contents", []):
            if not _wanted(item["Key"].rsplit("/", 1)[-1], suffixes, skipped):
                continue
            modified = item["LastModified"]  # exact integer ns, as pyarrow's listing gives
            mtime_ns = (
                calendar.timegm(modified.utctimetuple()) * 10**6 + modified.microsecond
            ) * 1000
            yield FileEntry(f"s3://{bucket}/{item['Key']}", item["Size"], mtime_ns)


def s3_client(uri: str):
    """(boto3 S3 client, bucket, key) for an ``s3://`` URI: for what pyarrow.fs cannot do
    (paged listings, conditional writes). Same settings: AWS_ENDPOINT_URL, AWS_REGION, the
    credentials chain."""
    import boto3

    bucket, _, key = uri.split("://", 1)[1].partition("/")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    client = boto3.client("s3", endpoint_url=endpoint or None, region_name=region or None)
    return client, bucket, key.rstrip("/")


def precondition_failed(exc: Exception) -> bool:
    """Whether a botocore ClientError is S3's answer to a failed If-Match/If-None-Match."""
    code = getattr(exc, "response", {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412")


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as exc:
        raise StoreError(f"{uri}: no such file") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file, making parent folders as needed."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path))
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def json_bytes(payload) -> bytes:
    """Strict JSON: NaN and infinities (an AUC on a one-class split) become null, which every
    JSON parser reads; Python's default would write the non-standard ``NaN``."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [clean(item) for item in value]
        return value

    return json.dumps(clean(payload), indent=2, allow_nan=False).encode()


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder's contents to ``uri`` (local or remote)."""
    fs, path = resolve(uri)
    fs.create_dir(path)
    pafs.copy_files(local_dir, path, destination_filesystem=fs)


def download_dir(uri: str, local_dir: str) -> None:
    """Copy the contents of ``uri`` into a local folder."""
    fs, path = resolve(uri)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(path, local_dir, source_filesystem=fs)


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
