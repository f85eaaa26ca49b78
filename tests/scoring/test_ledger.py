"""The output ledger (pneumo_ray.scoring.ledger): committed parts and the lock.

S3 versions: tests/test_s3.py."""

from __future__ import annotations

import signal
import subprocess
import sys

import pyarrow as pa
import pytest

from pneumo_ray.scoring.ledger import (
    OUTPUT_SCHEMA,
    OutputBusyError,
    OutputLock,
    commit_part,
    committed_files,
    read_scores,
)

from ..conftest import REPO


def rows(uris):
    data = {name: [None] * len(uris) for name in OUTPUT_SCHEMA.names}
    data.update(image_uri=uris, image_bytes=[1] * len(uris), image_mtime_ns=[2] * len(uris))
    return pa.Table.from_pydict(data, schema=OUTPUT_SCHEMA)


def test_parts_commit_one_by_one_and_only_committed_ones_are_read(tmp_path):
    output = str(tmp_path / "scores")
    commit_part(output, "r1", 0, rows(["a", "b"]), {})
    commit_part(output, "r1", 1, rows(["c"]), {})
    assert len(committed_files(output)) == 2
    assert sorted(read_scores(output).column("image_uri").to_pylist()) == ["a", "b", "c"]
    assert not list((tmp_path / "scores" / "_staging" / "r1").iterdir())


def test_a_second_lock_on_one_output_is_refused_with_who_holds_it(tmp_path):
    output = str(tmp_path / "scores")
    busy = pytest.raises(OutputBusyError, match=r"being scored by run first \(pid \d+ on")
    with OutputLock(output, "first"), busy:
        OutputLock(output, "second").acquire()
    with OutputLock(output, "third"):  # released: free again
        pass


def test_a_lock_whose_holder_died_does_not_block_the_next_run(tmp_path):
    output = str(tmp_path / "scores")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pneumo_ray.scoring.ledger import OutputLock;"
            f"OutputLock({output!r}, 'dies').acquire(); print('held', flush=True); time.sleep(600)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match="run dies"):
            OutputLock(output, "while it lives").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # our own child, by its pid
        holder.wait()
    with OutputLock(output, "next night"):
        pass
