"""A quiet console's fd 2: native lines reach the job's log file, and the console unless they
are Ray Data's known constructor-arguments notice."""

from __future__ import annotations

import subprocess
import sys
import textwrap

NOTICE = (
    "[2026-12-04 05:34:50,329 E 8975 8975] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(BundlePredictor))' and ID: 'ba62c32943abae92689afae101000000' has "
    "constructor arguments in the object store and max_restarts > 0. If the arguments in the "
    "object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details."
)
REAL_ERROR = "[2026-12-04 05:35:01,002 E 8975 9001] core_worker.cc:999: Failed to connect"


def test_native_stderr_drops_only_the_known_notice_from_the_console(tmp_path):
    log = tmp_path / "job.log"
    script = textwrap.dedent(
        f"""
        import os, sys, threading
        from pneumo_ray.console import NativeStderr
        log = open({str(log)!r}, "a", buffering=1)
        native = NativeStderr(log, threading.Lock())
        os.write(2, {NOTICE!r}.encode()[:40])  # a native line written in two pieces
        os.write(2, {NOTICE!r}.encode()[40:] + b"\\n")
        os.write(2, {REAL_ERROR!r}.encode() + b"\\n")
        os.write(2, b"progress 50%")  # a partial line that is not native: passed on at once
        print("Traceback: a Python error", file=sys.stderr, flush=True)
        native.stop()
        print("after stop", file=sys.stderr, flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    console = done.stderr
    assert "constructor arguments" not in console
    assert REAL_ERROR in console and "progress 50%" in console
    assert "Traceback: a Python error" in console and "after stop" in console
    kept = log.read_text()
    assert NOTICE in kept and REAL_ERROR in kept and "Traceback: a Python error" in kept
    assert "after stop" not in kept  # fd 2 is the console's again
