"""The scoring output: committed parts, the history the next night skips, and the output lock.

    OUT/run=<run>/part-00000.parquet          committed rows (readers: read_scores, pandas)
    OUT/_runs/<run>/part-00000.committed      a part's commit marker (JSON)
    OUT/_runs/<run>/part-00000.committing     a part caught between staging and commit
    OUT/_runs/<run>/run.json                  the run's summary, once it ends
    OUT/_staging/<run>/                       staged parts and the run's work list
    OUT/_lock.json                            who is scoring into OUT now
    OUT/_reports/<run>/                       the run's summary.json, report.html, heatmaps/

A run commits a part every ``--commit-every`` images: the part is written under ``_staging``,
its ``.committing`` marker is written, the file is moved into ``run=<run>/`` (one atomic rename
on a local filesystem; copy and delete on S3) and the ``.committed`` marker is written. A part
is committed when, and only when, its ``.committed`` marker exists: ``read_scores`` reads only
those, so a reader never sees half a part, even on S3 where nothing is renamed atomically.
``recover`` finishes a part caught between the two markers and deletes staged files of runs
that are gone. Finding what is committed is one listing of ``_runs/``: no read per marker.

Runs written before parts existed (``_runs/<run>.json`` in state ``committed``) are read too.

One job at a time scores into an output: ``OutputLock`` refuses a second one with one line. On
a local filesystem the lock is an ``flock``, which the kernel drops when its process dies. On
S3 it is an object created with ``If-None-Match: *``, renewed by its holder, and taken over
(``If-Match`` on the stale version) once it has not been renewed for ``ttl_s``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pneumo_ray import faults
from pneumo_ray.io import stores

STAGING = "_staging"
RUNS = "_runs"
REPORTS = "_reports"
LOCK = "_lock.json"
COMMITTED = ".committed"
COMMITTING = ".committing"
LOCK_TTL_S = 600.0

OUTPUT_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("p_pneumonia", pa.float32()),  # the bundle's (calibrated; card: models.binary.score)
        ("pred_binary", pa.string()),
        ("p_pneumonia_cnn", pa.float32()),  # the binary network's alone, calibrated
        ("p_normal", pa.float32()),
        ("p_bacterial", pa.float32()),
        ("p_viral", pa.float32()),
        ("pred_class", pa.string()),
        ("knn_label", pa.string()),
        ("knn_neighbors", pa.list_(pa.string())),
        ("knn_distances", pa.list_(pa.float32())),
        ("anomaly_score", pa.float32()),
        ("is_anomaly", pa.bool_()),
        ("reconstruction_mse", pa.float32()),  # the design's anomaly score, always kept
        ("heatmap_uri", pa.string()),  # Grad-CAM overlay PNG (--heatmaps); null: none made
        # the scope check (issue 33): out of scope, the calls above are null
        ("in_scope", pa.bool_()),  # null: the row has an error
        ("scope_score", pa.float32()),  # <= 1 in scope; null: the bundle has no scope check
        ("scope_reason", pa.string()),  # why not in scope ("kind: details"); null when in scope
        # image statistics at the model's input size, for drift checks (pneumo_ray.monitoring.drift)
        ("image_mean", pa.float32()),
        ("image_contrast", pa.float32()),
        ("image_sharpness", pa.float32()),
        ("model_version", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("error", pa.string()),
        ("error_kind", pa.string()),  # "permanent" or "transient" (retried next run); null: ok
        ("image_bytes", pa.int64()),
        ("image_mtime_ns", pa.int64()),
        ("scored_on", pa.string()),  # Ray node id of the model actor: provenance
    ]
)


class OutputBusyError(stores.StoreError):
    """Another scoring job holds the output's lock."""


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_run_id() -> str:
    return now_utc().strftime("%Y%m%dT%H%M%SZ") + "-" + os.urandom(3).hex()


def part_name(part: int) -> str:
    return f"part-{part:05d}"


# --- committing parts ------------------------------------------------------------------------


def _marker(output: str, run_id: str, part: int, state: str) -> str:
    return stores.join(output, RUNS, run_id, part_name(part) + state)


def _staged_file(output: str, run_id: str, part: int) -> str:
    return stores.join(output, STAGING, run_id, part_name(part) + ".parquet")


def _final_file(output: str, run_id: str, part: int) -> str:
    return stores.join(output, f"run={run_id}", part_name(part) + ".parquet")


def _move(source: str, target: str) -> None:
    fs, source_path = stores.resolve(source)
    target_path = stores.resolve(target)[1]
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(target_path), exist_ok=True)
        os.rename(source_path, target_path)  # atomic: the part appears whole
    else:
        fs.copy_file(source_path, target_path)
        fs.delete_file(source_path)


def commit_part(output: str, run_id: str, part: int, table: pa.Table, info: dict) -> None:
    """Stage ``table`` as part ``part`` of run ``run_id`` and commit it (see the module doc)."""
    staged = _staged_file(output, run_id, part)
    fs, path = stores.resolve(staged)
    fs.create_dir(os.path.dirname(path))
    pq.write_table(table, path, filesystem=fs)
    marker = {"run_id": run_id, "part": part, "rows": table.num_rows, **info}
    stores.write_bytes(_marker(output, run_id, part, COMMITTING), json.dumps(marker).encode())
    faults.in_commit(part + 1)
    _finish_commit(output, run_id, part, marker)


def _finish_commit(output: str, run_id: str, part: int, marker: dict) -> None:
    staged, final = _staged_file(output, run_id, part), _final_file(output, run_id, part)
    if stores.exists(staged):
        _move(staged, final)
    if stores.exists(final):
        marker = {**marker, "committed_at": now_utc().isoformat()}
        stores.write_bytes(_marker(output, run_id, part, COMMITTED), json.dumps(marker).encode())
    fs, path = stores.resolve(_marker(output, run_id, part, COMMITTING))
    fs.delete_file(path)


@dataclass(frozen=True)
class CommittedPart:
    run_id: str
    part: int | None  # None: a whole run written before parts existed
    file: str | None  # None: every Parquet file under run=<run_id>/


def _markers(output: str) -> list[stores.FileEntry]:
    folder = stores.join(output, RUNS)
    return stores.list_files(folder) if stores.is_dir(folder) else []


def _parse_marker(uri: str) -> tuple[str, int | None, str] | None:
    """(run id, part, state) from a marker's path, read from its last path components
    (``_runs/<run>/part-00003.committed``, ``_runs/<run>.json``), so the form in which the
    output was named cannot matter; None for other files (run.json)."""
    *_, grandparent, parent, name = ["", "", *uri.split("/")]
    if parent == RUNS and name.endswith(".json"):
        return name[: -len(".json")], None, "legacy"
    if grandparent == RUNS and name.startswith("part-"):
        stem, _, state = name.partition(".")
        return parent, int(stem[len("part-") :]), "." + state
    return None


def committed_parts(output: str) -> list[CommittedPart]:
    """Every committed part under ``output``, from one listing of its markers."""
    output = stores.normalize(output)
    parts = []
    for entry in _markers(output):
        parsed = _parse_marker(entry.uri)
        if parsed is None:
            continue
        run_id, part, state = parsed
        if state == COMMITTED:
            parts.append(CommittedPart(run_id, part, _final_file(output, run_id, part)))
        elif state == "legacy" and json.loads(stores.read_bytes(entry.uri))["state"] == "committed":
            parts.append(CommittedPart(run_id, None, None))
    return sorted(parts, key=lambda p: (p.run_id, p.part or 0))


def committed_runs(output: str) -> list[str]:
    """Ids of the runs with at least one committed part, oldest first."""
    return sorted({part.run_id for part in committed_parts(output)})


def committed_files(output: str) -> list[str]:
    """URIs of the Parquet files of every committed part."""
    files = []
    for part in committed_parts(output):
        if part.file is not None:
            files.append(part.file)
        else:
            folder = stores.join(output, f"run={part.run_id}")
            files.extend(e.uri for e in stores.list_files(folder, (".parquet",)))
    return files


def history_dataset(output: str) -> pads.Dataset | None:
    """The committed rows as one Arrow dataset (read lazily, in batches), or None."""
    files = committed_files(output)
    if not files:
        return None
    fs, _ = stores.resolve(output)
    paths = [stores.resolve(uri)[1] for uri in files]
    return pads.dataset(paths, filesystem=fs, format="parquet", schema=OUTPUT_SCHEMA)


def read_scores(output: str, columns: list[str] | None = None, latest: bool = False) -> pa.Table:
    """The committed scores under ``output`` (never a part that is not committed).

    ``latest``: one row per image URI, from its most recent scoring (after a new model, a
    retried error or ``--rescore``). ``output`` in any form (relative, ``./``, a symlinked
    folder) reads the same rows.
    """
    dataset = history_dataset(stores.normalize(output))
    if dataset is None:
        empty = OUTPUT_SCHEMA.empty_table()
        return empty if columns is None else empty.select(columns)
    table = dataset.to_table(columns=columns)
    if latest and table.num_rows:
        order = pc.sort_indices(table, [("image_uri", "ascending"), ("scored_at", "descending")])
        table = table.take(order)
        uris = table.column("image_uri").to_numpy(zero_copy_only=False)
        keep = np.ones(len(uris), dtype=bool)
        keep[1:] = uris[1:] != uris[:-1]
        table = table.filter(pa.array(keep))
    return table


def recover(output: str, keep_run: str | None = None) -> list[str]:
    """Finish parts caught between staging and commit; delete every other run's staged files
    (call it holding the output's lock: then no other run is alive). Returns what it did."""
    output = stores.normalize(output)
    done = []
    for entry in _markers(output):
        parsed = _parse_marker(entry.uri)
        if parsed and parsed[2] == COMMITTING:
            run_id, part, _ = parsed
            _finish_commit(output, run_id, part, json.loads(stores.read_bytes(entry.uri)))
            done.append(f"finished the commit of run {run_id} {part_name(part)}")
    staging = stores.join(output, STAGING)
    if stores.is_dir(staging):
        fs, path = stores.resolve(staging)
        for info in fs.get_file_info(pafs.FileSelector(path)):
            if info.base_name != keep_run:
                stores.delete_dir(stores.join(staging, info.base_name))
                done.append(f"deleted the staged files of run {info.base_name}, which died")
    return done


def write_run_summary(output: str, run_id: str, summary: dict) -> None:
    stores.write_bytes(stores.join(output, RUNS, run_id, "run.json"), stores.json_bytes(summary))


# --- one job per output ----------------------------------------------------------------------


class OutputLock:
    """Held by the one scoring job writing into ``output``; a second one gets OutputBusyError.

    ``ttl_s`` (S3 only): a lock its holder has not renewed for this long belongs to a job that
    died, and is taken over. The holder renews it every ``ttl_s / 4``.
    """

    def __init__(self, output: str, run_id: str, ttl_s: float = LOCK_TTL_S) -> None:
        self.output, self.run_id, self.ttl_s = stores.normalize(output), run_id, ttl_s
        self.uri = stores.join(self.output, LOCK)
        self.holder = {
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": now_utc().isoformat(timespec="seconds"),
        }
        self.took_over: dict | None = None  # the stale holder replaced, if any
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost = False

    def _busy(self, holder: dict) -> OutputBusyError:
        return OutputBusyError(
            f"--output {self.output} is being scored by run {holder.get('run_id')} (pid "
            f"{holder.get('pid')} on {holder.get('host')}, since {holder.get('started_at')}); "
            "two jobs on one output could score images twice: wait for it to end, or use "
            "another --output"
        )

    def acquire(self) -> OutputLock:
        if stores.is_remote(self.uri):
            self._acquire_s3()
        else:
            self._acquire_local()
        return self

    def _acquire_local(self) -> None:
        import fcntl

        path = stores.resolve(self.uri)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(path) as current:
                text = current.read()
            os.close(fd)
            raise self._busy(json.loads(text) if text.strip() else {}) from None
        # Never unlinked: a process waiting on the old inode would hold a lock nobody sees.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.holder).encode(), 0)
        self._fd = fd

    def _acquire_s3(self) -> None:
        client, bucket, key = stores.s3_client(self.uri)
        body = json.dumps(self.holder).encode()
        try:
            self._etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")[
                "ETag"
            ]
        except client.exceptions.ClientError as exc:
            if not stores.precondition_failed(exc):
                raise
            current = client.get_object(Bucket=bucket, Key=key)
            holder = json.loads(current["Body"].read() or b"{}")
            age = (now_utc() - current["LastModified"]).total_seconds()
            if age < self.ttl_s:
                raise self._busy(holder) from None
            try:  # stale: take it over, unless another job just did
                self._etag = client.put_object(
                    Bucket=bucket, Key=key, Body=body, IfMatch=current["ETag"]
                )["ETag"]
            except client.exceptions.ClientError as again:
                if stores.precondition_failed(again):
                    raise self._busy(holder) from None
                raise
            self.took_over = {**holder, "last_renewed_s_ago": round(age)}
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="output-lock")
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            if not self._renew_once():
                return

    def _renew_once(self) -> bool:
        """Rewrite the lock if it is still ours; False (and ``lost``) if it was taken over."""
        client, bucket, key = stores.s3_client(self.uri)
        body = json.dumps(self.holder).encode()
        try:
            reply = client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=self._etag)
        except client.exceptions.ClientError as exc:
            if not stores.precondition_failed(exc):
                return True  # a failed renewal is tried again at the next tick
            self.lost = True  # someone took it over: stop committing
            return False
        self._etag = reply["ETag"]
        return True

    def check(self) -> None:
        """Raise if the lock was taken over (S3: this job stalled for longer than ttl_s)."""
        if self.lost:
            raise OutputBusyError(
                f"--output {self.output}: this run's lock was taken over by another job after "
                f"{self.ttl_s:.0f}s without renewal; stopping before committing more"
            )

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        elif self._etag is not None and not self.lost:
            client, bucket, key = stores.s3_client(self.uri)
            try:
                client.delete_object(Bucket=bucket, Key=key, IfMatch=self._etag)
            except client.exceptions.ClientError as exc:
                if not stores.precondition_failed(exc):
                    raise
            self._etag = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
