"""Both jobs against a real S3-protocol server (moto's standalone server on 127.0.0.1)."""

from __future__ import annotations

import json
import shutil
import signal
import time

import pyarrow.fs as pafs
import pytest

from pneumo_ray import faults
from pneumo_ray.io import stores
from pneumo_ray.models.bundle import load_bundle
from pneumo_ray.scoring import ledger
from pneumo_ray.scoring.score import read_scores

from .conftest import CHEST_XRAY, S3_ACCESS, S3_SECRET, environment, run_job
from .test_cluster import SMALL_TRAIN, wait_for

BUCKET = "xrays"
SECRET, ACCESS = S3_SECRET, S3_ACCESS


@pytest.fixture(scope="module")
def s3_env(job_env, s3_server):
    """The jobs' environment (the shared Ray, started with the S3 server's environment) and
    this process's, pointed at the session's S3 server, with the test bucket made."""
    try:
        with environment(**s3_server):
            stores._filesystem_for.cache_clear()
            fs = pafs.S3FileSystem(
                endpoint_override=s3_server["AWS_ENDPOINT_URL"].removeprefix("http://"),
                scheme="http",
                access_key=ACCESS,
                secret_key=SECRET,
                region="us-east-1",
                allow_bucket_creation=True,
            )
            wait_for(lambda: _try_create_bucket(fs), 60, "the moto server", interval=0.2)
            yield {**job_env, **s3_server}
    finally:
        stores._filesystem_for.cache_clear()


def _try_create_bucket(fs) -> bool:
    try:
        fs.create_dir(BUCKET)
        return True
    except OSError:
        return False


def test_train_and_score_with_images_bundles_and_parquet_in_s3(s3_env, subset_store, tmp_path):
    store = f"s3://{BUCKET}/chest_xray"
    stores.upload_dir(str(subset_store), store)
    assert len(stores.list_files(store)) == 241
    bundle, scores = f"s3://{BUCKET}/bundles/b1", f"s3://{BUCKET}/scores"

    train = run_job("train.py", "--data", store, "--output", bundle, *SMALL_TRAIN, env=s3_env)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-4000:]
    loaded = load_bundle(bundle)  # sha256 of every file checked, read through S3
    assert loaded.card["data_fingerprint"]["store"] == store
    assert stores.exists(f"{bundle}/report/metrics.json")
    checkpoints = [e.uri for e in stores.list_files(f"{bundle}/checkpoints")]
    assert any("/checkpoints/networks-" in uri for uri in checkpoints)  # the Ray Train run
    assert any("/checkpoints/results/binary-" in uri for uri in checkpoints)  # written by workers
    neighbours = loaded.knn.uris
    assert all(uri.startswith(f"s3://{BUCKET}/chest_xray/train/") for uri in neighbours)

    stores.write_bytes(f"{store}/test/NORMAL/notes.txt", b"not an image")
    score = run_job(
        "score.py", "--model", bundle, "--input", f"{store}/test", "--output", scores, env=s3_env
    )
    assert score.returncode == 0, score.stdout[-3000:] + score.stderr[-4000:]
    assert f"{store}/test: left out 1 file(s) not named as images (1 .txt)" in score.stdout
    df = read_scores(scores).to_pandas()
    assert len(df) == 120 and df["image_uri"].is_unique and df["error"].isna().all()
    assert df["image_uri"].str.startswith(f"s3://{BUCKET}/chest_xray/test/").all()
    again = run_job(
        "score.py", "--model", bundle, "--input", f"{store}/test", "--output", scores, env=s3_env
    )
    assert "already scored (skipped): 120" in again.stdout

    # Credentials appear nowhere: logs, card, report, Parquet, run markers.
    texts = [train.stdout, train.stderr, score.stdout, score.stderr]
    local = tmp_path / "copy"
    stores.download_dir(bundle, str(local / "bundle"))
    stores.download_dir(scores, str(local / "scores"))
    for path in local.rglob("*"):
        if path.is_file() and "checkpoints" not in path.parts:
            texts.append(path.read_bytes().decode("latin-1"))
    for text in texts:
        assert SECRET not in text and ACCESS not in text
    shutil.rmtree(local)


def test_missing_s3_store_is_a_clear_error(s3_env, tmp_path):
    result = run_job(
        "train.py",
        "--data",
        f"s3://{BUCKET}/nothing-here",
        "--output",
        str(tmp_path / "b"),
        env=s3_env,
        timeout=120,
    )
    assert result.returncode != 0 and "image store not found" in result.stderr
    card = json.dumps(result.stderr)
    assert SECRET not in card


def test_scoring_into_s3_commits_parts_that_survive_a_killed_run(s3_env, trained, tmp_path):
    bundle, _ = trained
    store, scores = f"s3://{BUCKET}/nightly/images", f"s3://{BUCKET}/nightly/scores"
    sources = sorted((CHEST_XRAY / "test" / "NORMAL").glob("*.jpeg"))[:30]
    for source in sources:
        stores.write_bytes(f"{store}/{source.name}", source.read_bytes())
    args = ["--model", str(bundle), "--input", store, "--output", scores, "--commit-every", "10"]
    killed = run_job("score.py", *args, env={**s3_env, faults.KILL_AFTER_PART: "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert read_scores(scores).num_rows == 10  # the committed part; nothing half-written
    assert stores.exists(f"{scores}/{ledger.LOCK}")  # the dead run's lock, on S3

    # The dead run's lock blocks until it is --lock-ttl seconds old (600 by default).
    with pytest.raises(ledger.OutputBusyError):
        ledger.OutputLock(scores, "too soon").acquire()
    done = run_job("score.py", *args, "--lock-ttl", "1", env=s3_env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "took over the lock of a run that stopped renewing it" in done.stdout
    assert "already scored (skipped): 10" in done.stdout and "scored: 20" in done.stdout
    df = read_scores(scores).to_pandas()
    assert sorted(df["image_uri"]) == sorted(f"{store}/{s.name}" for s in sources)
    staging = f"{scores}/_staging"  # the dead run's work list is gone too
    assert not stores.exists(staging) or stores.list_files(staging) == []
    assert not stores.exists(f"{scores}/{ledger.LOCK}")  # released at the end


def test_the_s3_lock_refuses_a_second_job_and_is_taken_over_when_stale(s3_env):
    output = f"s3://{BUCKET}/locks/out"
    first = ledger.OutputLock(output, "first", ttl_s=3600).acquire()
    with pytest.raises(ledger.OutputBusyError, match="being scored by run first"):
        ledger.OutputLock(output, "second", ttl_s=3600).acquire()
    # A holder that stopped renewing for longer than the TTL is taken over, and then knows it.
    taker = ledger.OutputLock(output, "taker", ttl_s=0.5)
    first._stop.set()  # the first holder stalls: no more renewals
    time.sleep(1.0)
    taker.acquire()
    assert taker.took_over["run_id"] == "first"
    assert not first._renew_once()  # its next renewal finds the lock is not its own
    with pytest.raises(ledger.OutputBusyError, match="taken over"):
        first.check()
    first.release()  # must not delete the taker's lock
    assert stores.exists(f"{output}/{ledger.LOCK}")
    taker.release()
    assert not stores.exists(f"{output}/{ledger.LOCK}")
