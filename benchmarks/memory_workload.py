"""The ps-memory benchmark's worker program: one long fit, its progress in files the driver reads."""

import time
from typing import Any, Dict, Optional

from benchmarks import mlp_task
from benchmarks import pacing


def memory_worker(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """One worker of the ps-memory benchmark: one long fit of `steps` batches, no sleeps.

    cfg: steps, num_backup_workers, hidden, compute (seconds each worker sleeps before each
    batch), worker_timeout, progress_dir (every 20 batches each worker writes its global step to
    `<progress_dir>/<task>.step`, which the driver reads). The chief returns its stats and the ps's
    wake-up queue sizes at the end.
    """
    pacing.keep_garbage()
    import os  # pylint: disable=g-import-not-at-top
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=cfg["num_backup_workers"],
                                              worker_timeout=cfg["worker_timeout"], step_timeout=120.0,
                                              max_steps=cfg["steps"])
    path = os.path.join(cfg["progress_dir"], os.environ["TF_BACKUP_TASK"] + ".step")

    class Progress(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            time.sleep(cfg["compute"])

        def on_train_batch_end(self, batch, logs=None):
            if batch % 20 == 0:
                with open(path + ".tmp", "w") as f:
                    f.write(str(int(logs["global_step"])))
                os.replace(path + ".tmp", path)

    x, y = mlp_task.random_data(strategy.worker_index)
    with strategy.scope():
        model = mlp_task.build_mlp(keras, cfg["hidden"])
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.01)),
                      loss="sparse_categorical_crossentropy", jit_compile=False)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()
    model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=cfg["steps"], verbose=0,
              callbacks=[Progress()])
    if not strategy.is_chief:
        return None
    return {"stats": strategy.stats(), "wake_queue_sizes": strategy.extended.latest_binding().state.wake_queue_sizes()}
