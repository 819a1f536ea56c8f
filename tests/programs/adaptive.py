"""Program of the adaptive-N test (test_adaptive.py)."""

import time

import numpy as np

from programs import common


def train_adaptive(slow_steps: int, fast_steps: int, seconds: float = 0.05, slow_worker: int = 3, window: int = 20):
    """`num_backup_workers="auto"` on pure-noise regression (labels independent of the inputs: a
    high noise scale); every worker sleeps `seconds` before each batch, `slow_worker` 10x as long
    until the global step reaches `slow_steps`. Returns the chief's N and noise scale per step."""
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers="auto", adaptive_window=window, step_timeout=120.0)
    rng = np.random.default_rng(strategy.worker_index)
    x = rng.normal(size=(64 * common.BATCH, common.FEATURES)).astype(np.float32)
    y = rng.normal(size=(64 * common.BATCH, 1)).astype(np.float32)
    steps = slow_steps + fast_steps
    seen = {"step": 0}

    class Sleep(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            slow = strategy.worker_index == slow_worker and seen["step"] < slow_steps
            time.sleep(seconds * (10 if slow else 1))

        def on_train_batch_end(self, batch, logs=None):
            seen["step"] = int(logs["global_step"])

    with strategy.scope():
        model = common.regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(common.BATCH).repeat()
    history = model.fit(strategy.distribute_dataset(dataset), epochs=steps // 10, steps_per_epoch=10, verbose=0,
                        callbacks=[Sleep()])
    result = {"worker": strategy.worker_index, "history": history.history, "stats": strategy.stats(),
              "num_backup_workers": strategy.num_backup_workers, "adaptive": strategy.adaptive}
    if strategy.is_chief:
        records = strategy.step_history()
        result["replicas"] = [r.replicas for r in records]
        result["taken"] = [r.taken for r in records]
        result["noise_scale"] = [r.noise_scale for r in records]
        result["slow_workers"] = [(r.step, r.slow_workers) for r in records]
        result["change_points"] = [(r.step, r.change_points) for r in records]
        result["expected_seconds"] = [r.expected_seconds for r in records]
        result["slow_now"] = strategy.slow_workers()
    return result
