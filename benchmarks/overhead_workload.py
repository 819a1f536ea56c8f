"""The overhead benchmark's worker program (also the bandwidth, XLA and MWMS-straggler benchmarks'):
timed fits of the MLP under tf_backup (b = 0 by default) or MWMS, and how to launch it.
"""

from typing import Any, Dict, Optional

from benchmarks import mlp_task
from benchmarks import mwms_patches
from benchmarks import pacing
from benchmarks import step_timing


def overhead_worker(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """One worker of the overhead benchmark: cfg["system"] is "tf_backup" (b = 0) or "mwms".

    For each width in cfg["hiddens"] a fresh model (`depth` hidden layers, default 2) is built and
    timed over `reps` fits of `steps` batches (batch 32 per worker, SGD, `compute` seconds of sleep per batch, plus a `straggler`
    delay keyed by worker and global step if given; tf_backup with `num_backup_workers`, and
    `strategy_kwargs` for `BackupWorkerStrategy` and `optimizer_kwargs` for `SyncReplicasOptimizer`
    if given; `cancel` for the sleep callback, `pacing.make_sleep_callback`). Worker 0 returns {hidden: [[step seconds, ...] per rep], ("cpu", hidden): [{task: CPU
    s per step} or None per rep]}; with cfg["net_counters"] also ("net", hidden): [{task: (bytes
    sent, received) per step} or None per rep] (`benchmarks.netem` links, read at worker 0's batch
    ends), and every other worker returns {("net", hidden): [(bytes sent, received) per step on its
    own link, read at its own batch ends, or None per rep]}.
    """
    pacing.keep_garbage()
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if cfg["system"] == "mwms":
        mwms_patches.patch_keras_for_multi_worker_mirrored()
        # The malloc settings our processes get (`BackupWorkerStrategy`, `serve`), so both systems
        # run with the same allocator: with glibc's defaults MWMS is slower too (WORKSPACE_NOTES).
        from tf_backup import memory  # pylint: disable=g-import-not-at-top
        memory.tune_malloc()
        strategy = mwms_patches.multi_worker_mirrored()
        worker = strategy.cluster_resolver.task_id
        make_optimizer = lambda: keras.optimizers.SGD(0.01)  # noqa: E731
    else:
        import tf_backup  # pylint: disable=g-import-not-at-top
        strategy_kwargs = dict(dict(num_backup_workers=cfg.get("num_backup_workers", 0), step_timeout=300.0),
                               **cfg.get("strategy_kwargs", {}))
        strategy = tf_backup.BackupWorkerStrategy(**strategy_kwargs)
        worker = strategy.worker_index
        make_optimizer = lambda: tf_backup.SyncReplicasOptimizer(  # noqa: E731
            keras.optimizers.SGD(0.01), **cfg.get("optimizer_kwargs", {}))
    x, y = mlp_task.random_data(worker)
    batch = cfg.get("batch", 32)
    if cfg["system"] == "mwms":
        # Keras distributes it: a global batch of batch * workers rows, split into `batch` rows per
        # worker; sharding off, as each worker already reads its own data.
        batch *= strategy.num_replicas_in_sync
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = dataset.with_options(options)
    sleeper = pacing.make_sleep_callback(keras, worker, cfg.get("compute", 0.0), cfg.get("straggler"), 0, lambda: None,
                                         strategy=strategy if cfg["system"] == "tf_backup" else None)
    sleeper.cancel = cfg.get("cancel", False)  # "restart": a superseded sleep is cut and the new step pulled
    out = {}
    for hidden in cfg["hiddens"]:
        with strategy.scope():
            model = mlp_task.build_mlp(keras, hidden, seed=0, depth=cfg.get("depth", 2))
            model.compile(optimizer=make_optimizer(), loss="sparse_categorical_crossentropy",
                          jit_compile=cfg.get("jit_compile", False))
            if cfg["system"] == "mwms":
                mwms_patches.build_for_multi_worker_mirrored(model, (x[:32], y[:32]))
        cpu = [] if worker == 0 else None
        net = [] if cfg.get("net_counters") else None
        sleeps = cfg.get("compute") or cfg.get("straggler")
        extra = ([sleeper] if sleeps else []) + ([mwms_patches.malloc_keeper(keras)] if cfg["system"] == "mwms" else [])
        out[hidden] = step_timing.timed_fits(keras, model, dataset, cfg, extra, cpu=cpu, net=net, own_link=worker != 0)
        out[("cpu", hidden)] = cpu
        if net is not None:
            out[("net", hidden)] = net
    if worker == 0:
        return out
    # The other workers' own link counters, read at their own batch ends (`step_timing.make_link_reader`).
    return {key: value for key, value in out.items() if isinstance(key, tuple) and key[0] == "net"} or None


def launch_overhead(system: str, workers: int, cfg: Dict[str, Any], timeout: float = 600, num_ps: int = 1,
                    network=None):
    """Runs `overhead_worker` on a local cluster: tf_backup (+ `num_ps` ps) or MWMS (TF_CONFIG per process).

    `network`: a `benchmarks.netem` network whose `hosts` and `command_prefix` place every task
    (default: localhost).
    """
    place = dict(hosts=network.hosts, command_prefix=network.command_prefix) if network is not None else {}
    if system == "mwms":
        from benchmarks import launcher  # pylint: disable=g-import-not-at-top
        return launcher.launch(overhead_worker, {"worker": workers}, args=(cfg,), timeout=timeout, **place)
    import tf_backup  # pylint: disable=g-import-not-at-top
    return tf_backup.launch_local(overhead_worker, workers, num_ps=num_ps, args=(cfg,), timeout=timeout, **place)
