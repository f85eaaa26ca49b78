"""Ray's fake autoscaler in the shape of cluster.yaml: a head with 0 CPUs, worker types at
``min_workers: 0``. The jobs must make the autoscaler start nodes for them.

Not ``ray.cluster_utils.AutoscalingCluster``: it reads an example.yaml the wheel does not ship,
and its start/shutdown run ``ray stop --force``, which would end every Ray process on the
machine. The head runs in its own process group and is stopped by that group alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pneumo_ray.scoring.score import read_scores

from .conftest import CHEST_XRAY, run_job
from .test_cluster import free_port, ray_head, wait_for

pytestmark = pytest.mark.integration

GPU_TYPE = "gpu_worker"
CPU_TYPE = "cpu_worker"


def autoscaling_config(gcs_port: int) -> dict:
    """cluster.yaml's shape on the fake provider: head 0 CPUs; CPU and (fake) GPU workers
    from 0 up."""
    return {
        "cluster_name": "pneumo-fake",
        "max_workers": 4,
        "upscaling_speed": 2.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            CPU_TYPE: {
                "resources": {"CPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
            # Fake GPUs: the autoscaler and the scheduler see them; torch on the node does not,
            # so actors placed there fall back to the CPU device.
            GPU_TYPE: {
                "resources": {"CPU": 1, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "auth": {"ssh_user": "nobody"},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def autoscaling_head(embedded_env):
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="pa_", dir="/tmp")  # short: Ray's socket paths
    config = Path(temp_dir) / "autoscaling.yaml"
    config.write_text(json.dumps(autoscaling_config(port)))  # JSON is YAML
    env = dict(embedded_env)
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    address = f"127.0.0.1:{port}"
    client_env = {**embedded_env, "RAY_AUTH_MODE": "token"}
    with ray_head(
        env, port, temp_dir, "--num-cpus=0", f"--autoscaling-config={config}",
        f"--dashboard-port={free_port()}",
    ):  # fmt: skip
        wait_for(lambda: _alive_nodes(address, client_env) is not None, 120, "the head", 1.0)
        yield {"address": address, "env": client_env}


_NODES_SCRIPT = """
import json, ray
ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
print(json.dumps([
    {{"id": n["NodeID"], "resources": n["Resources"]}} for n in ray.nodes() if n["Alive"]
]))
"""


def _alive_nodes(address: str, env: dict) -> list[dict] | None:
    """The cluster's alive nodes, asked from a separate driver (None if it does not answer)."""
    result = subprocess.run(
        [sys.executable, "-c", _NODES_SCRIPT.format(address=address)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_jobs_make_the_autoscaler_add_nodes(autoscaling_head, subset_store, tmp_path):
    address, env = autoscaling_head["address"], autoscaling_head["env"]
    nodes = _alive_nodes(address, env)
    assert len(nodes) == 1 and nodes[0]["resources"].get("CPU", 0) == 0  # the head alone

    bundle = tmp_path / "bundle"
    started = time.time()
    result = run_job(
        "train.py", "--data", str(subset_store), "--output", str(bundle),
        "--image-size", "32", "--epochs", "2", "--limit", "15", "--lr-binary", "1e-3",
        "--num-workers", "1-2", "--address", address,
        env=env, timeout=1200,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "1-2 (elastic) worker(s)" in output
    card = json.loads((bundle / "card.json").read_text())
    assert card["training"]["scaling"]["max_workers"] == 2
    trained_on = {node for nodes in card["training"]["worker_nodes"].values() for node in nodes}
    after_training = _alive_nodes(address, env)
    worker_nodes = [n for n in after_training if n["resources"].get("CPU", 0) > 0]
    # The autoscaler started CPU nodes for the decode tasks and the trainers: the head has none.
    assert len(worker_nodes) >= 1, after_training
    assert trained_on <= {n["id"] for n in worker_nodes}

    scores = tmp_path / "scores"
    result = run_job(
        "score.py", "--model", str(bundle), "--input", str(CHEST_XRAY / "test" / "NORMAL"),
        "--output", str(scores), "--use-gpu", "--num-workers", "1-2", "--batch-size", "16",
        "--address", address,
        env=env, timeout=1200,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "1-2 (autoscaling) model actor(s) on GPU" in output
    # No GPU is real here: the actors say they fell back to the CPU device and decoder.
    assert "falling back to the CPU decoder" in output
    df = read_scores(str(scores)).to_pandas()
    assert len(df) == 231 and df["image_uri"].is_unique and df["error"].isna().all()
    nodes = _alive_nodes(address, env)
    gpu_nodes = {n["id"] for n in nodes if n["resources"].get("GPU", 0) > 0}
    # The GPU request reached the autoscaler: it started fake GPU nodes, and every row was
    # scored by an actor on one of them.
    assert gpu_nodes, nodes
    assert set(df["scored_on"]) <= gpu_nodes
    assert len(nodes) >= 3, nodes  # head + a CPU node + a GPU node, all started on demand
    print(f"autoscaler reached {len(nodes)} nodes in {time.time() - started:.0f}s")
