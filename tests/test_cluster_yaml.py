"""cluster.yaml: valid for Ray's cluster launcher, and shaped as the README says."""

from __future__ import annotations

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from .conftest import REPO


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_ray_validates_the_cluster_config(config):
    validate_config(prepare_config(copy.deepcopy(config)))


def test_invalid_config_is_caught_by_the_same_validation(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(Exception, match="zero|not of type"):
        validate_config(prepare_config(broken))


def test_node_types_match_the_design(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith(("m", "c", "r"))  # a CPU instance
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert types["cpu_worker"]["node_config"]["InstanceType"].startswith(("c", "m"))


def test_setup_installs_this_package_in_docker_with_large_shm(config):
    assert any("pip install" in c and "pneumo_ray" in c for c in config["setup_commands"])
    assert "." in config["file_mounts"].values()
    options = " ".join(config["docker"]["run_options"])
    size = options.split("--shm-size=")[1].split()[0]
    assert size.endswith("g") and int(size[:-1]) >= 8


def test_no_port_is_open_to_the_world(config):
    text = (REPO / "cluster.yaml").read_text()
    assert "0.0.0.0" not in text
    assert config["provider"]["use_internal_ips"] is True
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["SecurityGroupIds"]  # no auto-made group with SSH open
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in head_start
    assert all(
        "RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c
    )
