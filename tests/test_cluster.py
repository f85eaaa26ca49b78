"""Real Ray clusters on this machine: `ray start` + the Jobs CLI, several nodes, and faults."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pneumo_ray import faults
from pneumo_ray.models.bundle import load_bundle
from pneumo_ray.scoring.score import committed_runs, read_scores

from .conftest import CHEST_XRAY, NO_TOKEN, REPO, environment, start_job, stop_group

SMALL_TRAIN = ["--image-size", "32", "--epochs", "2", "--limit", "15", "--lr-binary", "1e-3"]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def ray_head(env: dict, port: int, temp_dir: str, *args: str):
    """`ray start --head --block` on 127.0.0.1:``port`` in a process group of its own, with free
    ports for every per-node service (an embedded Ray elsewhere on this machine, the test
    session's own, may hold the defaults). A port can be taken between our pick and Ray's
    bind (then its agent fails and the node never starts): such a start is retried with new
    ports, up to three times. Stopped even when a test fails: SIGINT (what `ray start --block`
    stops on), then SIGKILL of its group alone, which also ends fake autoscaler nodes (they
    live in the head's group and ignore SIGTERM)."""
    log_path = Path(temp_dir) / "head.log"
    for _attempt in range(3):
        process = _start_head(env, port, temp_dir, log_path, args)
        if _head_started(process, log_path):
            break
        _stop_head(process)
    else:
        raise AssertionError(
            f"ray start --head failed three times:\n{log_path.read_text()[-3000:]}"
        )
    try:
        yield process
    finally:
        _stop_head(process)


def _start_head(env: dict, port: int, temp_dir: str, log_path: Path, args) -> subprocess.Popen:
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                *args,
            ],  # fmt: skip
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            # A shell that runs us in the background ignores SIGINT, and children inherit that.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def _head_started(process: subprocess.Popen, log_path: Path, timeout: float = 120) -> bool:
    """Whether `ray start` says its runtime started (False: it exited first, or timed out)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if "Ray runtime started" in log_path.read_text():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def _stop_head(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def head(embedded_env):
    """A local cluster head with the Jobs API, 2 CPUs, on 127.0.0.1."""
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="pr_", dir="/tmp")  # short: Ray's socket paths
    env = dict(embedded_env)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the job's `python`
    address = f"http://127.0.0.1:{dashboard}"
    client_env = {**env, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": address}

    def ready():
        probe = subprocess.run(
            [RAY, "job", "list", "--address", address],
            env=client_env,
            capture_output=True,
            text=True,
        )
        return probe.returncode == 0

    with ray_head(
        env, port, temp_dir, "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        "--num-cpus=2",
    ):  # fmt: skip
        wait_for(ready, 120, "the head's Jobs API", interval=1.0)
        yield {"address": address, "env": client_env, "gcs": f"127.0.0.1:{port}"}


def submit(head, submission_id: str, *entrypoint: str) -> str:
    command = [
        RAY,
        "job",
        "submit",
        "--address",
        head["address"],
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        *entrypoint,
    ]
    deadline = time.time() + 120
    while True:
        result = subprocess.run(
            command, env=head["env"], capture_output=True, text=True, timeout=900, cwd=REPO
        )
        # A fresh head answers the Jobs API before its dashboard agent takes submissions.
        if "No available agent" not in result.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    status = subprocess.run(
        [RAY, "job", "status", "--address", head["address"], submission_id],
        env=head["env"],
        capture_output=True,
        text=True,
    )
    assert f"Job '{submission_id}' succeeded" in status.stdout, status.stdout + status.stderr
    return result.stdout


def test_jobs_submitted_to_a_local_cluster(head, trained, subset_store, tmp_path):
    """`ray start` (token authentication on) and the Jobs CLI, as the README's local cluster:
    the scoring job of the session's bundle. Training submitted through the Jobs API:
    test_training_and_scoring_spread_over_two_nodes."""
    bundle, _ = trained
    scores = tmp_path / "scores"
    log = submit(
        head,
        f"score-{time.time_ns()}",
        "jobs/score.py",
        "--model",
        str(bundle),
        "--input",
        str(subset_store / "test"),
        "--output",
        str(scores),
    )
    table = read_scores(str(scores))
    assert table.num_rows == 120 and "scored: 120" in log


def test_the_local_cluster_refuses_clients_without_its_token(head):
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = "not-the-cluster-token"
    probe = subprocess.run(
        [RAY, "job", "list", "--address", head["address"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode != 0
    assert "token authentication is enabled" in probe.stderr, probe.stderr[-2000:]


@pytest.fixture(scope="module")
def two_nodes(embedded_env):
    """A head and a second node on this machine, 2 CPUs each, with the Jobs API on
    127.0.0.1 (``jobs``: what ``submit`` needs)."""
    from ray.cluster_utils import Cluster

    dashboard = free_port()
    env = {**embedded_env, **NO_TOKEN}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the jobs' `python`
    with environment(PATH=env["PATH"], **NO_TOKEN):  # what its processes, and jobs, inherit
        cluster = Cluster(
            initialize_head=True,
            connect=False,
            head_node_args={
                "num_cpus": 2,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard,
                "dashboard_agent_listen_port": free_port(),
            },
        )
        # Each node's agent on a port of its own: the Jobs API hands a job to any node's.
        cluster.add_node(num_cpus=2, dashboard_agent_listen_port=free_port())
    cluster.wait_for_nodes()
    cluster.jobs = {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    try:
        yield cluster
    finally:
        cluster.shutdown()


def test_training_and_scoring_spread_over_two_nodes(two_nodes, subset_store, tmp_path):
    """Both jobs submitted through the Jobs API (`ray job submit`), each spread over the two
    nodes: a Ray Train worker and a model actor on each."""
    bundle, scores = tmp_path / "bundle", tmp_path / "scores"
    log = submit(
        two_nodes.jobs, f"train-{time.time_ns()}", "jobs/train.py",
        "--data", str(subset_store), "--output", str(bundle), *SMALL_TRAIN,
        "--num-workers", "2", "--cpus-per-worker", "1",
    )  # fmt: skip
    assert "bundle pneumo-" in log
    load_bundle(str(bundle))
    card = json.loads((bundle / "card.json").read_text())
    cluster_nodes = {node.node_id for node in two_nodes.list_all_nodes()}
    for network, nodes in card["training"]["worker_nodes"].items():
        assert len(nodes) == 2 and set(nodes) == cluster_nodes, (network, nodes)
    folder = tmp_path / "images"  # enough batches of 4 to keep both actors busy
    folder.mkdir()
    for source in sorted((CHEST_XRAY / "test" / "NORMAL").glob("*.jpeg"))[:48]:
        (folder / source.name).symlink_to(source)
    log = submit(
        two_nodes.jobs, f"score-{time.time_ns()}", "jobs/score.py",
        "--model", str(bundle), "--input", str(folder),
        "--output", str(scores), "--num-workers", "2", "--batch-size", "4",
    )  # fmt: skip
    df = read_scores(str(scores)).to_pandas()
    assert len(df) == 48 and df["image_uri"].is_unique and df["error"].isna().all()
    # One model actor on each node (the actors announce themselves when their bundle is
    # loaded), and every row was scored by one of them. Which actor takes a block is Ray
    # Data's choice: it prefers the actor on the node that holds the block while that actor
    # has room, so under a light load one actor may score everything; not asserted.
    ready = {
        line.split("model actor ready on node ")[1].split()[0]
        for line in log.splitlines()
        if "model actor ready on node " in line
    }
    assert ready == cluster_nodes, ready
    assert set(df["scored_on"]) <= ready
    # Both jobs checked their local locations from every node before any work.
    assert "visible from all 2 nodes" in log


def test_a_local_output_some_nodes_cannot_see_is_refused(two_nodes, trained, tmp_path):
    """The driver runs in a mount namespace of its own, with a private tmpfs over the output
    folder: what it writes there, no node sees, as with a local disk on a real cluster."""
    bundle, _ = trained
    private = tmp_path / "private_out"
    private.mkdir()
    command = " ".join(
        [
            f"mount -t tmpfs tmpfs {private} &&",
            f"exec {sys.executable} {REPO / 'jobs' / 'score.py'}",
            f"--model {bundle} --input {CHEST_XRAY / 'test' / 'NORMAL'}",
            f"--output {private / 'scores'} --address {two_nodes.address}",
        ]
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
        cwd=REPO,
        env=two_nodes.jobs["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"score.py: error: --output {private / 'scores'}: a local path that")
    assert "2 of the cluster's 2 nodes cannot see" in last and "s3://" in last
    assert not (private / "scores").exists()  # outside the namespace: nothing was written


def _kill_when(job: subprocess.Popen, match: str, ready, timeout: float = 300) -> int:
    """Wait until ``ready()``, then SIGKILL the one process of ``job``'s own Ray cluster (its
    embedded Ray: the job's descendants, by pid) whose command line has ``match``. Never a
    process of any other cluster on this machine."""
    wait_for(ready, timeout, f"the moment to kill {match}")
    tree = psutil.Process(job.pid).children(recursive=True)
    victims = []
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            if match in " ".join(process.cmdline()):
                victims.append(process)
    assert victims, f"no {match} among the job's processes"
    victim = min(victims, key=lambda p: p.pid)
    victim.kill()
    return victim.pid


def _registered_checkpoint(storage: Path) -> bool:
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            return bool(json.loads(snapshot.read_text()).get("latest_checkpoint_result"))
        except json.JSONDecodeError:  # being written
            return False
    return False


def _run_job_and_kill(script: str, args: list[str], env, log: Path, match: str, ready) -> str:
    """Run ``jobs/<script>``; once ``ready()``, SIGKILL a process matching ``match``; return the
    job's output after it ends (it must succeed). Output goes to a file: a pipe nobody reads
    while we wait could fill and stall the job."""
    process = start_job(script, args, env, log)
    try:
        _kill_when(process, match, ready)
        process.wait(timeout=900)
    finally:
        if process.poll() is None:
            stop_group(process)
    output = log.read_text()
    assert process.returncode == 0, output[-4000:]
    return output


def test_training_survives_a_killed_worker(subset_store, tmp_path, embedded_env):
    """The binary network's worker holds after its epoch-1 checkpoint (a fault point) and is
    SIGKILLed there; Ray Train starts a new worker, which resumes after epoch 1 (and does not
    hold again)."""
    bundle = tmp_path / "bundle"
    args = ["--data", str(subset_store), "--output", str(bundle), *SMALL_TRAIN, "--epochs", "3",
            "--max-failures", "2"]  # fmt: skip
    env = {**embedded_env, faults.HOLD_AFTER_EPOCH: f"binary:1:{tmp_path / 'never'}"}
    # Kill once Ray Train has registered the checkpoint (its snapshot names it): a report the
    # controller has not collected yet dies with the worker.
    output = _run_job_and_kill(
        "train.py",
        args,
        env,
        tmp_path / "train.log",
        "RayTrainWorker",
        lambda: _registered_checkpoint(bundle / "checkpoints"),
    )
    assert "[binary] resuming after epoch 1" in output, "\n".join(
        line[:300] for line in output.splitlines() if "rror" in line or "epoch" in line
    )
    card = json.loads((bundle / "card.json").read_text())
    assert [row["epoch"] for row in card["training"]["history"]["binary"]] == [1, 2, 3]
    load_bundle(str(bundle))


def test_scoring_survives_a_killed_model_actor(trained, tmp_path, embedded_env):
    bundle, _ = trained
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted((CHEST_XRAY / "test" / "PNEUMONIA").glob("*.jpeg"))[:160]
    for source in sources:
        (folder / source.name).symlink_to(source)
    scores = tmp_path / "scores"
    args = [
        "--model",
        str(bundle),
        "--input",
        str(folder),
        "--output",
        str(scores),
        "--batch-size",
        "4",
        "--commit-every",
        "16",
    ]
    # Kill once the first part is committed: the actor is busy with the next ones.
    _run_job_and_kill(
        "score.py",
        args,
        embedded_env,
        tmp_path / "score.log",
        "BundlePredictor",
        lambda: committed_runs(str(scores)),
    )
    df = read_scores(str(scores)).to_pandas()
    assert sorted(df["image_uri"]) == sorted(str(folder / s.name) for s in sources)
    assert df["error"].isna().all()
