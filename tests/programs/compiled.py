"""Programs of the compiled-step tests (test_compiled.py): XLA replica steps, custom loops, mixed precision."""

import numpy as np

from programs import common


def _regression_replica_step(strategy, jit_compile: bool):
    """The regression model, its optimizer and the replica step of a custom loop, as docs/compiled_steps.md
    writes them: `tf.function(replica_step, jit_compile=...)`, for `strategy.run`."""
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    with strategy.scope():
        model = common.regression_model(keras)
        optimizer = tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1))
        optimizer.build(model.trainable_variables)

    def replica_step(features, labels):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(features, training=True) - labels))
            loss = loss / strategy.num_replicas_in_sync  # the replicas' gradients are summed in the host
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return model, optimizer, tf.function(replica_step, jit_compile=jit_compile)


def train_regression_custom_loop(steps: int, local_devices: int = 1, jit_compile: bool = True,
                                 always_split: bool = False):
    """`train_regression_on_local_devices` in a custom loop whose replica function is compiled.

    The loop is a `tf.function` without jit_compile around `strategy.run` of a
    `tf.function(jit_compile=True)` replica step: the exchange runs in `run`,
    after the compiled step, on the host.
    """
    import tf_backup.frontend.local_devices  # pylint: disable=g-import-not-at-top
    tf_backup.frontend.local_devices.set_logical_cpus(local_devices)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(step_timeout=120.0)
    strategy.extended.always_split = always_split
    host_batch = common.BATCH * local_devices
    x, y = common.regression_data(steps * strategy.num_workers * local_devices)
    model, optimizer, replica = _regression_replica_step(strategy, jit_compile)

    @tf.function
    def train_step(iterator):
        features, labels = next(iterator)
        return strategy.run(replica, args=(features, labels))

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(host_batch).repeat()
    iterator = iter(strategy.distribute_dataset(dataset))
    done = 0
    try:
        for _ in range(steps):
            train_step(iterator)
            done += 1
    except tf.errors.OutOfRangeError:  # another worker ended the round first
        pass
    optimizer.finalize_variable_values(model.trainable_variables)  # ends the round, pulls the last step
    return {"worker": strategy.worker_index, "steps_run": done,
            "weights": [v.numpy() for v in model.trainable_variables], "stats": strategy.stats(),
            "per_device": [[np.asarray(c) for c in strategy.experimental_local_results(v.value)]
                           for v in model.trainable_variables],
            "optimizer_iterations": int(optimizer.iterations.numpy())}


def train_mixed_precision(steps: int, jit_compile: bool):
    """`train_regression` under the `mixed_float16` policy: Keras wraps SyncReplicasOptimizer in a
    LossScaleOptimizer, which unscales the gradients before our apply."""
    import keras  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = tf_backup.BackupWorkerStrategy(step_timeout=120.0)
    model = common.fit_sgd_regression(strategy, steps, jit_compile)
    return {"worker": strategy.worker_index, "optimizer": type(model.optimizer).__name__,
            "weights": [v.numpy() for v in model.trainable_variables], "stats": strategy.stats(),
            "loss_scale": float(model.optimizer.dynamic_scale.numpy())}


class BatchTrajectory:
    """Keras callback: after each batch, the logged loss and the loss scale of the model's optimizer."""

    def __init__(self):
        import keras  # pylint: disable=g-import-not-at-top
        self.losses, self.scales = [], []
        outer = self

        class _Callback(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                outer.losses.append(float(logs["loss"]))
                outer.scales.append(float(self.model.optimizer.dynamic_scale.numpy()))

        self.callback = _Callback()


def mixed_precision_trajectories(steps: int, jit_values=(False, True)):
    """One worker (N = 1, b = 0), `mixed_float16`: `fit_sgd_regression`'s model trained once per
    `jit_compile` value (a fresh model and shared state each), with each batch's loss and loss scale.

    Worker 0 of 1 reads batches 0, 1, 2, ... of `regression_data`: what a single-process Keras
    `fit` of the same model reads, so the two follow the same trajectory.
    """
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = tf_backup.BackupWorkerStrategy(step_timeout=120.0)
    x, y = common.regression_data(steps)
    runs = []
    for jit_compile in jit_values:
        with strategy.scope():
            model = common.regression_model(keras)
            model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)), loss="mse",
                          jit_compile=jit_compile)
        trajectory = BatchTrajectory()
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(common.BATCH).repeat()
        model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps, verbose=0,
                  callbacks=[trajectory.callback])
        runs.append({"jit_compile": jit_compile, "optimizer": type(model.optimizer).__name__,
                     "weights": [v.numpy() for v in model.trainable_variables], "stats": strategy.stats(),
                     "losses": trajectory.losses, "scales": trajectory.scales})
    return runs


def mixed_precision_reference(steps: int):
    """`mixed_precision_trajectories`'s model in plain Keras, one process, no strategy: Keras's own
    LossScaleOptimizer around SGD(0.1), on the same batches from the same (zero) initial weights.

    Sets the `mixed_float16` policy for the build and restores the caller's afterwards.
    """
    import keras  # pylint: disable=g-import-not-at-top

    x, y = common.regression_data(steps)
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = common.regression_model(keras)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
    finally:
        keras.mixed_precision.set_global_policy(before)
    trajectory = BatchTrajectory()
    model.fit(x, y, batch_size=common.BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[trajectory.callback])
    return {"optimizer": type(model.optimizer).__name__, "weights": [v.numpy() for v in model.trainable_variables],
            "applied": int(model.optimizer.inner_optimizer.iterations.numpy()),
            "losses": trajectory.losses, "scales": trajectory.scales}


def inspect_compiled_step():
    """Traces one compiled replica step (the SyncReplicasOptimizer step inside XLA) and reports the ops.

    Returns, for the XLA function and for the host function around it, the op
    types and the devices their ops name; the step is also run once, so the
    exchange outside the compiled function is checked to work.
    """
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(step_timeout=60.0)
    x, y = common.regression_data(2)
    with strategy.scope():
        model = common.regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
        model.optimizer.build(model.trainable_variables)
    replica = tf.function(model.train_step, jit_compile=True)

    @tf.function
    def step(features, labels):
        return strategy.run(replica, args=((features, labels),))

    concrete = step.get_concrete_function(tf.TensorSpec([common.BATCH, common.FEATURES], tf.float32),
                                          tf.TensorSpec([common.BATCH, 1], tf.float32))
    graph = concrete.graph.as_graph_def()

    def describe(nodes):
        return {"ops": sorted({n.op for n in nodes}), "devices": sorted({n.device for n in nodes if n.device})}

    library = {f.signature.name: f for f in graph.library.function}
    compiled = [f for f in library.values() if f.attr["_XlaMustCompile"].b]
    logs = step(tf.constant(x[:common.BATCH]), tf.constant(y[:common.BATCH]))
    return {
        "compiled": [describe(f.node_def) for f in compiled],
        "host": describe(list(graph.node) + [n for name, f in library.items() if f not in compiled
                                             for n in f.node_def]),
        "global_step": int(logs["global_step"]), "stats": strategy.stats(),
    }


def inspect_multi_device_custom_loop():
    """The multi-device custom loop of docs/compiled_steps.md as a user writes it, on 2 logical CPU devices:
    `strategy.run(tf.function(step_fn, jit_compile=True), args=...)`, nothing set but `jit_compile`.

    Traces one step and reports, as `inspect_compiled_step` does, the ops and devices of the XLA
    functions and of the host function around them. Then runs the step once: XLA cannot run it on logical CPU devices (they share one XLA
    device; WORKSPACE_NOTES.md), so the error is returned as (type, message), or None if it ran.
    """
    import tf_backup.frontend.local_devices  # pylint: disable=g-import-not-at-top
    tf_backup.frontend.local_devices.set_logical_cpus(2)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(step_timeout=60.0)
    x, y = common.regression_data(2)
    _, _, replica = _regression_replica_step(strategy, jit_compile=True)

    @tf.function
    def step(features, labels):
        return strategy.run(replica, args=(features, labels))

    concrete = step.get_concrete_function(tf.TensorSpec([common.BATCH, common.FEATURES], tf.float32),
                                          tf.TensorSpec([common.BATCH, 1], tf.float32))
    graph = concrete.graph.as_graph_def()
    library = {f.signature.name: f for f in graph.library.function}
    compiled = {name for name, f in library.items() if f.attr["_XlaMustCompile"].b}
    host_nodes = list(graph.node) + [n for name, f in library.items() if name not in compiled for n in f.node_def]

    def describe(nodes):
        return {"ops": sorted({n.op for n in nodes}), "devices": sorted({n.device for n in nodes if n.device})}

    try:
        step(tf.constant(x[:common.BATCH]), tf.constant(y[:common.BATCH]))
        error = None
    except Exception as e:  # pylint: disable=broad-except
        error = (type(e).__name__, str(e))
    return {"replicas": strategy.num_replicas_in_sync, "compiled": [describe(library[n].node_def) for n in compiled],
            "host": describe(host_nodes), "error": error}


def compiled_step_errors(local_devices: int = 1, embedding: bool = False):
    """The errors of compiled steps that cannot work; returns {case: (error type, message)}.

    `embedding`: only an Embedding model's compiled step fed batches of no fixed size (a fresh
    strategy: the other cases leave an error on it).
    """
    import tf_backup.frontend.local_devices  # pylint: disable=g-import-not-at-top
    tf_backup.frontend.local_devices.set_logical_cpus(local_devices)
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(step_timeout=60.0)
    x, y = common.regression_data(4)
    with strategy.scope():
        model = common.regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)), loss="mse",
                      jit_compile=True)
        model.optimizer.build(model.trainable_variables)
    out = {}

    def record(case, fn):
        try:
            fn()
            out[case] = None
        except Exception as e:  # pylint: disable=broad-except
            out[case] = (type(e).__name__, str(e))

    if embedding:
        # An Embedding model compiled with XLA, fed batches of no fixed size: its rows cannot go through
        # buffers of a fixed size (refused when the step is first traced, before anything is pushed).
        from programs import embedding as embedding_lib  # pylint: disable=g-import-not-at-top
        tokens, targets = embedding_lib.embedding_data(4 * common.BATCH)
        with strategy.scope():
            tables = embedding_lib.embedding_model(keras)
            tables.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)), loss="mse",
                           jit_compile=True)
        ragged = tf.data.Dataset.from_tensor_slices((tokens, targets)).batch(common.BATCH).repeat()  # no drop_remainder
        record("embedding_without_drop_remainder", lambda: tables.fit(
            strategy.distribute_dataset(ragged), epochs=1, steps_per_epoch=2, verbose=0))
        return out

    if local_devices > 1:
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(common.BATCH * local_devices).repeat()
        record("keras_jit_several_devices", lambda: model.fit(
            strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=1, verbose=0))
        return out

    def replica_step(features, labels):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(features) - labels))
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function(jit_compile=True)
    def run_inside_xla(features, labels):
        return strategy.run(replica_step, args=(features, labels))

    record("custom_loop_run_inside_xla", lambda: run_inside_xla(x[:common.BATCH], y[:common.BATCH]))

    # Keras's train step inside XLA, fed twice without the strategy's iterator: the first
    # gradient is never exchanged.
    @tf.function(jit_compile=True)
    def keras_step_without_iterator(features, labels):
        return strategy.run(model.train_step, args=((features, labels),))

    def twice():
        keras_step_without_iterator(x[:common.BATCH], y[:common.BATCH])
        keras_step_without_iterator(x[common.BATCH:2 * common.BATCH], y[common.BATCH:2 * common.BATCH])
        strategy.extended.exchange_pending()

    record("two_steps_one_exchange", twice)

    return out
