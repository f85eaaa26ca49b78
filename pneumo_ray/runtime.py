"""Connecting a job to Ray: a running cluster when there is one, else an embedded local Ray."""

from __future__ import annotations

import os

import ray


def init_ray(address: str | None = None) -> None:
    """Join the cluster at ``address`` or ``$RAY_ADDRESS`` (set by ``ray job submit``);
    with neither, start an embedded single-node Ray for this process.

    ``address="local"`` is explicit rather than ``ray.init()``: a bare init would try to join
    whatever cluster /tmp/ray/ray_current_cluster names, even a dead one.
    """
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target)
    else:
        ray.init(address="local")
