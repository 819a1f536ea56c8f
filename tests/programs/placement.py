"""Programs of where replicas and variables live: local devices (test_local_devices.py), several ps
tasks (test_placement.py), a TPU-like resolver's hosts as workers (test_topology.py).
"""

import numpy as np

from programs import common


def train_regression_on_local_devices(steps: int, local_devices: int, inner: str = "sgd",
                                      jit_compile: bool = False):
    """Each worker runs `local_devices` logical CPU replicas on host batches of common.BATCH * local_devices.

    Worker w reads host batches w, w + W, ...; step k of the whole cluster therefore reads
    rows [k * R, (k + 1) * R) with R = W * common.BATCH * local_devices, whatever W and local_devices
    are: 2 workers x 2 devices and 4 workers x 1 device see the same rows per step.
    """
    import tf_backup.frontend.local_devices  # pylint: disable=g-import-not-at-top
    tf_backup.frontend.local_devices.set_logical_cpus(local_devices)  # before TensorFlow initializes
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(step_timeout=120.0)
    host_batch = common.BATCH * local_devices
    x, y = common.regression_data(steps * strategy.num_workers * local_devices)
    with strategy.scope():
        model = common.regression_model(keras)
        optimizer = tf_backup.SyncReplicasOptimizer(
            {"sgd": lambda: keras.optimizers.SGD(0.1), "adam": lambda: keras.optimizers.Adam(0.05)}[inner]())
        model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(host_batch).repeat()
    history = model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps, verbose=0)
    result = {
        "worker": strategy.worker_index,
        "num_replicas_in_sync": strategy.num_replicas_in_sync,
        "weights": [v.numpy() for v in model.trainable_variables],
        # Every device's copy of every variable: the in-host replicas must agree.
        "per_device": [[np.asarray(c) for c in strategy.experimental_local_results(v.value)]
                       for v in model.trainable_variables],
        "history": history.history,
        "stats": strategy.stats(),
    }
    if strategy.is_chief:
        result["contributions"] = [r.contributions for r in strategy.step_history()]
    return result


def mlp_regression_model(keras):
    """Variables of 192, 64, 512, 8, 8 and 1 elements: something to spread over ps tasks."""
    return keras.Sequential([
        keras.Input((common.FEATURES,)),
        keras.layers.Dense(64, activation="tanh", kernel_initializer=keras.initializers.GlorotUniform(1)),
        keras.layers.Dense(8, activation="tanh", kernel_initializer=keras.initializers.GlorotUniform(2)),
        keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(3)),
    ])


def make_inner_optimizer(keras, name: str):
    """The inner optimizers the tests compare with single-process training: "sgd", "momentum", "nesterov", "adam"."""
    return {"sgd": lambda: keras.optimizers.SGD(0.1),
            "momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
            "nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
            "adam": lambda: keras.optimizers.Adam(0.01)}[name]()


def train_on_several_ps(steps: int, wire_dtype: str = "float32", apply_on_ps: bool = False,
                        optimizer: str = "sgd", checkpoint_dir=None):
    """Trains `mlp_regression_model`; reports what each ps task holds of the parameters."""
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top
    from tf_backup.ps import accumulators  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(step_timeout=120.0, wire_dtype=wire_dtype, apply_on_ps=apply_on_ps,
                                              checkpoint_dir=checkpoint_dir, checkpoint_every_steps=1000)
    x, y = common.regression_data(steps * strategy.num_workers)
    with strategy.scope():
        model = mlp_regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(make_inner_optimizer(keras, optimizer)), loss="mse",
                      jit_compile=False)
    initial = [v.numpy() for v in model.trainable_variables]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(common.BATCH).repeat()
    model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps, verbose=0)
    state = strategy.extended.latest_binding().state
    ps = strategy.extended.cluster.ps
    # Look each shard up by name on every ps task, through fresh handles: where does it live?
    held = {}
    for s in range(len(state.params)):
        for t, task in enumerate(ps):
            var = accumulators.SharedVariable(f"{state.prefix}/params/{s}", state.wire, [None],
                                              strategy.extended.endpoints.of(task))
            if var.is_initialized():
                held.setdefault(t, {})[s] = var.read()
    layout = state.layout
    return {
        "worker": strategy.worker_index,
        "initial": initial,
        "weights": [v.numpy() for v in model.trainable_variables],
        "sizes": layout.sizes,
        "shards": layout.shards,
        "held": held,
        "stats": strategy.stats(),
        "local_pulls": strategy.extended.latest_binding().client.local_pulls,
    }


def train_regression_tpu_resolver(steps: int):
    """Builds the strategy from a TPU-like resolver (TPU hosts = this cluster's workers) + ps."""
    import json  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top
    from tf_backup import topology  # pylint: disable=g-import-not-at-top

    config = json.loads(os.environ["TF_CONFIG"])
    tpu_like = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": config["cluster"]["worker"]}), task_type="worker",
        task_id=config["task"]["index"], num_accelerators={"TPU": 8})
    resolver = topology.with_ps(tpu_like, ps=config["cluster"]["ps"])
    strategy = tf_backup.BackupWorkerStrategy(cluster_resolver=resolver, step_timeout=120.0)
    model = common.fit_sgd_regression(strategy, steps)
    return {"worker": strategy.worker_index, "weights": [v.numpy() for v in model.trainable_variables],
            "stats": strategy.stats(), "tpu_cores": topology.tpu_topology(resolver).replicas_per_worker}
