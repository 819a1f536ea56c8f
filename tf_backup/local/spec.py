"""The tasks of a local cluster and where they listen: names, free ports, the cluster dict."""

import socket
from typing import List, Mapping, Optional

# The chief: worker 0, whose failure ends the job and whose return ends the restarts.
CHIEF = "worker-0"


def task_names(num_workers: int, num_ps: int) -> List[str]:
    """`ps-<i>` then `worker-<i>`: the order in which a cluster starts its tasks."""
    return [f"ps-{i}" for i in range(num_ps)] + [f"worker-{i}" for i in range(num_workers)]


def free_ports(count: int) -> List[int]:
    """`count` distinct ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_cluster_spec(num_workers: int, num_ps: int = 1, hosts: Optional[Mapping[str, str]] = None) -> dict:
    """A cluster dict of `num_workers` workers and `num_ps` ps tasks on free localhost ports.

    `hosts` maps a task name ("ps-0", "worker-1") to the address it listens on instead of
    localhost (a task in its own network namespace, say); the port is the same free one.
    """
    hosts = hosts or {}
    ports = free_ports(num_workers + num_ps)
    spec = {"worker": [f"{hosts.get(f'worker-{i}', 'localhost')}:{p}" for i, p in enumerate(ports[:num_workers])]}
    if num_ps:
        spec["ps"] = [f"{hosts.get(f'ps-{i}', 'localhost')}:{p}" for i, p in enumerate(ports[num_workers:])]
    return spec
