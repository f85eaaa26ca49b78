"""Ray Data batch inference: image stores -> all four models -> Parquet, incrementally.

    list inputs (one listing per folder/prefix; manifests) -> drop images already scored
    -> decode in CPU tasks (the training decoder) -> one actor pool running the bundle
    -> Parquet staged under OUT/_staging/<run>/ -> committed to OUT/run=<run>/

Readers never see half a run: staged files live under ``_staging`` (pyarrow and pandas skip
paths starting with ``_``), and a run becomes visible by one directory rename on a local
filesystem. On S3, where no rename is atomic, the commit is the marker ``_runs/<run>.json``
reaching state ``committed``; ``read_scores`` reads only such runs. A killed run leaves only
staged files, which the next run deletes before scoring whatever is still unscored.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pneumo_ray import stores
from pneumo_ray.bundle import read_card
from pneumo_ray.config import ConfigError, parse_worker_range
from pneumo_ray.data import decode_batch, read_batch
from pneumo_ray.predict import DECODE_MODES, ModelActor, plan_actors, select_rows
from pneumo_ray.runtime import check_shared_storage

SCORABLE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm")
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
STAGING = "_staging"
RUNS = "_runs"
DECODE_BATCH = 32
DECODE_CPUS = 0.5
ACTOR_START_TIMEOUT_S = 1800

OUTPUT_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("p_pneumonia", pa.float32()),
        ("pred_binary", pa.string()),
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
        ("model_version", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("error", pa.string()),
        ("image_bytes", pa.int64()),
        ("image_mtime_ns", pa.int64()),
        ("scored_on", pa.string()),  # Ray node id of the model actor: provenance
    ]
)


@dataclass
class ScoreConfig:
    """Everything ``jobs/score.py`` needs; each field is a command-line flag."""

    model: str
    """Model bundle written by jobs/train.py: local folder or s3:// URI (--model)."""
    inputs: list[str]
    """Folders, s3:// prefixes, or manifests (.txt/.csv/.parquet) of image URIs (--input)."""
    output: str
    """Parquet output folder or s3:// prefix (--output)."""
    batch_size: int = 64
    """Images per model batch (--batch-size)."""
    num_workers: tuple[int, int] | None = None
    """Model actors as (min, max), from N or MIN-MAX (an autoscaling pool); None: one per GPU
    up now, else one per node (--num-workers)."""
    use_gpu: bool | None = None
    """Run the models on GPUs, asking the autoscaler for them if none is up; None: when the
    cluster has them now (--use-gpu/--no-use-gpu)."""
    decode: str = "auto"
    """Where JPEGs are decoded: cpu (Ray Data tasks), gpu (nvJPEG in the model actors; the
    tasks only read bytes), auto: gpu when the models run on GPUs (--decode)."""
    rescore: bool = False
    """Score every listed image again, not only new ones (--rescore)."""
    threads_per_actor: int | None = None
    """Torch threads per CPU actor; None: its node's CPUs shared among its actors."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("give at least one --input")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        self.num_workers = parse_worker_range(self.num_workers)
        if self.decode not in DECODE_MODES:
            raise ConfigError(
                f"--decode must be one of {', '.join(DECODE_MODES)}; got {self.decode!r}"
            )


# --- listing ---------------------------------------------------------------------------------


def _read_manifest(uri: str) -> list[str]:
    """Image URIs from a manifest: Parquet (column image_uri, uri or path) or text/CSV (first
    field of each line; a header line is skipped)."""
    if uri.lower().endswith(".parquet"):
        fs, path = stores.resolve(uri)
        table = pq.read_table(path, filesystem=fs)
        for name in ("image_uri", "uri", "path"):
            if name in table.column_names:
                return [str(v) for v in table.column(name).to_pylist() if v]
        raise ConfigError(f"{uri}: a Parquet manifest needs a column image_uri, uri or path")
    lines = stores.read_bytes(uri).decode().splitlines()
    uris = [line.split(",")[0].strip() for line in lines if line.strip()]
    if uris and not uris[0].lower().endswith(SCORABLE_SUFFIXES):
        uris = uris[1:]  # header
    base = uri.rsplit("/", 1)[0]
    return [u if stores.is_remote(u) or os.path.isabs(u) else stores.join(base, u) for u in uris]


def _stat_all(uris: list[str]) -> list[stores.FileEntry]:
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
                stores.FileEntry(
                    stores.normalize(uri),
                    info.size if found else -1,
                    info.mtime_ns if found else None,
                )
            )
    return entries


def list_inputs(inputs: list[str]) -> list[stores.FileEntry]:
    """Every image of the inputs, once, sorted by URI.

    A folder or prefix is one recursive listing (sizes and mtimes come with it; no request per
    object). A manifest's URIs are looked up in one bulk call per filesystem; a URI it names
    that does not exist is kept, with size -1, so that it gets a row saying so.
    """
    seen: dict[str, stores.FileEntry] = {}
    for uri in inputs:
        if uri.lower().endswith(MANIFEST_SUFFIXES) and not stores.is_dir(uri):
            if not stores.exists(uri):
                raise stores.StoreError(f"{uri}: no such manifest")
            entries = _stat_all(_read_manifest(uri))
        elif stores.is_dir(uri):
            entries = stores.list_files(uri, SCORABLE_SUFFIXES)
        elif stores.exists(uri):
            entries = stores.list_files(uri)
        else:
            raise stores.StoreError(f"{uri}: no such folder, prefix or file")
        for entry in entries:
            seen.setdefault(entry.uri, entry)
    return [seen[uri] for uri in sorted(seen)]


# --- the output store ------------------------------------------------------------------------


def _run_marker(output: str, run_id: str) -> str:
    return stores.join(output, RUNS, f"{run_id}.json")


def _read_markers(output: str) -> list[dict]:
    folder = stores.join(output, RUNS)
    if not stores.is_dir(folder):
        return []
    return [json.loads(stores.read_bytes(e.uri)) for e in stores.list_files(folder, (".json",))]


def _move_run(output: str, run_id: str) -> None:
    """Move a run's staged files into OUT/run=<id>/ (one rename where the filesystem has it)."""
    fs, _ = stores.resolve(output)
    staged = stores.join(output, STAGING, run_id)
    final = stores.join(output, f"run={run_id}")
    if not stores.exists(staged):
        return  # already moved
    if isinstance(fs, pafs.LocalFileSystem) and not stores.exists(final):
        os.rename(staged, final)  # atomic: the whole run appears at once
        return
    for entry in stores.list_files(staged):
        name = entry.uri.rsplit("/", 1)[1]
        fs.copy_file(stores.resolve(entry.uri)[1], stores.resolve(stores.join(final, name))[1])
        fs.delete_file(stores.resolve(entry.uri)[1])
    stores.delete_dir(staged)


def recover(output: str) -> None:
    """Finish runs that were being committed; delete staged files of runs that never were."""
    markers = _read_markers(output)
    for marker in markers:
        if marker["state"] == "committing":
            _move_run(output, marker["run_id"])
            marker["state"] = "committed"
            stores.write_bytes(_run_marker(output, marker["run_id"]), json.dumps(marker).encode())
    staging = stores.join(output, STAGING)
    if stores.is_dir(staging):
        stores.delete_dir(staging)


def committed_runs(output: str) -> list[str]:
    return sorted(m["run_id"] for m in _read_markers(output) if m["state"] == "committed")


def read_scores(output: str, columns: list[str] | None = None, latest: bool = False) -> pa.Table:
    """The committed scores under ``output`` (never a half-written run).

    ``latest``: one row per image URI, from its most recent run (after ``--rescore``).
    """
    files = [
        entry.uri
        for run_id in committed_runs(output)
        for entry in stores.list_files(stores.join(output, f"run={run_id}"), (".parquet",))
    ]
    if not files:
        return OUTPUT_SCHEMA.empty_table()
    fs, _ = stores.resolve(output)
    paths = [stores.resolve(uri)[1] for uri in files]
    dataset = pads.dataset(paths, filesystem=fs, format="parquet", schema=OUTPUT_SCHEMA)
    table = dataset.to_table(columns=columns)
    if latest and table.num_rows:
        order = pc.sort_indices(table, [("image_uri", "ascending"), ("scored_at", "descending")])
        table = table.take(order)
        uris = table.column("image_uri").to_numpy(zero_copy_only=False)
        keep = np.ones(len(uris), dtype=bool)
        keep[1:] = uris[1:] != uris[:-1]
        table = table.filter(pa.array(keep))
    return table


def already_scored(output: str) -> set[tuple[str, int, int | None]]:
    """(URI, size, mtime) of every image a committed run holds."""
    table = read_scores(output, columns=["image_uri", "image_bytes", "image_mtime_ns"])
    return set(
        zip(
            table.column("image_uri").to_pylist(),
            table.column("image_bytes").to_pylist(),
            table.column("image_mtime_ns").to_pylist(),
            strict=True,
        )
    )


# --- the model actors ------------------------------------------------------------------------


class BundlePredictor(ModelActor):
    """The scoring job's model actor: all four models of a bundle, rows in the Parquet schema
    (a bad image becomes a row with its error and null scores)."""

    def __init__(self, bundle_uri: str, use_gpu: bool, threads: int, gpu_decode: bool) -> None:
        super().__init__(bundle_uri, "bundle", use_gpu, threads, gpu_decode=gpu_decode)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images, errors = self.images(batch)
        ok = np.array([not e for e in errors], dtype=bool)
        n = len(errors)
        predictions = self.bundle.predict(select_rows(images, ok)) if ok.any() else {}
        index = np.flatnonzero(ok)

        def column(name: str, arrow_type: pa.DataType) -> pa.Array:
            values: list = [None] * n
            if predictions:
                for row, value in zip(index, predictions[name], strict=True):
                    values[row] = value.tolist() if isinstance(value, np.ndarray) else value
            return pa.array(values, type=arrow_type)

        now = dt.datetime.now(dt.UTC)
        columns = {
            "image_uri": pa.array(batch["image_uri"].tolist(), pa.string()),
            "model_version": pa.array([self.bundle.model_version] * n, pa.string()),
            "scored_on": pa.array([self.node] * n, pa.string()),
            "scored_at": pa.array([now] * n, OUTPUT_SCHEMA.field("scored_at").type),
            "error": pa.array([e or None for e in errors], pa.string()),
            "image_bytes": pa.array(batch["image_bytes"].tolist(), pa.int64()),
            "image_mtime_ns": pa.array(
                [None if m is None or m < 0 else int(m) for m in batch["image_mtime_ns"]],
                pa.int64(),
            ),
        }
        for name in OUTPUT_SCHEMA.names:
            if name not in columns:
                columns[name] = column(name, OUTPUT_SCHEMA.field(name).type)
        return pa.table([columns[name] for name in OUTPUT_SCHEMA.names], schema=OUTPUT_SCHEMA)


# --- the job ---------------------------------------------------------------------------------


@dataclass
class ScoreSummary:
    output: str
    listed: int = 0
    skipped: int = 0
    scored: int = 0
    failed: int = 0
    seconds: float = 0.0
    run_id: str | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (
            f"images listed: {self.listed}\n"
            f"already scored (skipped): {self.skipped}\n"
            f"scored: {self.scored}\n"
            f"failed (row with error): {self.failed}\n"
            f"throughput: {self.images_per_s:.1f} images/s over {self.seconds:.1f}s\n"
            f"output: {self.output}"
            + (f" (run {self.run_id})" if self.run_id else " (nothing new to score)")
        )


def log(message: str) -> None:
    print(f"[pneumo_ray.score] {message}", flush=True)


def run_scoring(config: ScoreConfig) -> ScoreSummary:
    """Score the inputs with the bundle and commit the new rows as one run under the output."""
    card = read_card(config.model)  # fail fast, before any listing, on a wrong --model
    image_size = int(card["image_size"])
    summary = ScoreSummary(output=config.output)
    nodes = check_shared_storage(
        read=[("--model", config.model), *(("--input", uri) for uri in config.inputs)],
        write=[("--output", config.output)],  # the staging folder lives under it
    )
    if nodes > 1:
        log(f"shared storage: every local location is visible from all {nodes} nodes")
    recover(config.output)

    log(f"listing {', '.join(config.inputs)}")
    entries = list_inputs(config.inputs)
    summary.listed = len(entries)
    if not config.rescore:
        done = already_scored(config.output)
        todo = [e for e in entries if (e.uri, e.size, e.mtime_ns) not in done]
    else:
        todo = entries
    summary.skipped = len(entries) - len(todo)
    log(f"{summary.listed} images listed, {summary.skipped} already scored, {len(todo)} to score")
    if not todo:
        return summary

    plan = plan_actors(config.num_workers, config.use_gpu, config.threads_per_actor)
    gpu_decode = config.decode == "gpu" or (config.decode == "auto" and plan.use_gpu)
    log(
        f"{plan.describe()}, JPEG decode on {'GPU (nvJPEG)' if gpu_decode else 'CPU'}, "
        f"model {card.get('model_version')}"
    )
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    staged = stores.join(config.output, STAGING, run_id)
    rows = [
        {"image_uri": e.uri, "image_bytes": e.size, "image_mtime_ns": e.mtime_ns or -1}
        for e in todo
    ]
    started = time.perf_counter()
    dataset = (
        ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / DECODE_BATCH)))
        .map_batches(
            read_batch if gpu_decode else decode_batch,
            fn_kwargs={} if gpu_decode else {"image_size": image_size},
            batch_size=DECODE_BATCH,
            batch_format="numpy",
            # Half a CPU each: decoding is light next to the models, and a resource shape
            # unlike the actors' keeps Ray Data from fusing it into them (decode stays in
            # parallel CPU tasks, the actors only run models). With GPU decode these tasks
            # only read bytes.
            num_cpus=DECODE_CPUS,
        )
        .map_batches(
            BundlePredictor,
            fn_constructor_kwargs={
                "bundle_uri": config.model,
                "use_gpu": plan.use_gpu,
                "threads": plan.threads,
                "gpu_decode": gpu_decode,
            },
            batch_size=config.batch_size,
            batch_format="numpy",
            **plan.map_kwargs(),
        )
    )
    # Start scoring once every model actor has its bundle loaded, so the work spreads over all
    # of them (and nodes); generous, since an autoscaler may first have to start GPU nodes.
    ray.data.DataContext.get_current().wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    fs, staged_path = stores.resolve(staged)
    dataset.write_parquet(staged_path, filesystem=fs)
    summary.seconds = time.perf_counter() - started

    written = pads.dataset(staged_path, filesystem=fs, format="parquet").to_table(
        columns=["image_uri", "error"]
    )
    uris = written.column("image_uri").to_pylist()
    if sorted(uris) != [r["image_uri"] for r in rows]:
        raise RuntimeError(
            f"run {run_id}: wrote {len(uris)} rows for {len(rows)} images; not committing"
        )
    errors = written.column("error").to_pylist()
    summary.errors = sorted((u, e) for u, e in zip(uris, errors, strict=True) if e)
    summary.failed = len(summary.errors)
    summary.scored = len(uris) - summary.failed

    marker = {
        "run_id": run_id,
        "state": "committing",
        "rows": len(uris),
        "failed": summary.failed,
        "model_version": card.get("model_version"),
        "inputs": config.inputs,
        "rescore": config.rescore,
        "decode": "gpu" if gpu_decode else "cpu",
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    stores.write_bytes(_run_marker(config.output, run_id), json.dumps(marker).encode())
    _move_run(config.output, run_id)
    marker["state"] = "committed"
    stores.write_bytes(_run_marker(config.output, run_id), json.dumps(marker).encode())
    summary.run_id = run_id
    return summary
