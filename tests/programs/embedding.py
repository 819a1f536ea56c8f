"""Programs of the Embedding tests (test_embedding.py; compiled in test_compiled.py): tables whose
gradients are IndexedSlices.
"""

import numpy as np

from programs import common


VOCAB = 400
TOKENS = 4


def embedding_data(num_rows: int, seed: int = 0):
    """Token sequences whose target is a fixed per-token score summed over the sequence."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, size=(num_rows, TOKENS)).astype(np.int32)
    score = rng.normal(size=VOCAB).astype(np.float32)
    return x, score[x].sum(axis=1, keepdims=True).astype(np.float32)


def embedding_model(keras):
    return keras.Sequential([
        keras.Input((TOKENS,), dtype="int32"),
        keras.layers.Embedding(VOCAB, 3, embeddings_initializer=keras.initializers.RandomNormal(seed=4)),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(5)),
    ])


def gather_model(keras):
    """`embedding_model` with a custom layer reading its table by `tf.gather` instead of an Embedding."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    class Lookup(keras.layers.Layer):
        def build(self, input_shape):
            self.table = self.add_weight(name="table", shape=(VOCAB, 3),
                                         initializer=keras.initializers.RandomNormal(seed=4))

        def call(self, tokens):
            return tf.gather(self.table, tokens)

    return keras.Sequential([
        keras.Input((TOKENS,), dtype="int32"),
        Lookup(name="lookup"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(5)),
    ])


class RestartProbe:
    """Keras callback: calls `strategy.restart_superseded()` before the second batch, as a straggler
    callback with `restart=True` does after a cut sleep; `outcome` is what it returned, or
    (error type, message)."""

    def __init__(self, strategy):
        import keras  # pylint: disable=g-import-not-at-top
        self.outcome = "not called"
        outer = self

        class _Callback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                if batch != 1:
                    return
                try:
                    outer.outcome = strategy.restart_superseded()
                except Exception as e:  # pylint: disable=broad-except
                    outer.outcome = (type(e).__name__, str(e))

        self.callback = _Callback()


def train_embedding(steps: int, local_devices: int = 1, num_backup_workers: int = 0, slow_worker: int = -1,
                    checkpoint_dir=None, gather: bool = False, sparse_variables=None, jit_compile: bool = False):
    """An Embedding model (IndexedSlices gradients) through model.fit; host batch common.BATCH * local_devices.

    `gather`: the table is a custom layer's, read by `tf.gather` (`gather_model`).
    """
    import tf_backup.frontend.local_devices  # pylint: disable=g-import-not-at-top
    tf_backup.frontend.local_devices.set_logical_cpus(local_devices)
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=num_backup_workers, step_timeout=120.0,
                                              checkpoint_dir=checkpoint_dir)
    host_batch = common.BATCH * local_devices
    x, y = embedding_data(steps * strategy.num_workers * host_batch)
    with strategy.scope():
        model = gather_model(keras) if gather else embedding_model(keras)
        inner = keras.optimizers.SGD(0.5, momentum=0.5 if checkpoint_dir else 0.0)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(inner, sparse_variables=sparse_variables),
                      loss="mse", jit_compile=jit_compile)
        if checkpoint_dir:
            model.optimizer.build(model.trainable_variables)  # restores the checkpoint
    initial = [v.numpy() for v in model.trainable_variables]
    # A compiled step's row buffers have a fixed size: static batches.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(host_batch, drop_remainder=jit_compile).repeat()
    restart = RestartProbe(strategy)  # where a straggler callback with `restart=True` calls it
    callbacks = [restart.callback]
    if strategy.worker_index == slow_worker:
        callbacks.append(common.WaitUntilStale(strategy, 0.2, last_step=steps).callback)
    history = model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps, verbose=0,
                        callbacks=callbacks)
    counters = strategy.counters()
    return {"worker": strategy.worker_index, "initial": initial,
            "weights": [v.numpy() for v in model.trainable_variables],
            "loss": history.history["loss"], "stats": strategy.stats(),
            # What goes through the dense flat shards, and which tables go by rows.
            "dense_elements": counters.dense_elements,
            "sparse_tables": counters.sparse_tables,
            "master": None if not strategy.is_chief else [v.numpy() for v in model.optimizer.master_variables],
            "initial_step": strategy.initial_step, "restart_superseded": restart.outcome}


def train_embedding_through_a_fault(steps: int, progress_dir: str, ps_restart_timeout: float = 0.0,
                                    chief_rejoins: bool = False, checkpoint_dir=None):
    """`embedding_model` on 2 workers (b = 0) for a killed task: writes `<task>.step` after every batch.

    With `ps_restart_timeout` or `chief_rejoins`, which Embedding tables do not support yet: a ps task
    killed and restarted, or a chief killed and restarted, makes the chief fail, saying so (test_embedding.py).
    """
    import os  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(
        step_timeout=60.0, ps_timeout=5.0, chief_timeout=30.0, max_steps=steps, checkpoint_dir=checkpoint_dir,
        checkpoint_every_steps=5, ps_restart_timeout=ps_restart_timeout, chief_rejoins=chief_rejoins)
    task = os.environ["TF_BACKUP_TASK"]
    x, y = embedding_data(steps * strategy.num_workers * common.BATCH)
    with strategy.scope():
        model = embedding_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.5)), loss="mse")
        model.optimizer.build(model.trainable_variables)  # restores the checkpoint, joins (or rejoins) the job

    class Progress(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            time.sleep(0.05)

        def on_train_batch_end(self, batch, logs=None):
            common.write_atomic(os.path.join(progress_dir, f"{task}.step"), str(int(logs["global_step"])))

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(common.BATCH).repeat()
    model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps, verbose=0,
              callbacks=[Progress()])
    return {"worker": strategy.worker_index, "step": strategy.counters().step}
