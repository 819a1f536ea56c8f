"""TPU pods: which TPU hosts make one backup worker, which one is the chief.

TPUs run in lock step inside a slice, so on a TPU pod a backup worker is a
group of TPU hosts (one host, or a whole slice): its replicas are the TPU
cores of those hosts, replicated in-slice as `TPUStrategy` does, and the
backup-worker protocol runs *between* the groups. A TPU cluster resolver
(`TPUClusterResolver`, or a `SimpleClusterResolver` reporting TPU
accelerators) describes the pod as a `worker` job with one task per TPU host
and `num_accelerators()["TPU"]` cores per host; the ps tasks (CPU hosts
running `tf_backup.serve()`) are a `ps` job beside it (`with_ps`).

The mapping (`tpu_topology`):

* hosts `[g*k, (g+1)*k)` form worker `g`, for `k = hosts_per_worker`;
* a worker's program runs on the first host of its group (its client),
  which names the worker in tf_backup's messages; the group's other hosts
  only serve their TPU cores;
* worker 0 (hosts `0..k-1`) is the chief;
* each worker runs `k * cores_per_host` replicas; with `num_backup_workers=b`
  a step waits for `N = workers - b` groups.
"""

import dataclasses
from typing import Optional, Sequence, Tuple

import tensorflow as tf

from tf_backup import _checks
from tf_backup import cluster as cluster_lib

_TPU_RESOLVERS = (tf.distribute.cluster_resolver.TPUClusterResolver,
                  tf.distribute.cluster_resolver.SimpleClusterResolver)


class TPUPodResolver(tf.distribute.cluster_resolver.SimpleClusterResolver):
    """A TPU pod's resolver with tf_backup's `ps` tasks and worker grouping.

    Made by `with_ps`; a `SimpleClusterResolver` whose `worker` job is the TPU
    hosts, plus `hosts_per_worker`.
    """

    def __init__(self, cluster_spec, task_type, task_id, cores_per_host: int, hosts_per_worker: int,
                 master: str = "", rpc_layer: Optional[str] = "grpc"):
        super().__init__(cluster_spec, master=master, task_type=task_type, task_id=task_id,
                         num_accelerators={"TPU": cores_per_host}, rpc_layer=rpc_layer)
        self.hosts_per_worker = hosts_per_worker


def with_ps(tpu_resolver, ps: Sequence[str], *, hosts_per_worker: int = 1, task_type: Optional[str] = None,
            task_id: Optional[int] = None) -> TPUPodResolver:
    """A TPU pod's resolver plus the ps tasks, for `BackupWorkerStrategy` and `serve()`.

    Args:
      tpu_resolver: a `TPUClusterResolver` (or a TPU-like `SimpleClusterResolver`)
        whose `worker` job lists the TPU hosts.
      ps: "host:port" of each ps task.
      hosts_per_worker: TPU hosts per backup worker (1: each host is a worker;
        the hosts of a slice: each slice is a worker).
      task_type, task_id: this process's task, default the resolver's
        (a ps process passes "ps" and its index).

    Raises:
      TypeError, ValueError: as `tpu_topology`, naming the bad argument.
    """
    cores = _tpu_cores(tpu_resolver)
    if cores is None:
        raise ValueError(
            "`tpu_resolver` must be a TPUClusterResolver or a SimpleClusterResolver reporting TPU "
            f"accelerators. Received tpu_resolver={tpu_resolver!r}")
    if isinstance(ps, str) or not isinstance(ps, (list, tuple)) or not ps:
        raise ValueError(f"`ps` must be a non-empty list of 'host:port' addresses. Received ps={ps!r}")
    _checks.check_int("hosts_per_worker", hosts_per_worker, 1)
    spec = tpu_resolver.cluster_spec().as_dict()
    spec["ps"] = list(ps)
    resolver = TPUPodResolver(
        tf.train.ClusterSpec(spec),
        task_type if task_type is not None else tpu_resolver.task_type,
        task_id if task_id is not None else tpu_resolver.task_id,
        cores_per_host=cores, hosts_per_worker=hosts_per_worker)
    tpu_topology(resolver)  # validates the mapping now, not in every task later
    return resolver


def _tpu_cores(resolver) -> Optional[int]:
    """TPU cores per host when `resolver` describes TPU hosts, else None."""
    if not isinstance(resolver, _TPU_RESOLVERS):
        return None  # e.g. TFConfigClusterResolver: asking it would open a session to its master
    try:
        accelerators = resolver.num_accelerators() or {}
    except (tf.errors.OpError, ValueError, RuntimeError):
        return None
    cores = accelerators.get("TPU", 0)
    return int(cores) if cores else None


@dataclasses.dataclass(frozen=True)
class TPUTopology:
    """How a TPU pod maps onto tf_backup's workers.

    Attributes:
      info: the `ClusterInfo`: one worker per host group (named by its first
        host), the ps tasks, this process's task.
      hosts: every TPU host, in the resolver's `worker` order.
      groups: per worker, the indices of its hosts.
      cores_per_host: TPU cores of one host.
      hosts_per_worker: hosts per worker.
    """

    info: cluster_lib.ClusterInfo
    hosts: Tuple[cluster_lib.Task, ...]
    groups: Tuple[Tuple[int, ...], ...]
    cores_per_host: int
    hosts_per_worker: int

    @property
    def replicas_per_worker(self) -> int:
        """In-slice replicas of one worker: its TPU cores."""
        return self.cores_per_host * self.hosts_per_worker

    @property
    def chief_hosts(self) -> Tuple[cluster_lib.Task, ...]:
        return tuple(self.hosts[h] for h in self.groups[0])

    def backup_workers(self, num_backup_workers: int) -> Tuple[int, ...]:
        """The workers that are backups with `num_backup_workers` = b: any b can be late
        each step; by convention the last b (the chief, worker 0, never is one)."""
        if isinstance(num_backup_workers, bool) or not isinstance(num_backup_workers, int) or not (
                0 <= num_backup_workers < self.info.num_workers):
            raise ValueError(
                f"`num_backup_workers` must be an integer in [0, {self.info.num_workers - 1}]. "
                f"Received num_backup_workers={num_backup_workers!r}")
        return tuple(range(self.info.num_workers - num_backup_workers, self.info.num_workers))


def tpu_topology(resolver) -> Optional[TPUTopology]:
    """The TPU pod mapping of `resolver`, or None when it does not describe TPU hosts.

    Raises:
      ValueError: the hosts do not divide into groups of `hosts_per_worker`,
        the cluster has jobs other than `worker` and `ps`, or this process is
        a TPU host that is not the first of its group (only that one runs
        the worker's program).
    """
    cores = _tpu_cores(resolver)
    if cores is None:
        return None
    k = _checks.check_int("hosts_per_worker", getattr(resolver, "hosts_per_worker", 1), 1)
    spec = resolver.cluster_spec()
    described = spec.as_dict()
    unknown = sorted(set(spec.jobs) - {"worker", cluster_lib.PS_JOB})
    if unknown:
        raise ValueError(
            f"A TPU pod's cluster has a `worker` job (the TPU hosts) and a `ps` job. Received jobs "
            f"{unknown} in cluster_spec={described}")
    hosts = cluster_lib._tasks(spec, "worker")  # pylint: disable=protected-access
    ps = cluster_lib._tasks(spec, cluster_lib.PS_JOB)  # pylint: disable=protected-access
    cluster_lib._check_distinct_addresses(hosts + ps)  # pylint: disable=protected-access
    if not hosts:
        raise ValueError(f"The TPU cluster has no `worker` job (TPU hosts). Received cluster_spec={described}")
    if len(hosts) % k:
        raise ValueError(
            f"The {len(hosts)} TPU hosts do not divide into workers of `hosts_per_worker` hosts. "
            f"Received hosts_per_worker={k}")
    groups = tuple(tuple(range(g * k, (g + 1) * k)) for g in range(len(hosts) // k))
    workers = tuple(hosts[group[0]] for group in groups)
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == cluster_lib.PS_JOB and task_id is not None and 0 <= task_id < len(ps):
        task = ps[task_id]
    elif task_type == "worker" and task_id is not None and 0 <= task_id < len(hosts):
        task = hosts[task_id]
        if task not in workers:
            first = hosts[groups[task_id // k][0]]
            raise ValueError(
                f"TPU host {task_id} belongs to worker {task_id // k}, whose program runs on its "
                f"first host {first}: run the training program there only. Received task_id={task_id}")
    else:
        raise ValueError(
            f"This process's task /job:{task_type}/task:{task_id} is not in the TPU cluster. "
            f"Received cluster_spec={described}")
    info = cluster_lib.ClusterInfo(workers=workers, ps=tuple(ps), task=task)
    return TPUTopology(info=info, hosts=tuple(hosts), groups=groups, cores_per_host=cores,
                       hosts_per_worker=k)


def cluster_info(resolver, *, require_ps: bool = True) -> cluster_lib.ClusterInfo:
    """`ClusterInfo` of any resolver: a TPU pod's grouping, or the usual tasks."""
    if not isinstance(resolver, tf.distribute.cluster_resolver.ClusterResolver):
        return cluster_lib.cluster_info_from_resolver(resolver, require_ps=require_ps)  # raises TypeError
    topology = tpu_topology(resolver)
    if topology is None:
        return cluster_lib.cluster_info_from_resolver(resolver, require_ps=require_ps)
    if require_ps and not topology.info.ps:
        raise ValueError(
            "The TPU cluster has no `ps` job: add the ps tasks with `tf_backup.topology.with_ps(resolver, "
            f"ps=[...])`. Received cluster_spec={resolver.cluster_spec().as_dict()}")
    return topology.info
