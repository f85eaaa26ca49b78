"""Locations in any form a user types them (issue 19), and a scoring run that is interrupted.

A relative ``--output``, ``./out/``, ``..`` or a symlinked folder must name the same output as
its absolute path: the ledger finds the committed parts, the next run skips what they hold, a
caught commit is finished. SIGINT and SIGTERM end a run with one line.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pneumo_ray import faults
from pneumo_ray.config import TrainConfig
from pneumo_ray.console import JobLog, Progress
from pneumo_ray.io import stores
from pneumo_ray.scoring.ledger import (
    COMMITTING,
    OUTPUT_SCHEMA,
    OutputLock,
    _parse_marker,
    commit_part,
    committed_runs,
    read_scores,
    recover,
)
from pneumo_ray.scoring.score import (
    ScoreConfig,
    ScoreSummary,
    ScoringInterrupted,
    StopSignals,
    _Stop,
)

from .conftest import CHEST_XRAY, REPO, start_job, stop_group
from .scoring.test_score import link_images, score, score_args
from .test_cluster import wait_for

# --- the one form of a location ---------------------------------------------------------------


def test_every_spelling_of_a_local_folder_normalizes_to_one_path(tmp_path, monkeypatch):
    (tmp_path / "real" / "out").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    want = str((tmp_path / "real" / "out").resolve())
    spellings = [
        "real/out",
        "./real/out/",
        "real/../real/out",
        "link/out",
        str(tmp_path / "link" / "out") + "/",
        "file://" + str(tmp_path / "real" / "out"),
    ]
    assert {stores.normalize(s) for s in spellings} == {want}
    monkeypatch.setenv("HOME", str(tmp_path))
    assert stores.normalize("~/link/out") == want


def test_uris_stay_as_given_less_a_trailing_slash():
    assert stores.normalize("s3://bucket/scores/") == "s3://bucket/scores"
    assert stores.normalize("s3://bucket/a/../b") == "s3://bucket/a/../b"  # not a local path
    assert stores.normalize_optional(None) is None


def test_parts_below_compares_path_components_not_string_lengths():
    assert stores.parts_below("/data/store", "/data/store/train/NORMAL/a.jpeg") == [
        "train",
        "NORMAL",
        "a.jpeg",
    ]
    assert stores.parts_below("/data/store/", "/data/store/x") == ["x"]
    assert stores.parts_below("s3://b/store", "s3://b/store/test/x.jpeg") == ["test", "x.jpeg"]
    with pytest.raises(ValueError, match="not below"):
        stores.parts_below("/data/store", "/data/store2/train/a.jpeg")  # same prefix, not below


def test_markers_are_read_from_their_last_path_components():
    assert _parse_marker("/o/_runs/r1/part-00003.committed") == ("r1", 3, ".committed")
    assert _parse_marker("out/./_runs/r1/part-00000.committing") == ("r1", 0, ".committing")
    assert _parse_marker("s3://b/o/_runs/r2/part-00001.committed") == ("r2", 1, ".committed")
    assert _parse_marker("/o/_runs/old.json") == ("old", None, "legacy")
    assert _parse_marker("/o/_runs/r1/run.json") is None
    assert _parse_marker("/o/_runs/r1/notes.txt") is None


def _rows(uris: list[str]) -> pa.Table:
    columns = {name: [None] * len(uris) for name in OUTPUT_SCHEMA.names}
    columns.update(image_uri=uris, image_bytes=[1] * len(uris), image_mtime_ns=[1] * len(uris))
    return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)


def test_the_ledger_reads_one_output_in_every_form(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    commit_part("link/out", "r1", 0, _rows(["/x/a.jpeg", "/x/b.jpeg"]), {})
    forms = ["link/out", "./link/out/", "real/out", "real/../link/out", str(tmp_path / "real/out")]
    tables = [read_scores(form) for form in forms]
    assert all(table.num_rows == 2 for table in tables)
    assert all(table.equals(tables[0]) for table in tables)
    assert all(committed_runs(form) == ["r1"] for form in forms)

    # A part caught between its two markers is found and finished from a relative form too.
    staged = tmp_path / "real" / "out" / "_staging" / "r2"
    staged.mkdir(parents=True)
    pq.write_table(_rows(["/x/c.jpeg"]), staged / "part-00000.parquet")
    marker = tmp_path / "real" / "out" / "_runs" / "r2" / ("part-00000" + COMMITTING)
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"run_id": "r2", "part": 0, "rows": 1}))
    assert recover("./link/out/")[0] == "finished the commit of run r2 part-00000"
    assert sorted(read_scores("real/out").column("image_uri").to_pylist()) == [
        "/x/a.jpeg",
        "/x/b.jpeg",
        "/x/c.jpeg",
    ]


def test_the_output_lock_is_one_lock_whatever_the_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    busy = pytest.raises(stores.StoreError, match="is being scored by run r1")
    with OutputLock("out", "r1"), busy:
        OutputLock(str(tmp_path / "out") + "/", "r2").acquire()


def test_job_settings_hold_locations_in_one_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = TrainConfig.from_flat(data="./store/", output="bundles/../b", storage_path="ckpt")
    assert (train.data, train.output, train.cluster.storage_path) == (
        str(tmp_path / "store"),
        str(tmp_path / "b"),
        str(tmp_path / "ckpt"),
    )
    assert TrainConfig.from_flat(data="s3://bucket/store/", output="b").data == "s3://bucket/store"
    config = ScoreConfig(model="b/", inputs=["store", "s3://bucket/x/"], output="./out/")
    assert config.model == str(tmp_path / "b") and config.output == str(tmp_path / "out")
    assert config.inputs == [str(tmp_path / "store"), "s3://bucket/x"]
    log = JobLog("score", verbose=False, path="logs/job.log")
    assert log.path == str(tmp_path / "logs" / "job.log") and os.path.isfile(log.path)


# --- stopping on a signal ---------------------------------------------------------------------


def test_a_signal_during_a_commit_stops_the_run_once_the_commit_is_done():
    before = signal.getsignal(signal.SIGINT)
    committed = []
    with StopSignals() as signals:
        with pytest.raises(_Stop) as stop, signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            committed.append("part")  # the block runs to its end
        assert stop.value.signum == signal.SIGTERM and committed == ["part"]
        os.kill(os.getpid(), signal.SIGINT)  # stopping already: a second signal is ignored
    assert signal.getsignal(signal.SIGINT) is before
    with StopSignals(), pytest.raises(_Stop) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler's exception ends the wait
    assert stop.value.signum == signal.SIGINT


def test_an_interrupted_run_says_what_it_committed_and_exits_as_a_shell_would():
    summary = ScoreSummary(output="/o", parts=2, scored=190, failed=10)
    stop = ScoringInterrupted(signal.SIGINT, summary)
    assert str(stop) == (
        "interrupted (SIGINT): 2 part(s) (200 images) committed; run the same command to score "
        "the rest"
    )
    assert stop.exit_code == 130
    assert ScoringInterrupted(signal.SIGTERM, summary).exit_code == 143


def test_a_stopped_progress_line_ends_its_line():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress("scoring", 10, stream=stream)
    progress.update(3)
    assert "\n" not in stream.getvalue()  # redrawn in place
    progress.abandon()
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1


# --- the jobs, run from a working folder with relative paths ----------------------------------


def _uris(output) -> list[str]:
    return read_scores(str(output)).column("image_uri").to_pylist()


def _working_folder(tmp_path, folder: str, picks: slice):
    """The jobs' working folder, holding ``store/`` (symlinks to shared test images):
    (folder, store, the images linked)."""
    work = tmp_path / "work"
    sources = sorted((CHEST_XRAY / "test" / folder).glob("*.jpeg"))[picks]
    return work, link_images(work / "store", sources), sources


@pytest.mark.integration
def test_a_commit_killed_midway_is_finished_by_the_next_run(trained, tmp_path, job_env):
    bundle, _ = trained
    work, store, sources = _working_folder(tmp_path, "PNEUMONIA", slice(10))
    env = {**job_env, faults.KILL_IN_COMMIT: "1"}  # SIGKILL between part 1's two markers
    args = score_args(bundle, "store", "out", "--commit-every", "4", "--heatmaps", "none")
    job = start_job("score.py", args, env, tmp_path / "killed.log", cwd=work)
    try:
        assert job.wait(timeout=600) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    finally:
        stop_group(job)
    [marker] = (work / "out" / "_runs").glob("*/part-00000" + COMMITTING)
    assert read_scores(str(work / "out")).num_rows == 0  # caught: not committed

    log = score(bundle, ["store"], "./out/", job_env, "--commit-every", "4", cwd=work)
    assert f"finished the commit of run {marker.parent.name} part-00000" in log
    assert "already scored (skipped): 4" in log and "scored: 6" in log
    assert sorted(_uris(work / "out")) == sorted(str(store / p.name) for p in sources)


def _interrupted(job, log_path, signum, to_group: bool, output, parts: int) -> str:
    """Send ``signum`` once the job holds after its first committed part (``parts`` committed
    parts in the output then); its output."""
    try:
        wait_for(lambda: len(list(output.glob("_runs/*/part-*.committed"))) == parts, 600, "part")
        (os.killpg if to_group else os.kill)(job.pid, signum)
        code = job.wait(timeout=120)
    finally:
        stop_group(job)
    text = log_path.read_text()
    assert code == 128 + signum, text[-3000:]
    return text


@pytest.mark.integration
def test_sigint_and_sigterm_end_a_run_with_one_line(trained, tmp_path, embedded_env, job_env):
    bundle, _ = trained
    work, store, sources = _working_folder(tmp_path, "PNEUMONIA", slice(20, 30))
    output = work / "out"
    # Each run waits after its first part (4 images) for a file that never comes, to be stopped
    # there: Ctrl-C reaches the whole process group, SIGTERM (ray job stop, Kubernetes) the
    # driver.
    env = {**embedded_env, faults.HOLD_AFTER_PART: f"1:{tmp_path / 'never'}"}
    args = score_args(bundle, "store", "out", "--commit-every", "4", "--heatmaps", "none")
    for run, (signum, to_group) in enumerate([(signal.SIGINT, True), (signal.SIGTERM, False)]):
        log_path = tmp_path / f"run{run}.log"
        job = start_job("score.py", args, env, log_path, cwd=work)
        text = _interrupted(job, log_path, signum, to_group, output, parts=run + 1)
        name = signal.Signals(signum).name
        assert text.strip().splitlines()[-1] == (
            f"score.py: interrupted ({name}): 1 part(s) (4 images) committed; run the same "
            "command to score the rest"
        )
        for noise in ("Traceback", "KeyboardInterrupt", "*** SIG", "is dead because"):
            assert noise not in text, text[-3000:]
        with OutputLock(str(output), "probe"):  # the lock is free
            pass
        assert len(_uris(output)) == 4 * (run + 1)
        assert not list((output / "_staging").iterdir())
    log = score(bundle, ["store"], "out", job_env, cwd=work)  # the shared Ray will do
    assert "already scored (skipped): 8" in log and "scored: 2" in log
    assert sorted(_uris(output)) == sorted(str(store / p.name) for p in sources)
    states = [json.loads(p.read_text())["state"] for p in sorted(output.glob("_runs/*/run.json"))]
    assert states == ["interrupted: SIGINT", "interrupted: SIGTERM", "finished"]


@pytest.mark.integration
def test_the_demo_run_twice_resumes_training_and_finds_nothing_new(tmp_path, job_env, monkeypatch):
    """The README's promise: a second ``make demo`` resumes from its checkpoints and scores
    nothing. The Makefile's own demo commands, relative paths and all, from a fresh folder
    (1 epoch instead of 5, a relative --storage-path, and the robustness check on 10 images
    per class: what is under test are the paths)."""
    command = [
        "make", "--no-print-directory", "-f", str(REPO / "Makefile"), "demo-jobs",
        f"PY={sys.executable}",
        "DEMO_FLAGS=--image-size 64 --epochs 1 --lr-binary 1e-3 --storage-path ckpt "
        "--counterfactual-images 10",
    ]  # fmt: skip
    logs = []
    for _ in range(2):
        result = subprocess.run(
            command, cwd=tmp_path, env=job_env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        logs.append(result.stdout + result.stderr)
    first, second = logs
    assert "resuming" not in first and "nothing new to score" not in first
    for network in ("binary", "multiclass", "autoencoder"):
        assert f"[{network}] resuming after epoch 1 from {tmp_path / 'ckpt'}" in second
    assert "already scored (skipped): 246" in second and "nothing new to score" in second
    uris = _uris(tmp_path / "out" / "demo_scores")
    assert len(uris) == 246 and len(set(uris)) == 246

    # Other spellings of the same bundle, store and output (./, a trailing slash, .., a
    # symlinked folder) name the same ones: nothing new either, and one row per image.
    (tmp_path / "here").symlink_to(tmp_path / "out")
    log = score("here/demo", ["./here/demo_store/"], "here/../here/demo_scores/", job_env,
                cwd=tmp_path)  # fmt: skip
    assert "already scored (skipped): 246" in log
    assert f"output: {tmp_path / 'out' / 'demo_scores'} (nothing new to score)" in log
    monkeypatch.chdir(tmp_path)
    assert sorted(_uris("here/demo_scores/")) == sorted(uris)
