"""Workers with several local devices: one replica per device, one contribution per host.

A worker (host) with several local devices (GPUs; logical CPU devices in tests)
runs one replica per device, as `MirroredStrategy` does: the host's batch is
split over the replicas, Keras scales each replica's loss by
`1 / num_replicas_in_sync` and the gradients are summed inside the host (an
all-reduce over the local devices), so their sum is the gradient of the mean
loss over the host's batch. `SyncReplicasOptimizer` then pushes **one**
contribution per host per step: N and b count hosts, as in the paper.

How the push happens once: the wrapper's `apply` runs in every replica
(replica context); it all-reduces the gradients and enters a `merge_call`,
where -- in cross-replica context, once per step -- it pushes the first
device's copy of the reduced gradients, waits, pulls, and assigns the new
values to the mirrored variables (every device's copy). A compiled step has
no merge_call: each replica writes its own gradient into the buffers, which
sum on the host's read (`tf_backup.frontend.exchange.StepBuffers`).
"""

from typing import Callable, List, Optional, Sequence, Tuple

import tensorflow as tf

from tf_backup import _checks


def resolve_devices(devices: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """The local devices a worker trains on.

    Args:
      devices: device names such as "/device:GPU:0", or None: every local GPU,
        else every logical CPU device (one, unless the program configured more
        with `tf.config.set_logical_device_configuration`).

    Raises:
      TypeError: `devices` is not a list of strings.
      ValueError: `devices` is empty, has duplicates, names a remote device
        (a job) or a device this process does not have.
    """
    if devices is None:
        gpus = tf.config.list_logical_devices("GPU")
        found = gpus or tf.config.list_logical_devices("CPU")
        return tuple(_short(d.name) for d in found)
    if isinstance(devices, str) or not isinstance(devices, (list, tuple)):
        raise TypeError(
            f"`devices` must be a list of device names or None. Received devices={devices!r}")
    if not devices:
        raise ValueError(f"`devices` must name at least one device. Received devices={devices!r}")
    local = {_short(d.name) for d in tf.config.list_logical_devices()}
    out = []
    for d in devices:
        if not isinstance(d, str):
            raise TypeError(f"`devices` must be a list of device names. Received devices={devices!r}")
        spec = tf.DeviceSpec.from_string(d)
        if spec.job is not None or spec.task is not None:
            raise ValueError(
                "`devices` names this worker's local devices; other hosts are other workers. "
                f"Received devices={devices!r}")
        name = _short(spec.to_string())
        if name not in local:
            raise ValueError(
                f"`devices` names {d!r}, which this process does not have (it has "
                f"{sorted(local)}). Received devices={devices!r}")
        out.append(name)
    if len(set(out)) != len(out):
        raise ValueError(f"`devices` has duplicates. Received devices={devices!r}")
    return tuple(out)


def local_tpu(cluster_resolver) -> Optional["tf.distribute.cluster_resolver.TPUClusterResolver"]:
    """This host's TPU system, initialized, if the host has TPU devices; else None.

    A worker on a TPU host replicates over the host's TPU cores (`TPUBackupWorkerExtended`).

    Args:
      cluster_resolver: the strategy's; a worker of several TPU hosts (`hosts_per_worker`) is refused.

    Raises:
      NotImplementedError: the worker is a group of several TPU hosts (`topology.with_ps(...,
        hosts_per_worker > 1)`): its TPU program would span hosts, which needs the pod's
        coordinator, not implemented yet.
    """
    if not tf.config.list_physical_devices("TPU"):
        return None
    hosts = getattr(cluster_resolver, "hosts_per_worker", 1)
    if hosts != 1:
        raise NotImplementedError(
            f"This worker is a group of {hosts} TPU hosts: a tf_backup worker replicates over the TPU "
            "cores of its own host only. Use hosts_per_worker=1, or pass `devices=['/device:CPU:0']`.")
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local")
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return resolver


def _short(name: str) -> str:
    spec = tf.DeviceSpec.from_string(name)
    return f"/device:{spec.device_type}:{spec.device_index or 0}"


def set_logical_cpus(count: int) -> None:
    """Splits this process's CPU into `count` logical devices (before TF initializes).

    Raises:
      TypeError, ValueError: `count` is not a positive integer.
      RuntimeError: TensorFlow has already initialized its devices with another count.
    """
    _checks.check_int("count", count, 1)
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])


def several_replicas() -> Optional[tf.distribute.ReplicaContext]:
    """The replica context when this runs in one of several local replicas, else None."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync < 2:
        return None
    return ctx


def apply_once_per_host(ctx: tf.distribute.ReplicaContext, apply_fn: Callable,
                        grads: List, variables: List, shapes: Sequence, dtypes: Sequence) -> None:
    """Sums the replicas' gradients inside the host, then calls `apply_fn` once.

    Args:
      ctx: the replica context (of several replicas).
      apply_fn: `apply_fn(grads, variables)`, run in cross-replica context with
        the reduced gradients (first device's copy); it pushes, pulls and
        assigns the mirrored variables.
      grads: this replica's gradients (loss scaled by 1 / num_replicas_in_sync).
      variables: the trainable variables (mirrored).
      shapes, dtypes: the variables' shapes and dtypes (for missing gradients).
    """
    filled = [tf.zeros(shape, dtype) if g is None else g for g, shape, dtype in zip(grads, shapes, dtypes)]
    reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, filled)

    def merge_fn(distribution, reduced):
        first = [distribution.experimental_local_results(g)[0] for g in reduced]
        apply_fn(first, variables)

    ctx.merge_call(merge_fn, args=(reduced,))
