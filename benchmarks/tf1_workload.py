"""Item 4's programs: the same b = 0 job in TF1's SyncReplicasOptimizer (graph mode) and in tf_backup.

W workers each compute, at step k, the gradient of the mean softmax cross-entropy of a 40-h-10 MLP
(ReLU, logits) on rows [(k W + i) 32, (k W + i + 1) 32) of one fixed data set, from the same
initial weights; the W gradients are averaged and applied with plain SGD. Both return the final
weights and the chief's step times (seconds between consecutive steps).
"""

import time
from typing import Any, Dict, List

import numpy as np

BATCH = 32
INPUT_DIM = 40
CLASSES = 10


def initial_weights(hidden: int, seed: int = 0) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    lim1, lim2 = np.sqrt(6 / (INPUT_DIM + hidden)), np.sqrt(6 / (hidden + CLASSES))
    return [rng.uniform(-lim1, lim1, (INPUT_DIM, hidden)).astype(np.float32), np.zeros(hidden, np.float32),
            rng.uniform(-lim2, lim2, (hidden, CLASSES)).astype(np.float32), np.zeros(CLASSES, np.float32)]


def fixed_data(rows: int, seed: int = 7):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, INPUT_DIM)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=rows).astype(np.int32)
    return x, y


def worker_rows(worker: int, workers: int, steps: int) -> np.ndarray:
    return np.concatenate([np.arange((k * workers + worker) * BATCH, (k * workers + worker + 1) * BATCH)
                           for k in range(steps)])


def reference_weights(cfg: Dict[str, Any]) -> List[np.ndarray]:
    """Single-process numpy large-batch SGD: what both must compute."""
    w1, b1, w2, b2 = [w.astype(np.float64) for w in initial_weights(cfg["hidden"])]
    x, y = fixed_data(cfg["steps"] * cfg["workers"] * BATCH)
    for k in range(cfg["steps"]):
        grads = []
        for i in range(cfg["workers"]):
            rows = slice((k * cfg["workers"] + i) * BATCH, (k * cfg["workers"] + i + 1) * BATCH)
            xb, yb = x[rows].astype(np.float64), y[rows]
            h = np.maximum(xb @ w1 + b1, 0)
            z = h @ w2 + b2
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(yb)), yb] -= 1
            dz = p / len(yb)
            dh = (dz @ w2.T) * (h > 0)
            grads.append([xb.T @ dh, dh.sum(0), h.T @ dz, dz.sum(0)])
        for var, g in zip((w1, b1, w2, b2), zip(*grads)):
            var -= cfg["lr"] * np.mean(g, axis=0)
    return [w1, b1, w2, b2]


def tf1_task(cfg: Dict[str, Any]):
    """A task of the TF1 job (ps or worker), between-graph replication, MonitoredTrainingSession."""
    import json  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.compat.v1.disable_eager_execution()
    # A non-chief MonitoredTrainingSession polls "is the model ready?" every 30 s (SessionManager's
    # default recovery_wait_secs, not a MonitoredTrainingSession argument); poll every 0.5 s.
    from tensorflow.python.training import session_manager  # pylint: disable=g-import-not-at-top
    original_init = session_manager.SessionManager.__init__
    if not getattr(original_init, "_patched", False):
        def patched(self, *args, recovery_wait_secs=0.5, **kwargs):
            original_init(self, *args, recovery_wait_secs=recovery_wait_secs, **kwargs)
        patched._patched = True  # pylint: disable=protected-access
        session_manager.SessionManager.__init__ = patched
    from tf_backup import memory  # pylint: disable=g-import-not-at-top
    memory.tune_malloc()  # the malloc settings our ps and workers get: the same allocator for both
    conf = json.loads(os.environ["TF_CONFIG"])
    job, index = conf["task"]["type"], conf["task"]["index"]
    cluster = tf.train.ClusterSpec(conf["cluster"])
    server = tf.distribute.Server(cluster, job_name=job, task_index=index)
    if job == "ps":
        server.join()  # killed by the launcher once the chief is done
        return None
    workers, steps = cfg["workers"], cfg["steps"]
    x, y = fixed_data(steps * workers * BATCH)
    rows = worker_rows(index, workers, steps)
    init = initial_weights(cfg["hidden"])
    with tf.compat.v1.device(tf.compat.v1.train.replica_device_setter(worker_device=f"/job:worker/task:{index}",
                                                            cluster=cluster)):
        xb = tf.compat.v1.placeholder(tf.float32, [BATCH, INPUT_DIM])
        yb = tf.compat.v1.placeholder(tf.int32, [BATCH])
        w1, b1, w2, b2 = [tf.compat.v1.get_variable(n, initializer=tf.constant(v))
                          for n, v in zip(("w1", "b1", "w2", "b2"), init)]
        logits = tf.matmul(tf.nn.relu(tf.matmul(xb, w1) + b1), w2) + b2
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=logits))
        global_step = tf.compat.v1.train.get_or_create_global_step()
        opt = tf.compat.v1.train.SyncReplicasOptimizer(
            tf.compat.v1.train.GradientDescentOptimizer(cfg["lr"]), replicas_to_aggregate=workers,
            total_num_replicas=workers)
        train_op = opt.minimize(loss, global_step=global_step)
    is_chief = index == 0
    # num_tokens=0: no initial tokens, so a worker's second push waits for the first step (with the
    # default, a fast worker pushes twice for step 0 and a step can average one worker twice).
    hooks = [opt.make_session_run_hook(is_chief, num_tokens=0), tf.compat.v1.train.StopAtStepHook(last_step=steps)]
    ends = []
    k = 0
    config = tf.compat.v1.ConfigProto(device_filters=["/job:ps", f"/job:worker/task:{index}"])
    with tf.compat.v1.train.MonitoredTrainingSession(master=server.target, is_chief=is_chief, hooks=hooks,
                                                     config=config, save_checkpoint_secs=None, stop_grace_period_secs=2,
                                                     save_summaries_steps=None, log_step_count_steps=0) as sess:
        while not sess.should_stop():
            # Feed the batch of the step this gradient will be tagged with (the worker's local step),
            # as tf_backup's workers do: worker i's batch of global step k.
            tag = sess.run(opt._local_step) if hasattr(opt, "_local_step") else k  # pylint: disable=protected-access
            r = rows[(tag % steps) * BATCH:(tag % steps + 1) * BATCH]
            sess.run(train_op, feed_dict={xb: x[r], yb: y[r]})
            ends.append(time.monotonic())
            k += 1
    weights = None
    if is_chief:  # the monitored session refuses runs once stopped; the variables live on the ps
        with tf.compat.v1.Session(server.target, config=config) as plain:
            weights = plain.run([w1, b1, w2, b2])
    return {"weights": weights, "ends": ends} if is_chief else None


def tf_backup_worker(cfg: Dict[str, Any]):
    """The same job in tf_backup, `reps` times on one cluster (fresh model and optimizer each)."""
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top
    from benchmarks import step_timing  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=0, step_timeout=300.0)
    w, workers, steps = strategy.worker_index, cfg["workers"], cfg["steps"]
    x, y = fixed_data(steps * workers * BATCH)
    rows = worker_rows(w, workers, steps)
    out = []
    for _ in range(cfg["reps"]):
        with strategy.scope():
            model = keras.Sequential([keras.Input((INPUT_DIM,)), keras.layers.Dense(cfg["hidden"], activation="relu"),
                                      keras.layers.Dense(CLASSES)])
            model.set_weights(initial_weights(cfg["hidden"]))
            model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(cfg["lr"])),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
        # This worker's own batches, in order, not sharded again.
        dataset = tf.data.Dataset.from_tensor_slices((x[rows], y[rows])).batch(BATCH)
        timer = step_timing.make_step_timer(keras)
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[timer])
        out.append({"weights": [v.copy() for v in model.get_weights()], "ends": timer.ends})
    return out if strategy.is_chief else None
