from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
CHEST_XRAY = SHARED_DATA / "chest_xray"
FULLRES = SHARED_DATA / "chest_xray_fullres"


# Ray Train's controller polls its workers every 2 s by default: a run's end is noticed up to
# 2 s late, three times per training job. Tests poll faster.
FAST_TRAIN = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}

# The test clusters that ray.cluster_utils starts have no token authentication, whatever this
# process has seen: Ray turns it on, in the environment of the process that calls ray.init,
# when ~/.ray/auth_token exists (left by any `ray start --head`), and a cluster started
# afterwards from that process would require it.
NO_TOKEN = {"RAY_AUTH_MODE": "disabled"}

# A test that uses one of these starts Ray or runs a job (or trains, through `trained`).
RAY_FIXTURES = {"ray_local", "trained", "job_env", "embedded_env", "shared_ray", "torch_home"}


def pytest_addoption(parser):
    parser.addoption(
        "--fast",
        action="store_true",
        help="only the tests that start no Ray and train nothing (make test-fast)",
    )


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--fast"):
        return
    kept, dropped = [], []
    for item in items:
        slow = item.get_closest_marker("integration") or RAY_FIXTURES & set(item.fixturenames)
        (dropped if slow else kept).append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def pytest_configure(config):
    # The real images are part of the test suite's contract: fail loudly rather than skip.
    if not CHEST_XRAY.is_dir():
        raise pytest.UsageError(f"tests need the shared data set at {CHEST_XRAY}")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the in-process tests (never a leftover cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def embedded_env() -> dict[str, str]:
    """Environment for running jobs/*.py as a user would, in a subprocess that starts its own
    embedded Ray: for the tests of what an embedded Ray does (signals, killed processes among
    the job's own, the loopback check) and of jobs whose workers need the test's environment
    (S3 credentials, $TORCH_HOME)."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(FAST_TRAIN)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    """A $TORCH_HOME holding a stand-in for torchvision's ImageNet ResNet-18 file (nothing is
    downloaded): the shared Ray's workers and the jobs that join it see it."""
    home = tmp_path_factory.mktemp("torch_home")
    write_imagenet_stand_in(home)
    return home


S3_ACCESS = "AKIAPNEUMORAYTEST"
S3_SECRET = "s3cr3t-key-THAT-MUST-NOT-LEAK"


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on a free loopback port, for the session; yields the
    environment that points at it (tests/test_s3.py). The shared Ray starts with it, so the
    S3 jobs' workers read and write there as a cluster's would with its credentials."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": S3_ACCESS,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def shared_ray(torch_home, s3_server):
    """One local Ray (a head with 2 CPUs) that the job-level tests' jobs join, as a job joins a
    running cluster: about a second to connect instead of about eight to start and stop an
    embedded Ray, for each of some fifty job runs. Its processes start with the session's
    $TORCH_HOME, the S3 server's environment and a shorter Ray Train health-check interval (a
    finished training run is seen in 0.2 s, not 2 s). Stopped by its own processes (never
    `ray stop`)."""
    from ray.cluster_utils import Cluster

    with environment(TORCH_HOME=str(torch_home), **FAST_TRAIN, **s3_server, **NO_TOKEN):
        cluster = Cluster(
            initialize_head=True,
            connect=False,
            head_node_args={
                "num_cpus": 2,
                "include_dashboard": False,
                "object_store_memory": 2 * 1024**3,
            },
        )
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


@contextlib.contextmanager
def environment(**values: str):
    """``os.environ`` with ``values`` while the block runs (what processes started in it
    inherit), restored after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def job_env(embedded_env, shared_ray, torch_home) -> dict[str, str]:
    """Environment for running jobs/*.py in a subprocess that joins the session's shared Ray
    (``$RAY_ADDRESS``, as under `ray job submit`). Fault points set in it reach the workers
    (pneumo_ray.runtime.fault_env)."""
    return {**embedded_env, **NO_TOKEN, "RAY_ADDRESS": shared_ray, "TORCH_HOME": str(torch_home)}


def run_job(script: str, *args: str, env: dict[str, str], timeout: float = 900, cwd: Path = REPO):
    """Run ``python jobs/<script> args`` (from ``cwd``) and return the CompletedProcess (output
    captured)."""
    import subprocess

    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_job(script, args, env, log, cwd=REPO):
    """``jobs/<script>`` in its own process group (to stop what it started, and only that),
    output to a file: a pipe nobody reads could fill and stall it."""
    sink = open(log, "w")  # noqa: SIM115 (the child holds it; closed when the test ends)
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / script), *args],
        cwd=cwd,
        env=env,
        stdout=sink,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_group(process):
    """SIGKILL what is left of a job's process group (its embedded Ray), by the group id."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


SIZE = 64
CORRUPT = "train/NORMAL/IM-9999-0001.jpeg"


@pytest.fixture(scope="session")
def subset_store(tmp_path_factory):
    """40 training images per class and 120 test images, copied from ../shared, plus one
    corrupt file among the good ones."""
    root = tmp_path_factory.mktemp("subset")
    rng = random.Random(0)
    picks = {
        ("train", "NORMAL", "IM-"): 40,
        ("train", "PNEUMONIA", "bacteria"): 40,
        ("train", "PNEUMONIA", "virus"): 40,
        ("test", "NORMAL", "IM-"): 60,
        ("test", "PNEUMONIA", "person"): 60,
    }
    for (split, folder, marker), count in picks.items():
        files = sorted(p for p in (CHEST_XRAY / split / folder).glob("*.jpeg") if marker in p.name)
        (root / split / folder).mkdir(parents=True, exist_ok=True)
        for path in rng.sample(files, count):
            shutil.copy(path, root / split / folder / path.name)
    (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF truncated")
    return root


TRAIN_ARGS = [
    "--image-size", str(SIZE), "--epochs", "4", "--lr-binary", "1e-3", "--seed", "1",
    "--lr-schedule", "cosine", "--weight-decay", "1e-4", "--counterfactual-images", "10",
]  # fmt: skip


@pytest.fixture(scope="session")
def trained(subset_store, tmp_path_factory, job_env):
    """A bundle trained once per test session by jobs/train.py (bundle path, job output)."""
    bundle = tmp_path_factory.mktemp("bundle") / "b"
    tracking = bundle.parent / "mlruns"  # MLflow's local file store: test_tracking reads it
    result = run_job(
        "train.py", "--data", str(subset_store), "--output", str(bundle), *TRAIN_ARGS,
        "--mlflow-tracking-uri", str(tracking), env=job_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return bundle, result.stdout + result.stderr


def write_imagenet_stand_in(torch_home: Path):
    """A seeded resnet18 state dict where torchvision's weights API looks for the ImageNet
    file under ``$TORCH_HOME``: pretrained loading is tested without a download. Returns the
    source model and the file's path."""
    import torch
    from torchvision.models import get_model_weights, resnet18

    torch.manual_seed(123)
    source = resnet18()
    url = get_model_weights("resnet18").DEFAULT.url
    target = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(source.state_dict(), target)
    return source, str(target)
