from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHEST_XRAY = SHARED_DATA / "chest_xray"
FULLRES = SHARED_DATA / "chest_xray_fullres"


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
def job_env() -> dict[str, str]:
    """Environment for running jobs/*.py as a user would, in a subprocess."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO)
    return env


def run_job(script: str, *args: str, env: dict[str, str], timeout: float = 900):
    """Run ``python jobs/<script> args`` and return the CompletedProcess (output captured)."""
    import subprocess

    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
