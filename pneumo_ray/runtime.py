"""Connecting a job to Ray, and checking that the cluster can see the job's locations.

A job joins a running cluster when there is one, else starts an embedded local Ray that
listens on 127.0.0.1 only. On a cluster of several nodes, every local path the job reads or
writes must be the same folder on every node (a shared mount), or the job must use s3://.
"""

from __future__ import annotations

import os
import uuid

import ray

from pneumo_ray import faults
from pneumo_ray.io import stores

# Ray resolves its node address through this switch; off, a single-node Ray takes the loopback
# address for its GCS, raylet, object manager, agents and workers (Ray 2.60).
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PROBE_PREFIX = ".pneumo_ray_probe-"


class SharedStorageError(stores.StoreError):
    """A local path that some nodes of the cluster cannot see."""


def init_ray(address: str | None = None, **kwargs) -> None:
    """Join the cluster at ``address`` or ``$RAY_ADDRESS`` (set by ``ray job submit``);
    with neither, start an embedded single-node Ray for this process, on 127.0.0.1 only.

    ``address="local"`` is explicit rather than ``ray.init()``: a bare init would try to join
    whatever cluster /tmp/ray/ray_current_cluster names, even a dead one.
    """
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        faults = fault_env()
        if faults and "runtime_env" not in kwargs:
            # The cluster's worker processes were not started from this environment.
            kwargs["runtime_env"] = {"env_vars": faults}
        ray.init(address=target, **kwargs)
    else:
        init_local_ray(**kwargs)


def fault_env() -> dict[str, str]:
    """The fault injection points set in this environment (pneumo_ray.faults): a job that joins
    a running cluster passes them to its workers there, as an embedded Ray's workers inherit
    them."""
    return {key: os.environ[key] for key in faults.VARIABLES if key in os.environ}


def init_local_ray(**kwargs) -> None:
    """An embedded Ray whose every server listens on 127.0.0.1: nothing of it is reachable
    from another machine (its processes inherit the switch through the environment)."""
    from ray._private import ray_constants

    os.environ[_LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when the node address is resolved
    ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)


def _alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


@ray.remote(num_cpus=0)
def _sees(paths: list[str]) -> list[bool]:
    return [os.path.exists(path) for path in paths]


def check_shared_storage(
    read: list[tuple[str, str | None]], write: list[tuple[str, str | None]]
) -> int:
    """Refuse local paths that not every node of a multi-node cluster can see.

    ``read``: (flag, location) pairs that must already exist on every node (input stores, a
    bundle); ``write``: locations the job writes (output, checkpoints, staging): the driver
    writes a probe file there and one task per node looks for it. s3:// locations and
    single-node clusters pass at once. Returns the number of nodes checked; raises
    SharedStorageError with one line naming the flag, the path, the nodes and the fix.
    """
    nodes = _alive_nodes()
    read = [(flag, uri) for flag, uri in read if uri and not stores.is_remote(uri)]
    write = [(flag, uri) for flag, uri in write if uri and not stores.is_remote(uri)]
    if len(nodes) < 2 or not (read or write):
        return len(nodes)
    checks = [(flag, uri, os.path.abspath(os.path.expanduser(uri))) for flag, uri in read]
    probes = []
    for flag, uri in write:
        folder = os.path.abspath(os.path.expanduser(uri))
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        with open(probe, "w") as handle:
            handle.write("written by the driver to check that every node sees this folder\n")
        probes.append(probe)
        checks.append((flag, uri, probe))
    try:
        paths = [path for _, _, path in checks]
        answers = ray.get(
            [
                _sees.options(scheduling_strategy=_on_node(node["NodeID"])).remote(paths)
                for node in nodes
            ]
        )
    finally:
        for probe in probes:
            os.remove(probe)
    for index, (flag, uri, _) in enumerate(checks):
        blind = [
            node["NodeID"][:8] for node, seen in zip(nodes, answers, strict=True) if not seen[index]
        ]
        if blind:
            raise SharedStorageError(
                f"{flag} {uri}: a local path that {len(blind)} of the cluster's {len(nodes)} "
                f"nodes cannot see (node {', '.join(blind)}); on a multi-node cluster use an "
                "s3:// URI or a shared mount (NFS, EFS, Lustre) at the same path on every node"
            )
    return len(nodes)


def _on_node(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id, soft=False)
