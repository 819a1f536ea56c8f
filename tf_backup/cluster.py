"""The cluster as tf_backup sees it: workers, ps tasks and this process's task.

A cluster comes from a TensorFlow cluster resolver (`TFConfigClusterResolver`,
`SimpleClusterResolver`, ...). tf_backup counts **workers**: the `chief` task
(if the cluster names one) followed by the `worker` tasks, in task order. Worker
0 is the chief: it runs the aggregator. Shared state (published parameters,
accumulators, the control vector) lives on the `ps` tasks.
"""

import dataclasses
import json
import os
import socket
import time
from typing import Optional, Sequence

import tensorflow as tf

WORKER_JOBS = ("chief", "worker")
PS_JOB = "ps"


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of the cluster: its job, index in that job and address."""

    job: str
    index: int
    address: str

    @property
    def device(self) -> str:
        """The task's CPU device, where tf_backup keeps shared resources."""
        return f"/job:{self.job}/replica:0/task:{self.index}/device:CPU:0"

    @property
    def target(self) -> str:
        """The gRPC target of the task's `tf.distribute.Server`."""
        return f"grpc://{self.address}"

    def __str__(self) -> str:
        return f"/job:{self.job}/task:{self.index} ({self.address})"


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """The workers and ps tasks of a cluster, and which task this process is.

    Attributes:
      workers: the workers in tf_backup order: the `chief` task first (if any),
        then the `worker` tasks by index. `workers[0]` is the chief.
      ps: the `ps` tasks by index.
      task: this process's task.
    """

    workers: tuple
    ps: tuple
    task: Task

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def chief(self) -> Task:
        return self.workers[0]

    @property
    def worker_index(self) -> int:
        """This process's index among the workers (0 is the chief)."""
        return self.workers.index(self.task)

    @property
    def is_chief(self) -> bool:
        return self.task == self.chief



def _check_address(job: str, index: int, address) -> str:
    if not isinstance(address, str) or address.count(":") < 1:
        raise ValueError(
            f"Task /job:{job}/task:{index} has a malformed address: expected "
            f"'host:port'. Received address={address!r}"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"Task /job:{job}/task:{index} has a malformed address: expected "
            f"'host:port' with a port in 1..65535. Received address={address!r}"
        )
    return address


def _tasks(spec: tf.train.ClusterSpec, job: str) -> list:
    if job not in spec.jobs:
        return []
    indices = spec.task_indices(job)
    if indices != list(range(len(indices))):
        raise ValueError(
            f"Job `{job}` must have tasks 0..{len(indices) - 1} without gaps. "
            f"Received task indices {indices}"
        )
    return [Task(job, i, _check_address(job, i, spec.task_address(job, i))) for i in indices]


def _check_distinct_addresses(tasks: Sequence[Task]) -> None:
    """Raises ValueError when two tasks share an address: one of them could not start its server."""
    seen = {}
    for task in tasks:
        if task.address in seen:
            raise ValueError(
                f"Tasks /job:{seen[task.address].job}/task:{seen[task.address].index} and "
                f"/job:{task.job}/task:{task.index} have the same address: each task needs its own "
                f"'host:port'. Received address={task.address!r}")
        seen[task.address] = task


def _check_tf_config_task_index(resolver) -> None:
    """Raises TypeError unless TF_CONFIG's task index (if any) is an integer.

    TensorFlow's `TFConfigClusterResolver` reads it with `int()`: 1.5 would be
    task 1, and "one" a ValueError that does not say where it came from.
    """
    if not isinstance(resolver, tf.distribute.cluster_resolver.TFConfigClusterResolver):
        return
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task") if isinstance(config, dict) else None
    if isinstance(task, dict) and "index" in task:
        index = task["index"]
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"TF_CONFIG's task index must be an integer. Received index={index!r} in "
                            f"TF_CONFIG's task={task!r}")


def cluster_info_from_resolver(resolver, *, require_ps: bool = True) -> ClusterInfo:
    """Reads a cluster resolver into a `ClusterInfo`, validating it.

    Args:
      resolver: a `tf.distribute.cluster_resolver.ClusterResolver`.
      require_ps: whether the cluster must have a `ps` job.

    Raises:
      TypeError: `resolver` is not a cluster resolver, or the task index is
        not an integer.
      ValueError: the cluster has no worker job, more than one chief, no ps
        job, gaps in a job's task indices, malformed or shared addresses, or
        does not name this process's task.
    """
    if not isinstance(resolver, tf.distribute.cluster_resolver.ClusterResolver):
        raise TypeError(
            "`cluster_resolver` must be a tf.distribute.cluster_resolver."
            f"ClusterResolver. Received cluster_resolver={resolver!r}"
        )
    try:
        spec = resolver.cluster_spec()
        _check_tf_config_task_index(resolver)
        task_type, task_id = resolver.task_type, resolver.task_id
    except json.JSONDecodeError as e:  # TFConfigClusterResolver parses TF_CONFIG on each access
        raise ValueError(
            f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos}). Received "
            f"TF_CONFIG={os.environ.get('TF_CONFIG', '')[:300]!r}"
        ) from e
    workers = _tasks(spec, "chief") + _tasks(spec, "worker")
    described = spec.as_dict() or "{} (is TF_CONFIG set?)"
    if not workers:
        raise ValueError(
            "The cluster has no `worker` or `chief` job, so there is nothing to "
            f"train on. Received cluster_spec={described}"
        )
    if len(_tasks(spec, "chief")) > 1:
        raise ValueError(
            f"The cluster may name at most one `chief` task. Received cluster_spec={described}"
        )
    ps = _tasks(spec, PS_JOB)
    if require_ps and not ps:
        raise ValueError(
            "The cluster has no `ps` job: tf_backup keeps the published "
            "parameters and the gradient accumulators on ps tasks (run "
            f"`tf_backup.serve()` there). Received cluster_spec={described}"
        )
    unknown = sorted(set(spec.jobs) - set(WORKER_JOBS) - {PS_JOB})
    if unknown:
        raise ValueError(
            f"tf_backup knows the jobs `chief`, `worker` and `ps`. Received jobs {unknown} "
            f"in cluster_spec={described}"
        )
    _check_distinct_addresses(workers + ps)
    if task_type is None or task_id is None:
        raise ValueError(
            "The cluster resolver does not name this process's task "
            f"(task_type={task_type!r}, task_id={task_id!r}); set TF_CONFIG's "
            "'task' or pass task_type/task_id to the resolver."
        )
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise TypeError(f"`task_id` must be an integer. Received task_id={task_id!r}")
    for task in workers + ps:
        if task.job == task_type and task.index == task_id:
            return ClusterInfo(workers=tuple(workers), ps=tuple(ps), task=task)
    raise ValueError(
        f"This process's task /job:{task_type}/task:{task_id} is not in the "
        f"cluster. Received cluster_spec={described}"
    )


def wait_for_tasks(tasks: Sequence[Task], timeout: float, *, waiter: Optional[str] = None) -> None:
    """Waits until every task's address accepts TCP connections.

    A remote TensorFlow op to a task that is not up yet blocks without an error
    (TF 2.21), so tf_backup checks reachability first.

    Raises:
      TimeoutError: naming the tasks still unreachable after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    pending = list(tasks)
    while pending:
        still = []
        for task in pending:
            host, _, port = task.address.rpartition(":")
            try:
                with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                    pass
            except OSError:
                still.append(task)
        pending = still
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(str(t) for t in pending)
            who = f"{waiter} " if waiter else ""
            raise TimeoutError(
                f"{who}waited {timeout:.0f} s for {names} to accept connections. "
                "Is the task started, and is its address right?"
            )
        time.sleep(0.25)
