"""Ray Data batch inference: image stores -> all four models -> Parquet, in committed parts.

    lock OUT -> finish or clear what a dead run left -> plan: stream the listing to Parquet,
    anti-join it with the committed history in DuckDB (bounded memory, spills) -> the work list
    under OUT/_staging/<run>/todo/ -> Ray Data: read it, decode in CPU tasks (the training
    decoder), one actor pool running the bundle -> the driver commits a part every
    --commit-every rows (pneumo_ray.scoring.ledger)

The driver never holds the store, the history or the work list, but its memory is not yet flat:
it grew from 635 MiB at 1,000,000 images to 854 MiB at 3,000,000 (README, Benchmarks). A job
killed after hours keeps every committed part, and the next run scores only the rest. An image
is done when a committed row has its URI, size, mtime and the bundle's model_version (a new
model rescores the store; ``--only-new`` ignores the version), unless that row's error was
transient (a read that failed after its retries): then it is scored again on the next run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import resource
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pneumo_ray import faults
from pneumo_ray.config import HEATMAP_MODES, ConfigError, parse_worker_range
from pneumo_ray.console import Progress
from pneumo_ray.io import stores
from pneumo_ray.io.data import PERMANENT, TRANSIENT, decode_batch, read_batch
from pneumo_ray.io.labels import BINARY_LABELS
from pneumo_ray.io.listing import LISTING_SCHEMA, iter_listing
from pneumo_ray.models.bundle import read_card, read_drift_reference, withhold_out_of_scope
from pneumo_ray.models.predict import (
    ACTORS_PER_GPU,
    DECODE_MODES,
    ModelActor,
    plan_actors,
    select_rows,
    usable_image_stats,
)
from pneumo_ray.monitoring.drift import RunProfile
from pneumo_ray.runtime import check_shared_storage
from pneumo_ray.scoring.ledger import (
    LOCK_TTL_S,
    OUTPUT_SCHEMA,
    REPORTS,
    STAGING,
    OutputLock,
    commit_part,
    committed_runs,
    history_dataset,
    new_run_id,
    read_scores,
    recover,
    write_run_summary,
)

__all__ = ["OUTPUT_SCHEMA", "ScoreConfig", "committed_runs", "read_scores", "recover"]

# Rows per decode block. Each block is one decode task, and the stream's one repartitioning
# task cuts blocks at a bounded rate (the device check saw 17-31 blocks/s on a 16-CPU GPU node
# with blocks of 32 rows: 560-1,000 images/s, whatever the decode CPUs could do), so large work
# lists get blocks of up to a GPU batch; small ones at least one block per decode slot.
DECODE_BLOCK_MIN, DECODE_BLOCK_MAX = 32, 256
# Images per model batch (--batch-size): a CPU actor runs its networks in chunks of
# models.outputs.CPU_CHUNK whatever the batch; a GPU actor gets larger batches (fewer kernel
# launches and host round trips per image). On an H200, 512 scored no faster than 256 (issue
# 22's device check, where the stream feeding the actors was the limit).
CPU_BATCH, GPU_BATCH = 64, 256
DECODE_CPUS = 0.5
ACTOR_START_TIMEOUT_S = 1800
TODO_FILE_ROWS = 100_000
PLAN_MEMORY = "256MB"  # DuckDB's cap; beyond it the anti-join spills to the driver's temp dir
MAX_ERRORS_KEPT = 100
DRIFT_EXIT_CODE = 3  # --fail-on-drift: distinct from 1 (an error) and 2 (a bad flag)


LABELLING_LIST = "labelling_list.csv"  # a drifting store's, in the run's report folder
LABELLING_IMAGES = 50


@dataclass
class ScoreConfig:
    """Everything ``jobs/score.py`` needs; each field is a command-line flag."""

    model: str
    """Model bundle written by jobs/train.py: local folder or s3:// URI (--model)."""
    inputs: list[str]
    """Folders, s3:// prefixes, or manifests (.txt/.csv/.parquet) of image URIs (--input)."""
    output: str
    """Parquet output folder or s3:// prefix (--output)."""
    batch_size: int | None = None
    """Images per model batch; None: CPU_BATCH on CPU actors, GPU_BATCH on GPU actors
    (--batch-size)."""
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
    only_new: bool = False
    """Skip an image scored by any model before, not only by this bundle's model_version
    (--only-new)."""
    commit_every: int = 10_000
    """Images per committed part: a killed run loses at most one part's work (--commit-every)."""
    lock_ttl_s: float = LOCK_TTL_S
    """S3 outputs: a lock not renewed for this long belongs to a job that died and is taken
    over (a local output's lock ends with its job) (--lock-ttl)."""
    threads_per_actor: int | None = None
    """Torch threads per CPU actor; None: its node's CPUs shared among its actors."""
    actors_per_gpu: int = ACTORS_PER_GPU
    """GPU scoring: model actors sharing each GPU, 1/N of it each (--actors-per-gpu)."""
    heatmaps: str = "flagged"
    """Grad-CAM overlays for: flagged images (binary call pneumonia or anomaly), all, or none
    (--heatmaps)."""
    fail_on_drift: bool = False
    """Exit with DRIFT_EXIT_CODE when the run's report finds drift (--fail-on-drift)."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("give at least one --input")
        # One form for every location from here on: the ledger, the anti-join and the lock
        # see the same output whether it was typed relative, with ./, a trailing slash or
        # through a symlinked folder.
        self.model, self.output = stores.normalize(self.model), stores.normalize(self.output)
        self.inputs = [stores.normalize(uri) for uri in self.inputs]
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.commit_every < 1:
            raise ConfigError(f"--commit-every must be at least 1, got {self.commit_every}")
        if self.lock_ttl_s <= 0:
            raise ConfigError(f"--lock-ttl must be positive seconds, got {self.lock_ttl_s}")
        if self.rescore and self.only_new:
            raise ConfigError("--rescore and --only-new contradict each other: give one")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise ConfigError(
                f"--threads-per-actor must be at least 1, got {self.threads_per_actor}"
            )
        if self.actors_per_gpu < 1:
            raise ConfigError(f"--actors-per-gpu must be at least 1, got {self.actors_per_gpu}")
        self.num_workers = parse_worker_range(self.num_workers)
        if self.heatmaps not in HEATMAP_MODES:
            raise ConfigError(
                f"--heatmaps must be one of {', '.join(HEATMAP_MODES)}; got {self.heatmaps!r}"
            )
        if self.decode not in DECODE_MODES:
            raise ConfigError(
                f"--decode must be one of {', '.join(DECODE_MODES)}; got {self.decode!r}"
            )


# --- the model actors ------------------------------------------------------------------------


class BundlePredictor(ModelActor):
    """The scoring job's model actor: all four models of a bundle, rows in the Parquet schema
    (a bad image becomes a row with its error, its kind and null scores)."""

    def __init__(
        self,
        bundle_uri: str,
        use_gpu: bool,
        threads: int,
        gpu_decode: bool,
        heatmaps: str = "none",
        heatmap_dir: str | None = None,
    ) -> None:
        super().__init__(bundle_uri, "bundle", use_gpu, threads, gpu_decode=gpu_decode)
        self.heatmaps, self.heatmap_dir = heatmaps, heatmap_dir

    def _heatmap_uris(self, images, uris: list[str], predictions: dict) -> list[str | None]:
        """Write the Grad-CAM overlays of the rows --heatmaps asks for; their URIs (None where
        no overlay was made)."""
        from pneumo_ray.scoring.heatmaps import explain, heatmap_name

        n = len(uris)
        if self.heatmaps == "none" or not n:
            return [None] * n
        wanted = np.asarray(predictions["in_scope"], dtype=bool).copy()  # no map out of scope
        if self.heatmaps == "flagged":
            wanted &= (predictions["pred_binary"] == BINARY_LABELS[1]) | predictions["is_anomaly"]
        result: list[str | None] = [None] * n
        if not wanted.any():
            return result
        chosen = {name: np.asarray(value)[wanted] for name, value in predictions.items()}
        pngs = explain(self.bundle, select_rows(images, wanted), chosen)
        for row, png in zip(np.flatnonzero(wanted), pngs, strict=True):
            uri = stores.join(self.heatmap_dir, heatmap_name(uris[row]))
            stores.write_bytes(uri, png)
            result[row] = uri
        return result

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        read_errors = [str(e) for e in batch["error"]]
        images, errors = self.images(batch)
        # An error the read task gave has its kind; one the actor's decoder added is permanent.
        kinds = [
            None if not error else str(kind) if read_error else PERMANENT
            for error, read_error, kind in zip(
                errors, read_errors, batch["error_kind"], strict=True
            )
        ]
        ok = np.array([not e for e in errors], dtype=bool)
        n = len(errors)
        predictions = {}
        if ok.any():
            usable = select_rows(images, ok)
            notes = (
                np.asarray(batch["scope_note"], dtype=object)[ok] if "scope_note" in batch else None
            )
            predictions = withhold_out_of_scope(self.bundle.predict(usable, notes))
            predictions.update(usable_image_stats(batch, images, ok))
            uris = [str(u) for u in batch["image_uri"][ok]]
            predictions["heatmap_uri"] = self._heatmap_uris(usable, uris, predictions)

        now = dt.datetime.now(dt.UTC)
        columns = {
            "image_uri": pa.array(batch["image_uri"].tolist(), pa.string()),
            "model_version": pa.array([self.bundle.model_version] * n, pa.string()),
            "scored_on": pa.array([self.node] * n, pa.string()),
            "scored_at": pa.array([now] * n, OUTPUT_SCHEMA.field("scored_at").type),
            "error": pa.array([e or None for e in errors], pa.string()),
            "error_kind": pa.array(kinds, pa.string()),
            "image_bytes": pa.array(batch["image_bytes"].tolist(), pa.int64()),
            "image_mtime_ns": pa.array(
                [None if m is None or m < 0 else int(m) for m in batch["image_mtime_ns"]],
                pa.int64(),
            ),
        }
        for name in OUTPUT_SCHEMA.names:
            if name not in columns:
                columns[name] = scattered(predictions.get(name), ok, OUTPUT_SCHEMA.field(name).type)
        return pa.table([columns[name] for name in OUTPUT_SCHEMA.names], schema=OUTPUT_SCHEMA)


def scattered(values, ok: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """One output column from the usable rows' values (``ok``: which rows they are), null in
    the other rows; built from whole arrays, never row by row. ``values``: (m,) or, for a
    list type, (m, k); None when no row was usable."""
    n = len(ok)
    if values is None:
        return pa.nulls(n, arrow_type)
    mask = None if ok.all() else ~ok
    if pa.types.is_list(arrow_type):
        values = np.asarray(values)
        k = values.shape[1] if values.ndim == 2 else 0
        offsets = np.zeros(n + 1, dtype=np.int32)
        offsets[1:] = np.cumsum(np.where(ok, k, 0))
        flat = _array(values.reshape(-1), arrow_type.value_type)
        return pa.ListArray.from_arrays(
            pa.array(offsets), flat, type=arrow_type, mask=None if mask is None else pa.array(mask)
        )
    if mask is None:
        return _array(values, arrow_type)
    full = np.empty(n, dtype=object if _is_text(arrow_type) else _numpy_type(arrow_type))
    full[:] = "" if _is_text(arrow_type) else 0
    full[ok] = values
    return _array(full, arrow_type, mask)


def _is_text(arrow_type: pa.DataType) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _numpy_type(arrow_type: pa.DataType) -> np.dtype:
    return np.dtype(arrow_type.to_pandas_dtype())


def _array(values, arrow_type: pa.DataType, mask: np.ndarray | None = None) -> pa.Array:
    if _is_text(arrow_type):
        values = np.asarray(values, dtype=object)
        if values.size and not isinstance(values.flat[0], str | None):
            values = values.astype(str).astype(object)
    else:
        values = np.asarray(values, dtype=_numpy_type(arrow_type))
    return pa.array(values, type=arrow_type, mask=mask)


# --- the summary -----------------------------------------------------------------------------


@dataclass
class ScoreSummary:
    output: str
    listed: int = 0
    skipped: int = 0
    to_score: int = 0
    scored: int = 0
    failed: int = 0
    transient: int = 0
    parts: int = 0
    seconds: float = 0.0
    planning_s: float = 0.0
    first_scored_s: float | None = None
    run_id: str | None = None
    heatmaps: int = 0
    out_of_scope: dict[str, int] = field(default_factory=dict)  # reason kind -> images
    drifted: list[str] = field(default_factory=list)  # monitored statistics that drifted
    report: str | None = None  # the run's report.html
    errors: list[tuple[str, str]] = field(default_factory=list)  # the first MAX_ERRORS_KEPT

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "listed": self.listed,
            "skipped": self.skipped,
            "to_score": self.to_score,
            "scored": self.scored,
            "failed": self.failed,
            "transient": self.transient,
            "parts": self.parts,
            "seconds": round(self.seconds, 1),
            "planning_s": round(self.planning_s, 1),
            "first_scored_s": None
            if self.first_scored_s is None
            else round(self.first_scored_s, 1),
            "images_per_s": round(self.images_per_s, 2),
            "heatmaps": self.heatmaps,
            "out_of_scope": self.out_of_scope,
        }

    def __str__(self) -> str:
        first = "-" if self.first_scored_s is None else f"{self.first_scored_s:.1f}s"
        return (
            f"images listed: {self.listed}\n"
            f"already scored (skipped): {self.skipped}\n"
            f"scored: {self.scored}\n"
            f"failed (row with error): {self.failed}, of which transient (retried next run): "
            f"{self.transient}\n"
            f"parts committed: {self.parts}\n"
            f"planning (listing + anti-join): {self.planning_s:.1f}s; first image scored after "
            f"{first}\n"
            f"throughput: {self.images_per_s:.1f} images/s over {self.seconds:.1f}s\n"
            f"heatmaps written: {self.heatmaps}\n"
            f"out of scope (no call): {sum(self.out_of_scope.values())}"
            + "".join(f"\n  {kind}: {n}" for kind, n in self.out_of_scope.items())
            + "\n"
            f"driver peak memory: {driver_peak_mib():.0f} MiB\n"
            f"output: {self.output}"
            + (f" (run {self.run_id})" if self.parts else " (nothing new to score)")
            + (f"\nreport: {self.report}" if self.report else "")
            + (
                f"\nDRIFT against the bundle's reference: {', '.join(self.drifted)}"
                if self.drifted
                else "\ndrift: none found"
                if self.report
                else ""
            )
        )


def driver_peak_mib() -> float:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec
    (ru_maxrss would carry the peak of whatever process forked us)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log(message: str) -> None:
    print(f"[pneumo_ray.score] {message}", flush=True)


_details = logging.getLogger("pneumo_ray.score")  # the job's log file; the console if verbose


# --- stopping on a signal ---------------------------------------------------------------------


class _Stop(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM (a BaseException, as KeyboardInterrupt
    is: no ``except Exception`` on the way may swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class ScoringInterrupted(Exception):
    """The job stopped on SIGINT or SIGTERM; every committed part stays, the lock is free."""

    def __init__(self, signum: int, summary: ScoreSummary) -> None:
        self.signum, self.summary = signum, summary
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        super().__init__(
            f"interrupted ({signal.Signals(signum).name}): {summary.parts} part(s) "
            f"({summary.scored + summary.failed} images) committed; run the same command to "
            "score the rest"
        )


class StopSignals:
    """SIGINT (Ctrl-C, ``timeout -s INT``) and SIGTERM (``ray job stop``, Kubernetes, ``kill``)
    stop the scoring run at once, except during a part's commit: that finishes first, so a signal
    never leaves a half-done commit behind. Rows scored but not yet committed are dropped and
    scored by the next run.

    Installed after ``ray.init`` (whose native SIGTERM handler would dump a stack and die),
    in the main thread only (Python delivers signals there); elsewhere it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self._committing = False
        self._pending: int | None = None
        self._stopping = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            # None: a handler set outside Python (Ray's, for SIGTERM): the default ends the
            # process as it would, without the native stack dump.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum: int, frame) -> None:
        if self._stopping:
            return  # already stopping: a second Ctrl-C must not break into the clean-up
        if self._committing:
            self._pending = signum
        else:
            self._stopping = True
            raise _Stop(signum)

    @contextlib.contextmanager
    def deferred(self):
        """A block a signal does not break into; a signal that came meanwhile stops the run
        as the block ends."""
        self._committing = True
        try:
            yield
        finally:
            self._committing = False
        if self._pending is not None:
            self._stopping = True
            raise _Stop(self._pending)


# --- planning: what is left to score ---------------------------------------------------------


@dataclass
class WorkList:
    files: list[str]  # Parquet files of (image_uri, image_bytes, image_mtime_ns)
    listed: int
    rows: int


def _write_listing(inputs: list[str], path: str) -> None:
    """Stream the inputs' listing into one local Parquet file, a page at a time."""
    listed, next_report = 0, 1_000_000
    with pq.ParquetWriter(path, LISTING_SCHEMA) as writer:
        for page in iter_listing(inputs, report=log):
            writer.write_batch(page)
            listed += page.num_rows
            if listed >= next_report:
                log(f"listed {listed:,} images so far")
                next_report += 1_000_000


def _done_filter(config: ScoreConfig, model_version: str) -> str:
    """The SQL condition under which a committed row ``h`` means listing row ``l`` is done."""
    condition = (
        "h.image_uri = l.image_uri AND h.image_bytes = l.image_bytes"
        " AND coalesce(h.image_mtime_ns, -1) = l.image_mtime_ns"
        f" AND coalesce(h.error_kind, '') <> '{TRANSIENT}'"
    )
    if not config.only_new:
        condition += " AND h.model_version = $model_version"
    return condition


def plan_work(config: ScoreConfig, run_id: str, model_version: str) -> WorkList:
    """List the inputs and anti-join them with the committed history; write what is left to
    score under OUT/_staging/<run>/todo/ (shared storage: Ray Data reads it on any node)."""
    import duckdb

    todo = stores.join(config.output, STAGING, run_id, "todo")
    fs, todo_path = stores.resolve(todo)
    fs.create_dir(todo_path)
    with tempfile.TemporaryDirectory(prefix="pneumo_ray_plan_") as scratch:
        listing = os.path.join(scratch, "listing.parquet")
        _write_listing(config.inputs, listing)
        con = duckdb.connect(
            config={"memory_limit": PLAN_MEMORY, "temp_directory": scratch, "threads": 2}
        )
        quoted = listing.replace("'", "''")  # a path we made, in a temp dir
        con.execute(
            "CREATE VIEW listing AS SELECT image_uri, any_value(image_bytes) AS image_bytes, "
            "any_value(image_mtime_ns) AS image_mtime_ns "
            f"FROM read_parquet('{quoted}') GROUP BY image_uri"
        )
        (listed,) = con.execute("SELECT count(*) FROM listing").fetchall()[0]
        history = history_dataset(config.output)
        query, params = "SELECT * FROM listing l", {}
        if history is not None and not config.rescore:
            # A stream of the key columns, a few batches ahead: registered as a dataset,
            # DuckDB's Arrow scan would buffer outside its memory cap (~400 MB more at 3M rows).
            keys = ["image_uri", "image_bytes", "image_mtime_ns", "error_kind", "model_version"]
            scanner = history.scanner(
                columns=keys, batch_size=16_384, batch_readahead=2, fragment_readahead=1
            )
            con.register("history", scanner.to_reader())
            done = _done_filter(config, model_version)
            query += f" WHERE NOT EXISTS (SELECT 1 FROM history h WHERE {done})"
            if not config.only_new:
                params["model_version"] = model_version
        ordered = con.sql(query + " ORDER BY image_uri", params=params or None)
        reader = ordered.to_arrow_reader(TODO_FILE_ROWS)
        files, rows = [], 0
        for batch in reader:
            uri = stores.join(todo, f"todo-{len(files):05d}.parquet")
            pq.write_table(pa.Table.from_batches([batch]), stores.resolve(uri)[1], filesystem=fs)
            files.append(uri)
            rows += batch.num_rows
        con.close()
    return WorkList(files, listed, rows)


# --- scoring and committing ------------------------------------------------------------------


def model_batch_size(asked: int | None, use_gpu: bool) -> int:
    """--batch-size, or the default of the actors' device."""
    return asked or (GPU_BATCH if use_gpu else CPU_BATCH)


def decode_block_rows(rows: int, cpus: float) -> int:
    """Rows per decode block for ``rows`` images on a cluster of ``cpus`` CPUs now: the work
    spread over every decode slot (DECODE_CPUS each), within [DECODE_BLOCK_MIN,
    DECODE_BLOCK_MAX]."""
    slots = max(1, int(cpus / DECODE_CPUS))
    return int(min(DECODE_BLOCK_MAX, max(DECODE_BLOCK_MIN, rows // slots)))


def decode_stage(
    listing: ray.data.Dataset, decode, fn_kwargs: dict, block: int
) -> ray.data.Dataset:
    """The work list's rows streamed into blocks of ``block`` rows, one ``decode`` task each:
    decoding runs in many parallel tasks, and scored rows reach the driver (and its commits)
    as they come, not all at the end."""
    return listing.repartition(target_num_rows_per_block=block).map_batches(
        decode,
        fn_kwargs=fn_kwargs,
        batch_size=block,
        batch_format="numpy",
        # Half a CPU each: decoding is light next to the models, and a resource shape unlike
        # the actors' keeps Ray Data from fusing it into them (decode stays in parallel CPU
        # tasks, the actors only run models).
        num_cpus=DECODE_CPUS,
    )


def build_pipeline(
    config: ScoreConfig, work: WorkList, image_size: int, heatmap_dir: str
) -> tuple[ray.data.Dataset, str]:
    """The Ray Data pipeline over the work list; returns it and a line saying how it runs."""
    plan = plan_actors(
        config.num_workers, config.use_gpu, config.threads_per_actor, config.actors_per_gpu
    )
    gpu_decode = config.decode == "gpu" or (config.decode == "auto" and plan.use_gpu)
    batch = model_batch_size(config.batch_size, plan.use_gpu)
    block = decode_block_rows(work.rows, ray.cluster_resources().get("CPU", 0))
    fs, _ = stores.resolve(config.output)
    listing = ray.data.read_parquet([stores.resolve(uri)[1] for uri in work.files], filesystem=fs)
    dataset = decode_stage(
        listing,
        # with GPU decode: JPEGs nvJPEG can take travel as bytes, other files as pixels
        read_batch if gpu_decode else decode_batch,
        {"image_size": image_size},
        block,
    ).map_batches(
        BundlePredictor,
        fn_constructor_kwargs={
            "bundle_uri": config.model,
            "use_gpu": plan.use_gpu,
            "threads": plan.threads,
            "gpu_decode": gpu_decode,
            "heatmaps": config.heatmaps,
            "heatmap_dir": heatmap_dir,
        },
        batch_size=batch,
        batch_format="numpy",
        **plan.map_kwargs(),
    )
    # Start scoring once every model actor has its bundle loaded, so the work spreads over all
    # of them (and nodes); generous, since an autoscaler may first have to start GPU nodes.
    ray.data.DataContext.get_current().wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    decode = "GPU (nvJPEG)" if gpu_decode else "CPU"
    return dataset, (
        f"{plan.describe()}, batches of {batch}, JPEG decode on {decode} in blocks of {block}"
    )


class PartWriter:
    """Collects scored rows from the stream and commits a part every ``commit_every`` rows.

    Exactly once within a run: a row whose URI this run already committed (a task retried
    after a worker died, say) is dropped, never committed twice.
    """

    def __init__(
        self,
        config: ScoreConfig,
        run_id: str,
        lock: OutputLock,
        summary: ScoreSummary,
        profile: RunProfile | None = None,
        signals: StopSignals | None = None,
    ):
        self.config, self.run_id, self.lock, self.summary = config, run_id, lock, summary
        self.profile = profile
        self.signals = signals or StopSignals()  # not entered: defers nothing
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.seen = np.empty(0, dtype=np.int64)  # sorted hashes of the URIs committed
        self.started = time.perf_counter()

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.config.commit_every:
            rows = pa.concat_tables(self.pending)
            self.pending = [rows.slice(self.config.commit_every)]
            self.pending_rows = self.pending[0].num_rows
            self.commit(rows.slice(0, self.config.commit_every))

    def flush(self) -> None:
        if self.pending_rows:
            self.commit(pa.concat_tables(self.pending))
        self.pending, self.pending_rows = [], 0

    def _first_time(self, table: pa.Table) -> pa.Table:
        """The rows whose URI this run has not committed (64-bit hashes: 8 bytes per image
        of this run; a collision needs billions of images)."""
        hashes = np.fromiter((hash(u) for u in table.column("image_uri").to_pylist()), np.int64)
        _, first = np.unique(hashes, return_index=True)
        keep = np.zeros(len(hashes), dtype=bool)
        keep[first] = True
        keep &= ~np.isin(hashes, self.seen)
        if not keep.all():
            log(f"dropped {int((~keep).sum())} duplicate row(s) (a retried task's)")
            table = table.filter(pa.array(keep))
        self.seen = np.union1d(self.seen, hashes[keep])
        return table

    def commit(self, table: pa.Table) -> None:
        self.lock.check()
        table = self._first_time(table)
        if not table.num_rows:
            return
        errors = table.column("error").to_pylist()
        kinds = table.column("error_kind").to_pylist()
        failed = sum(1 for e in errors if e)
        part = self.summary.parts
        summary = self.summary
        with self.signals.deferred():  # a part and its count are committed together
            commit_part(
                self.config.output,
                self.run_id,
                part,
                table,
                {"failed": failed, "model_version": table.column("model_version")[0].as_py()},
            )
            summary.parts += 1
            summary.failed += failed
            summary.scored += table.num_rows - failed
        summary.heatmaps += table.num_rows - table.column("heatmap_uri").null_count
        if self.profile is not None:
            self.profile.add(table)
        summary.transient += sum(1 for k in kinds if k == TRANSIENT)
        uris = table.column("image_uri").to_pylist()
        for uri, error in zip(uris, errors, strict=True):
            if error and len(summary.errors) < MAX_ERRORS_KEPT:
                summary.errors.append((uri, error))
        done = summary.scored + summary.failed
        elapsed = time.perf_counter() - self.started
        _details.info(
            f"part {part + 1} committed ({table.num_rows} rows, {failed} with errors): "
            f"{done:,} of {summary.to_score:,} images ({100 * done / summary.to_score:.1f}%), "
            f"{done / elapsed:.1f} images/s"
        )
        faults.after_commit(summary.parts, log)


def run_scoring(config: ScoreConfig) -> ScoreSummary:
    """Score the inputs' images not scored yet with the bundle; commit them in parts."""
    started = time.perf_counter()
    card = read_card(config.model)  # fail fast, before any listing, on a wrong --model
    summary = ScoreSummary(output=config.output)
    nodes = check_shared_storage(
        read=[("--model", config.model), *(("--input", uri) for uri in config.inputs)],
        write=[("--output", config.output)],  # the staging folder lives under it
    )
    if nodes > 1:
        log(f"shared storage: every local location is visible from all {nodes} nodes")
    run_id = summary.run_id = new_run_id()
    with OutputLock(config.output, run_id, config.lock_ttl_s) as lock, StopSignals() as signals:
        if lock.took_over:
            log(f"took over the lock of a run that stopped renewing it: {lock.took_over}")
        for line in recover(config.output, keep_run=run_id):
            log(line)
        report_dir = stores.join(config.output, REPORTS, run_id)
        profile = RunProfile(read_drift_reference(config.model, card), card.get("monitoring"))
        try:
            _score(config, card, report_dir, lock, summary, profile, started, signals)
            write_report(config, card, report_dir, summary, profile)
            write_run_summary(config.output, run_id, {**summary.as_dict(), "state": "finished"})
        except BaseException as exc:
            stopped = isinstance(exc, _Stop)
            if summary.parts:
                state = f"interrupted: {exc}" if stopped else f"failed: {exc!r}"
                write_run_summary(config.output, run_id, {**summary.as_dict(), "state": state})
            if stopped:
                raise ScoringInterrupted(exc.signum, summary) from None
            raise
        finally:
            stores.delete_dir(stores.join(config.output, STAGING, run_id))
    return summary


def write_report(
    config: ScoreConfig, card: dict, report_dir: str, summary: ScoreSummary, profile: RunProfile
) -> None:
    """The run's summary.json and report.html; the drifted statistics into ``summary``."""
    from pneumo_ray.scoring.run_report import build_summary, write_run_report

    run = {
        **summary.as_dict(),
        "output": config.output,
        "inputs": config.inputs,
        "errors": summary.errors,
    }
    summary.out_of_scope = dict(profile.out_of_scope)
    run["out_of_scope"] = summary.out_of_scope
    report = build_summary(run, profile, card)
    site = report["site"]
    if site["act"]:
        from pneumo_ray.models.labelling import DEFAULT_LABELLING_RULE, write_labelling_list

        site["labelling_list"] = stores.join(report_dir, LABELLING_LIST)
        rows = write_labelling_list(
            site["labelling_list"], profile.sample_uris, np.asarray(profile.sample_p),
            float(card["models"]["binary"]["threshold"]), LABELLING_IMAGES, DEFAULT_LABELLING_RULE,
        )  # fmt: skip
        log(site["line"])
        log(f"labelling list ({rows} images to label): {site['labelling_list']}")
    summary.drifted = report["drifted"]
    summary.report = write_run_report(report_dir, report, profile)


def _score(
    config: ScoreConfig,
    card: dict,
    report_dir: str,
    lock: OutputLock,
    summary: ScoreSummary,
    profile: RunProfile,
    started: float,
    signals: StopSignals | None = None,
) -> None:
    run_id, model_version = summary.run_id, str(card.get("model_version", "unsaved"))
    log(f"listing {', '.join(config.inputs)}; model {model_version}")
    work = plan_work(config, run_id, model_version)
    summary.listed, summary.to_score = work.listed, work.rows
    summary.skipped = work.listed - work.rows
    summary.planning_s = time.perf_counter() - started
    log(
        f"{summary.listed} images listed, {summary.skipped} already scored, {work.rows} to "
        f"score ({summary.planning_s:.1f}s)"
    )
    if not work.rows:
        return
    heatmap_dir = stores.join(report_dir, "heatmaps")
    dataset, how = build_pipeline(config, work, int(card["image_size"]), heatmap_dir)
    log(f"{how}; committing every {config.commit_every} images; heatmaps: {config.heatmaps}")
    writer = PartWriter(config, run_id, lock, summary, profile, signals)
    scoring_started = time.perf_counter()
    progress = Progress("scoring", work.rows)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            if summary.first_scored_s is None:
                summary.first_scored_s = time.perf_counter() - started
                _details.info(f"first images scored after {summary.first_scored_s:.1f}s")
            writer.add(batch)
            progress.update(batch.num_rows)
    except _Stop:
        progress.abandon()
        raise
    writer.flush()
    progress.close()
    summary.seconds = time.perf_counter() - scoring_started
    if summary.scored + summary.failed != work.rows:
        raise RuntimeError(
            f"run {run_id}: committed {summary.scored + summary.failed} rows for {work.rows} "
            "images; the next run scores what is missing"
        )
