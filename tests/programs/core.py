"""Programs of the core engine's tests (test_core_cluster.py; `train_regression` in test_compiled.py too):
a linear regression or a small classifier on N + b workers, stragglers, refused models, absent peers.
"""

import os
import time

import numpy as np

from programs import common


def train_regression(steps: int, num_backup_workers: int = 0, optimizers=("sgd",),
                     slow_worker: int = -1, slow_seconds: float = 0.0, asynchronous: bool = False,
                     cancel: bool = False, barrier: bool = False, jit_compile: bool = False,
                     steps_per_execution: int = 1, gate_dir: str = ""):
    """Trains a linear model with each optimizer in turn; returns weights and counts.

    Worker w reads batches w, w + W, w + 2W, ... of `common.regression_data`. The slow
    worker is always late (`common.WaitUntilStale`), or with `cancel` sleeps
    `slow_seconds` per batch unless superseded (`common.CancelledSleeper`). With
    `barrier`, each worker calls `wait_for_fit_end` before reading the counts.
    With `gate_dir`, the other workers start their first fit once the slow one
    has started its own (a file there), so its batches overlap their steps
    however late its process started. Each worker records the parameters each
    of its batches is computed on (`params`: flat, in order).
    """
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    from tf_backup import memory  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(
        num_backup_workers=num_backup_workers, asynchronous=asynchronous, step_timeout=120.0)
    # Each exchange applies the malloc settings again (tf.data's iterators reset them): counted here.
    reapplies, reapply = [], memory.reapply
    memory.reapply = lambda: reapplies.append(1) or reapply()
    x, y = common.regression_data(steps * strategy.num_workers)
    gate = os.path.join(gate_dir, "slow-worker-started") if gate_dir else None
    refusals = public_refusals(strategy)
    results = []
    for name in optimizers:
        inner = {"sgd": lambda: keras.optimizers.SGD(0.1),
                 "adam": lambda: keras.optimizers.Adam(0.05),
                 "rmsprop": lambda: keras.optimizers.RMSprop(0.01)}[name]  # no kernel on the ps: the chief applies
        with strategy.scope():
            model = common.regression_model(keras)
            optimizer = tf_backup.SyncReplicasOptimizer(inner())
            model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile,
                          steps_per_execution=steps_per_execution)
        params = []

        class Record(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                if gate is not None:
                    _gate(gate, opens=strategy.worker_index == slow_worker)

            def on_train_batch_begin(self, batch, logs=None):
                params.append([float(v) for m in model.trainable_variables for v in m.numpy().ravel()])

        callbacks, sleeper = [Record()], None
        if strategy.worker_index == slow_worker and cancel:
            sleeper = common.CancelledSleeper(strategy, slow_seconds)
            callbacks.append(sleeper.callback)
        elif strategy.worker_index == slow_worker:
            callbacks.append(common.WaitUntilStale(strategy, slow_seconds, last_step=steps).callback)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(common.BATCH).repeat()
        try:  # the input position is known once the optimizer is built (in the fit, here)
            strategy.distribute_dataset(dataset, resume_input=True)
            early_resume = None
        except ValueError as e:
            early_resume = str(e)
        start, reapplied = time.monotonic(), len(reapplies)
        history = model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps,
                            verbose=0, callbacks=callbacks)
        late = strategy.wait_for_fit_end(timeout=60) if barrier else None
        counters = strategy.counters()
        result = {
            "late": late,
            # Waits that ran to their 1 s deadline although what they waited for had happened: a
            # wake-up token was lost (or never sent).
            "missed_wakeups": counters.missed_wakeups,
            # Steps whose parameters this worker took from its own aggregator instead of the ps.
            "local_pulls": counters.local_pulls,
            # Gradients found late before their push and never sent.
            "unsent": counters.unsent,
            "optimizer": name,
            "weights": [v.numpy() for v in model.trainable_variables],
            "history": history.history,
            "stats": strategy.stats(),
            "fit_seconds": time.monotonic() - start,
            "sleeps_cut": None if sleeper is None else sleeper.cut,
            "sleeps": None if sleeper is None else [tuple(s) for s in sleeper.sleeps],
            "params": params,
            "early_resume_input": early_resume,
            "malloc_reapplies": len(reapplies) - reapplied,
        }
        if strategy.is_chief:
            result["contributions"] = [r.contributions for r in strategy.step_history()]
            result["master"] = [v.numpy() for v in optimizer.master_variables]
        results.append(result)
    return {"worker": strategy.worker_index, "results": results, "refusals": refusals}


# The public calls of a running strategy with a bad value, each refused at once (test_core_cluster.py).
REFUSED_CALLS = {
    "distribute_dataset(resume_input='yes')": lambda s, tf: s.distribute_dataset(tf.data.Dataset.range(4),
                                                                                 resume_input="yes"),
    "distribute_dataset(resume_input=1)": lambda s, tf: s.distribute_dataset(tf.data.Dataset.range(4), resume_input=1),
    "distribute_dataset(options=tf.data.Options())": lambda s, tf: s.distribute_dataset(tf.data.Dataset.range(4),
                                                                                        options=tf.data.Options()),
    "distribute_dataset(list)": lambda s, tf: s.distribute_dataset([1, 2]),
    "sleep_unless_superseded(-1)": lambda s, tf: s.sleep_unless_superseded(-1),
    "sleep_unless_superseded(nan)": lambda s, tf: s.sleep_unless_superseded(float("nan")),
    "sleep_unless_superseded(inf)": lambda s, tf: s.sleep_unless_superseded(float("inf")),
    "sleep_unless_superseded('0.1')": lambda s, tf: s.sleep_unless_superseded("0.1"),
    "sleep_unless_superseded(None)": lambda s, tf: s.sleep_unless_superseded(None),
    "wait_for_fit_end(timeout=-1)": lambda s, tf: s.wait_for_fit_end(timeout=-1),
}


def public_refusals(strategy):
    """Each of `REFUSED_CALLS` on `strategy`: {call: (error type, message)}, or None where nothing was raised."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    out = {}
    for case, call in REFUSED_CALLS.items():
        try:
            call(strategy, tf)
            out[case] = None
        except (TypeError, ValueError) as e:
            out[case] = (type(e).__name__, str(e))
    return out


def _gate(path: str, opens: bool, timeout: float = 120.0) -> None:
    """Opens the gate at `path` (a file), or waits until it is open."""
    if opens:
        common.write_atomic(path, "started")
        return
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the slow worker did not start its fit within {timeout:.0f} s ({path})")
        time.sleep(0.01)


def train_with_restarting_straggler(steps: int, gate_dir: str):
    """4 workers, b = 1; worker 3's first sleep of each batch (60 s) is always superseded.

    It then restarts the batch on the current step (`restart_superseded`) and pushes it at once.
    Every worker records, before each batch, the step of its parameters and its weights; worker 3
    also records what each restart returned and the weights right after it. The fast workers start
    their first batch once worker 3 has started its fit (a file in `gate_dir`), so its batches
    overlap their steps however late its process started.
    """
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=1, step_timeout=120.0)
    w = strategy.worker_index
    x, y = common.regression_data(steps * strategy.num_workers)
    with strategy.scope():
        model = common.regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)), loss="mse",
                      jit_compile=False)
    seen, restarts, cut = [], [], []

    def weights():
        return [v.numpy().tolist() for v in model.trainable_variables]

    gate = os.path.join(gate_dir, "worker-3-started")

    class _Callback(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if w == 3:
                common.write_atomic(gate, "started")
                return
            deadline = time.monotonic() + 120
            while not os.path.exists(gate):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker 3 did not start its fit within 120 s ({gate})")
                time.sleep(0.01)

        def on_train_batch_begin(self, batch, logs=None):
            if w == 3:
                before = strategy.counters().step
                cut.append(strategy.sleep_unless_superseded(60.0))
                if cut[-1]:
                    restarts.append((before, strategy.restart_superseded(), weights()))
                    assert strategy.restart_superseded() is None  # nothing left to restart
            seen.append((strategy.counters().step, weights()))

    dataset = strategy.distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(common.BATCH).repeat())
    # A warm-up fit first: a first batch traces the train step (about a second), during which the
    # fast workers would make all the steps.
    model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)
    strategy.wait_for_fit_end()
    before = strategy.stats()
    start = time.monotonic()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[_Callback()])
    return {"worker": w, "seen": seen, "restarts": restarts, "stats_before": before, "cut": cut,
            "stats": strategy.stats(),
            "control": strategy.extended.latest_binding().state.read_control().values.tolist(),
            "weights": weights(), "fit_seconds": time.monotonic() - start}


def train_with_wrong_model(steps: int, what: str = "model"):
    """3 workers, b = 1; worker 2 builds a model of another shape (or, `what="wire_dtype"`, sends
    bfloat16 over the wire) and must be refused."""
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    odd = what == "wire_dtype" and tf.distribute.cluster_resolver.TFConfigClusterResolver().task_id == 2
    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=1, step_timeout=120.0,
                                              wire_dtype="bfloat16" if odd else "float32")
    x, y = common.regression_data(steps * strategy.num_workers)
    wrong = what == "model" and strategy.worker_index == 2
    with strategy.scope():
        model = common.regression_model(keras, units=2 if wrong else 1)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)),
                      loss="mse", jit_compile=False)
    dataset = tf.data.Dataset.from_tensor_slices((x, np.repeat(y, 2, 1) if wrong else y))
    dataset = dataset.batch(common.BATCH).repeat()
    try:
        model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps, verbose=0)
    except ValueError as e:
        return {"worker": strategy.worker_index, "error": str(e)}
    return {"worker": strategy.worker_index, "weights": [v.numpy() for v in model.trainable_variables],
            "stats": strategy.stats()}


def chief_waits_for_absent_worker(step_timeout: float, custom_loop: bool = False):
    """2 workers, b = 0: worker 1 never trains, so the chief's first step must time out.

    The step is `fit`'s first (the one that traces), or with `custom_loop` an
    eager `strategy.run` of a custom step; its StepTimeoutError is caught by type.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy, model, (x, y) = common.two_worker_regression(step_timeout)
    if strategy.worker_index == 1:
        return {"worker": 1}
    if custom_loop:
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)  # not inside the replica step

    def custom_step(features, labels):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(features, training=True) - labels))
        model.optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

    start = time.monotonic()
    try:
        if custom_loop:
            strategy.run(custom_step, args=(x[:common.BATCH], y[:common.BATCH]))
        else:
            model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(common.BATCH), epochs=1, verbose=0,
                      shuffle=False)
    except tf_backup.errors.StepTimeoutError as e:
        # TensorFlow's error that carried it out of the step: its context (Keras's traceback filtering
        # clears the cause of every error out of fit).
        return {"worker": 0, "error": e.message, "seconds": time.monotonic() - start,
                "context": type(e.__context__).__name__, "cause": type(e.__cause__).__name__}
    return {"worker": 0, "error": None}


def worker_waits_for_absent_chief(startup_timeout: float):
    """2 workers: the chief never builds its optimizer; worker 1's build must time out."""
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(startup_timeout=startup_timeout)
    if strategy.is_chief:
        time.sleep(startup_timeout + 5)  # alive (heartbeat on), but never creates the state
        return {"worker": 0}
    with strategy.scope():
        model = common.regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)),
                      loss="mse", jit_compile=False)
    x, y = common.regression_data(4)
    try:
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(common.BATCH), epochs=1, verbose=0)
    except tf.errors.DeadlineExceededError as e:
        return {"worker": 1, "error": e.message}
    return {"worker": 1, "error": None}


NUM_CLASSES = 4


def classification_data(seed: int = 0):
    """A fixed 4-class problem with overlapping classes: (train, test) arrays."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=1.2, size=(NUM_CLASSES, 10))

    def sample(n):
        labels = rng.integers(0, NUM_CLASSES, n)
        return (centers[labels] + rng.normal(size=(n, 10))).astype(np.float32), labels.astype(np.int32)

    return sample(4000), sample(2000)


def classifier(keras):
    return keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(NUM_CLASSES, activation="softmax"),
    ])


def train_classifier(steps: tuple, save_path: str):
    """3 workers, b = 1: two `fit` rounds of a small classifier, then evaluate and save."""
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=1, step_timeout=120.0)
    (x, y), (x_test, y_test) = classification_data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(4000, seed=1).batch(32).repeat()
    config_errors = []
    with strategy.scope():
        for kwargs in (dict(total_num_replicas=5), dict(replicas_to_aggregate=4)):
            bad = classifier(keras)
            bad.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(), **kwargs),
                        loss="sparse_categorical_crossentropy", jit_compile=False)
            try:
                bad.fit(strategy.distribute_dataset(dataset), steps_per_epoch=1, verbose=0)
            except ValueError as e:
                config_errors.append(str(e))
        model = classifier(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.Adam(0.01)),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=False)
    # Per fit: the step of the parameters each batch was computed on, and the step of the round's final parameters.
    batch_steps, end_steps = [], []

    class Record(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            batch_steps.append([])

        def on_train_batch_begin(self, batch, logs=None):
            batch_steps[-1].append(strategy.counters().step)

        def on_train_end(self, logs=None):  # after `finalize_variable_values`: the final pull
            end_steps.append(strategy.counters().step)

    first = model.fit(strategy.distribute_dataset(dataset), epochs=2, steps_per_epoch=steps[0] // 2,
                      verbose=0, callbacks=[Record()])
    step_after_first = strategy.stats()["global_step"]
    second = model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps[1],
                       verbose=0, callbacks=[Record()])
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    result = {
        "worker": strategy.worker_index,
        "config_errors": config_errors,
        "accuracy": float(accuracy),
        "step_after_first": step_after_first,
        "stats": strategy.stats(),
        "history_steps": first.history["global_step"] + second.history["global_step"],
        "batch_steps": batch_steps,
        "end_steps": end_steps,
        "weights": [w for w in model.get_weights()],
    }
    if strategy.is_chief:
        model.save(save_path)
        result["inner_iterations"] = int(model.optimizer.inner_optimizer.iterations.numpy())
        result["contributions"] = [r.contributions for r in strategy.step_history()]
    return result
