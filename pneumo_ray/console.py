"""What a job prints: a quiet console by default, Ray's own logs in the job's log file.

By default (no ``--verbose``) a job's console holds its own lines (``[pneumo_ray] ...``), the
training job's epoch lines (``[binary] epoch 3/8 train_loss=...``, printed by the rank-0
worker), error lines, one progress line for the images of a long pass, and the summary.
Everything else Ray prints (its INFO logs, Ray Data's execution plans and progress, the
workers' other output) goes to the job's log file, named on the console when the job starts.
``--verbose`` shows it all on the console as Ray does, and writes the log file too.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import functools
import logging
import os
import re
import sys
import tempfile
import threading
import time
from typing import TextIO

# Worker lines that stay on a quiet console: the training loop's own (pneumo_ray.training.loop
# prints "[network] ..."), and errors.
_SHOWN = re.compile(r"^\[(binary|multiclass|autoencoder|pneumo_ray[.\w]*)\] |\bERROR\b|Error:")
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air")
# A line of Ray's native (C++) log, as its core worker prints ERROR lines to stderr.
_NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d ")
# Native lines on a healthy run that are not the operator's news. Ray Data 2.60 hands every
# actor-pool worker its DataContext and map function as object-store arguments, with
# max_restarts=-1, and the core worker logs an ERROR for each such actor (ray-project/ray
# #57733, even for ``ray.data.range(1).map_batches(Actor)``). The references stay held for the
# whole pass, so a killed model actor does restart (tests/test_cluster.py); our own actor
# arguments are a bundle URI, or networks the driver holds until the pass ends.
_NATIVE_NOISE = re.compile(
    rb"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*' and ID: '\w+' has "
    rb"constructor arguments in the object store and max_restarts > 0"
)
_DISPATCHER_HANDLER = "ray_print_logs"  # the name ray.init gives its worker-log printer


def default_log_path(job: str) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = os.environ.get("PNEUMO_RAY_LOG_DIR") or os.path.join(
        tempfile.gettempdir(), "pneumo_ray", "logs"
    )
    return os.path.join(folder, f"{job}-{stamp}-{os.getpid()}.log")


def ray_init_kwargs(verbose: bool) -> dict:
    """What ``ray.init`` is given: a quiet console starts with Ray's driver logs at ERROR (its
    start-up notices, such as token authentication being on, are not the operator's news);
    once the job's log file is set up, Ray's logs from INFO on go there."""
    return {} if verbose else {"logging_level": logging.ERROR}


class JobLog:
    """The job's log file, and (unless verbose) the redirection of Ray's output into it.

    Set up after ``ray.init``: it replaces the printer ``ray.init`` registered for the
    workers' output (Ray's ``WorkerStandardStreamDispatcher``, Ray 2.60) with one that writes
    every line to the file and echoes only the lines a quiet console shows.
    """

    def __init__(self, job: str, verbose: bool, path: str | None = None) -> None:
        self.job, self.verbose = job, verbose
        self.path = os.path.realpath(os.path.expanduser(path or default_log_path(job)))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._file: TextIO = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()
        self.silent = False  # True: no worker line reaches the console (shutting down)
        self.native: NativeStderr | None = None  # fd 2 through its filter (a quiet console)

    def install(self) -> JobLog:
        import ray.data  # noqa: F401  (its import configures the "ray.data" logger: then ours)
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        handler = logging.StreamHandler(self._file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ours = logging.getLogger("pneumo_ray")  # detail lines: the file, the console if verbose
        ours.setLevel(logging.INFO)
        ours.propagate = False
        ours.addHandler(handler)
        if self.verbose:
            console = logging.StreamHandler(sys.stdout)
            console.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
            ours.addHandler(console)
        for name in _RAY_LOGGERS:
            logger = logging.getLogger(name)
            if not self.verbose:
                for existing in list(logger.handlers):
                    if _is_console(existing):
                        logger.removeHandler(existing)
                if name == "ray":
                    logger.setLevel(logging.INFO)  # into the file; the console saw WARNING
            logger.addHandler(handler)
        if not self.verbose:
            # Python warnings (Ray's deprecation notices, say) to the file, not the console.
            logging.captureWarnings(True)
            warned = logging.getLogger("py.warnings")
            warned.propagate = False
            warned.addHandler(handler)
            _quiet_ray_data()
            global_worker_stdstream_dispatcher.remove_handler(_DISPATCHER_HANDLER)
            self.native = NativeStderr(self._file, self._lock)
        global_worker_stdstream_dispatcher.add_handler(
            f"pneumo_ray_{self.job}_log", functools.partial(JobLog._worker_lines, self)
        )
        global _installed
        _installed = self
        where = "" if self.verbose else " (--verbose shows Ray's logs here)"
        print(f"[pneumo_ray] log file: {self.path}{where}", flush=True)
        return self

    def _worker_lines(self, data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who} pid={data.get('pid')}) " if who else f"(pid={data.get('pid')}) "
        lines = data.get("lines", [])
        with self._lock:
            for line in lines:
                self._file.write(prefix + line + "\n")
        if self.verbose or self.silent:
            return  # Ray's own printer shows them, or nothing may
        sink = sys.stderr if data.get("is_err") else sys.stdout
        for line in lines:
            if _SHOWN.search(line):
                print(line, file=sink, flush=True)


class NativeStderr:
    """File descriptor 2 of this process (native logs included) through a pipe: every line
    goes to ``log_file``, and to the console unless it is a known native line that is not the
    operator's news (_NATIVE_NOISE). A partial line is passed on at once unless it is the start
    of a native log line (held until its newline), so prompts and redrawn lines stay live.
    ``stop`` (also at exit) puts fd 2 back and drains the pipe."""

    def __init__(self, log_file: TextIO, lock: threading.Lock) -> None:
        self.log_file, self.lock = log_file, lock
        sys.stderr.flush()
        self.console = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self.thread = threading.Thread(
            target=self._pump, args=(read_fd,), name="pneumo_ray-stderr", daemon=True
        )
        self.thread.start()
        atexit.register(self.stop)

    def _pump(self, read_fd: int) -> None:
        pending = b""
        while chunk := os.read(read_fd, 65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._emit(line + b"\n")
            if pending and not _NATIVE_LINE.match(pending):
                self._emit(pending)
                pending = b""
        if pending:
            self._emit(pending)
        os.close(read_fd)

    def _emit(self, data: bytes) -> None:
        with self.lock:
            self.log_file.write(data.decode("utf-8", "replace"))
        if not _NATIVE_NOISE.search(data):
            view = memoryview(data)
            while view:
                view = view[os.write(self.console if self.console >= 0 else 2, view) :]

    def stop(self) -> None:
        if self.console < 0:
            return
        sys.stderr.flush()
        os.dup2(self.console, 2)  # the pipe's last writer closes: the pump drains and ends
        self.thread.join(timeout=5)
        if not self.thread.is_alive():  # else a child process holds the pipe: keep the fd
            os.close(self.console)
        self.console = -1


_installed: JobLog | None = None  # the job's, once installed


@contextlib.contextmanager
def redirected_stderr():
    """For a block: the process's stderr (file descriptor 2, so native logs too) into the
    job's log file, and no worker line on the console. Does nothing on a verbose console or
    before a JobLog is installed."""
    log = _installed
    if log is None or log.verbose:
        yield
        return
    log.silent = True
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(log._file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _is_console(handler: logging.Handler) -> bool:
    if isinstance(handler, logging.FileHandler):
        return False
    stream = getattr(handler, "stream", None)
    return isinstance(handler, logging.StreamHandler) and stream in (
        sys.stdout,
        sys.stderr,
        sys.__stdout__,
        sys.__stderr__,
    )


def _quiet_ray_data() -> None:
    """Ray Data's progress bars (or, off a TTY, its progress log lines) off the console."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    if hasattr(context, "enable_operator_progress_bars"):
        context.enable_operator_progress_bars = False
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = False


class Progress:
    """One progress line for a pass over ``total`` images: done, images/s, ETA.

    On a terminal the line is redrawn in place; elsewhere (``ray job logs``, a scheduler's
    log) a line is printed every ``every_s`` seconds and at the end.
    """

    def __init__(
        self,
        what: str,
        total: int,
        stream: TextIO | None = None,
        every_s: float = 30.0,
        clock=time.monotonic,
    ) -> None:
        self.what, self.total, self.done = what, total, 0
        self.stream = stream or sys.stdout
        self.every_s, self.clock = every_s, clock
        self.started = self.last = clock()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, count: int) -> None:
        self.done += count
        now = self.clock()
        if self.tty:
            self.stream.write("\r" + self.line(now))
            self.stream.flush()
        elif now - self.last >= self.every_s:
            print(self.line(now), file=self.stream, flush=True)
            self.last = now

    def close(self) -> None:
        end = "\n" if self.tty else ""
        if self.tty:
            self.stream.write("\r" + self.line(self.clock()) + end)
            self.stream.flush()
        else:
            print(self.line(self.clock()), file=self.stream, flush=True)

    def abandon(self) -> None:
        """End a redrawn line where it stands (the pass was stopped), so the next line starts
        on its own."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        share = self.done / self.total if self.total else 1.0
        width = 24
        filled = min(width, int(round(width * share)))
        bar = "#" * filled + "-" * (width - filled)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = _clock_text(left) if left != float("inf") else "?"
        return (
            f"{self.what} [{bar}] {self.done:,}/{self.total:,} images "
            f"({100 * share:.0f}%)  {rate:.1f} images/s  ETA {eta}"
        )


def _clock_text(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
