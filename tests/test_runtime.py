"""The embedded local Ray listens on the loopback interface only."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import REPO

_LISTENERS = """
import json, os, time
import psutil
from pneumo_ray.runtime import init_ray
init_ray(num_cpus=1, include_dashboard=False)
import ray

@ray.remote
def where():
    return os.getpid()

ray.get(where.remote())  # a worker process is up too
time.sleep(2)
ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
listening = sorted({
    (psutil.Process(c.pid).name(), c.laddr.ip)
    for c in psutil.net_connections(kind="inet")
    if c.status == psutil.CONN_LISTEN and c.pid in ours
})
print(json.dumps({"listening": listening, "gcs": ray.get_runtime_context().gcs_address}))
ray.shutdown()
"""


def test_embedded_ray_listens_on_loopback_only(embedded_env):
    env = {k: v for k, v in embedded_env.items() if not k.startswith("RAY_")}
    result = subprocess.run(
        [sys.executable, "-c", _LISTENERS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    names = {name for name, _ in report["listening"]}
    assert {"gcs_server", "raylet"} <= names, report
    loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
    assert {ip for _, ip in report["listening"]} <= loopback, report
    assert report["gcs"].startswith("127.0.0.1:")
