"""Programs the cluster tests run in every worker process (via `launch_local`).

Module-level functions, so worker processes can import them. Each returns
plain numbers the test asserts on.
"""

import os
import time

import numpy as np

FEATURES = 3
BATCH = 4
TRUE_W = np.array([1.0, -2.0, 3.0], np.float32)


def regression_data(num_batches: int, seed: int = 0):
    """Fixed linear-regression data: `num_batches` batches of BATCH rows."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_batches * BATCH, FEATURES)).astype(np.float32)
    y = (x @ TRUE_W + 0.5 + 0.1 * rng.normal(size=len(x))).astype(np.float32)[:, None]
    return x, y


def _regression_model(keras, units: int = 1):
    return keras.Sequential([
        keras.Input((FEATURES,)),
        keras.layers.Dense(units, kernel_initializer="zeros", bias_initializer="zeros"),
    ])


def reference_fit(optimizer, batches_per_step, steps, num_workers):
    """Single-process training on each step's batches concatenated (one big batch).

    `train_regression` on `num_workers` workers reads the same data.
    """
    import keras  # pylint: disable=g-import-not-at-top

    x, y = regression_data(steps * num_workers)
    rows = []
    for k in range(steps):
        for b in batches_per_step(k):
            rows.extend(range(b * BATCH, (b + 1) * BATCH))
    big = len(rows) // steps
    model = _regression_model(keras)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x[rows], y[rows], batch_size=big, epochs=1, shuffle=False, verbose=0)
    return [v.numpy() for v in model.trainable_variables]


class WaitUntilStale:
    """Keras callback: makes this worker a straggler that is always late.

    Before each batch it sleeps `seconds`, then waits until the global step has
    moved past the step of its own parameters (at most `deadline` seconds), so
    the gradient it then computes is certainly stale.
    """

    def __init__(self, strategy, seconds: float, last_step: int, deadline: float = 60.0):
        import keras  # pylint: disable=g-import-not-at-top

        outer = self

        class _Callback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                outer.before_batch()

            def on_train_batch_end(self, batch, logs=None):
                outer.params_step = int(logs["global_step"])

        self.callback = _Callback()
        self.strategy = strategy
        self.seconds = seconds
        self.last_step = last_step
        self.deadline = deadline
        self.params_step = 0

    def before_batch(self):
        time.sleep(self.seconds)
        start = time.monotonic()
        while time.monotonic() - start < self.deadline:
            step = self.strategy.stats()["global_step"]
            if step > self.params_step or step >= self.last_step:
                return
            time.sleep(0.02)
        raise TimeoutError("the straggler waited too long for the fast workers")


class CancelledSleeper:
    """Keras callback: sleeps `seconds` before each batch, cut short when the batch is superseded."""

    def __init__(self, strategy, seconds: float):
        import keras  # pylint: disable=g-import-not-at-top

        outer = self

        class _Callback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                outer.cut.append(strategy.sleep_unless_superseded(seconds))

        self.callback = _Callback()
        self.cut = []


def train_regression(steps: int, num_backup_workers: int = 0, optimizers=("sgd",),
                     slow_worker: int = -1, slow_seconds: float = 0.0, asynchronous: bool = False,
                     cancel: bool = False, barrier: bool = False, jit_compile: bool = False,
                     steps_per_execution: int = 1):
    """Trains a linear model with each optimizer in turn; returns weights and counts.

    Worker w reads batches w, w + W, w + 2W, ... of `regression_data`. The slow
    worker is always late (`WaitUntilStale`), or with `cancel` sleeps
    `slow_seconds` per batch unless superseded (`CancelledSleeper`). With
    `barrier`, each worker calls `wait_for_fit_end` before reading the counts.
    """
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(
        num_backup_workers=num_backup_workers, asynchronous=asynchronous, step_timeout=120.0)
    x, y = regression_data(steps * strategy.num_workers)
    results = []
    for name in optimizers:
        inner = {"sgd": lambda: keras.optimizers.SGD(0.1),
                 "adam": lambda: keras.optimizers.Adam(0.05)}[name]
        with strategy.scope():
            model = _regression_model(keras)
            optimizer = tf_backup.SyncReplicasOptimizer(inner())
            model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile,
                          steps_per_execution=steps_per_execution)
        callbacks, sleeper = [], None
        if strategy.worker_index == slow_worker and cancel:
            sleeper = CancelledSleeper(strategy, slow_seconds)
            callbacks.append(sleeper.callback)
        elif strategy.worker_index == slow_worker:
            callbacks.append(WaitUntilStale(strategy, slow_seconds, last_step=steps).callback)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
        try:  # the input position is known once the optimizer is built (in the fit, here)
            strategy.distribute_dataset(dataset, resume_input=True)
            early_resume = None
        except ValueError as e:
            early_resume = str(e)
        start = time.monotonic()
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
            "early_resume_input": early_resume,
        }
        if strategy.is_chief:
            result["contributions"] = [r.contributions for r in strategy.step_history()]
            result["master"] = [v.numpy() for v in optimizer.master_variables]
        results.append(result)
    return {"worker": strategy.worker_index, "results": results}


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
    x, y = regression_data(steps * strategy.num_workers)
    with strategy.scope():
        model = _regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)), loss="mse",
                      jit_compile=False)
    seen, restarts, cut = [], [], []

    def weights():
        return [v.numpy().tolist() for v in model.trainable_variables]

    gate = os.path.join(gate_dir, "worker-3-started")

    class _Callback(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if w == 3:
                _write_atomic(gate, "started")
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

    dataset = strategy.distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat())
    # A warm-up fit first: a first batch traces the train step (about a second), during which the
    # fast workers would make all the steps.
    model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)
    strategy.wait_for_fit_end()
    before = strategy.stats()
    start = time.monotonic()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[_Callback()])
    return {"worker": w, "seen": seen, "restarts": restarts, "stats_before": before, "cut": cut, "stats": strategy.stats(),
            "control": strategy.extended.latest_binding().state.read_control().values.tolist(),
            "weights": weights(), "fit_seconds": time.monotonic() - start}


def train_with_wrong_model(steps: int):
    """3 workers, b = 1; worker 2 builds a model of another shape and must be refused."""
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=1, step_timeout=120.0)
    x, y = regression_data(steps * strategy.num_workers)
    with strategy.scope():
        model = _regression_model(keras, units=2 if strategy.worker_index == 2 else 1)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)),
                      loss="mse", jit_compile=False)
    dataset = tf.data.Dataset.from_tensor_slices((x, np.repeat(y, 2, 1) if strategy.worker_index == 2 else y))
    dataset = dataset.batch(BATCH).repeat()
    try:
        model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps, verbose=0)
    except ValueError as e:
        return {"worker": strategy.worker_index, "error": str(e)}
    return {"worker": strategy.worker_index, "weights": [v.numpy() for v in model.trainable_variables],
            "stats": strategy.stats()}


def _two_worker_regression(step_timeout: float):
    """(strategy, compiled regression model, (x, y)) of the failure programs' 2-worker, b = 0 cluster."""
    import keras  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(step_timeout=step_timeout, startup_timeout=60.0)
    with strategy.scope():
        model = _regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)),
                      loss="mse", jit_compile=False)
    return strategy, model, regression_data(4)


def chief_waits_for_absent_worker(step_timeout: float, custom_loop: bool = False):
    """2 workers, b = 0: worker 1 never trains, so the chief's first step must time out.

    The step is `fit`'s first (the one that traces), or with `custom_loop` an
    eager `strategy.run` of a custom step; its StepTimeoutError is caught by type.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy, model, (x, y) = _two_worker_regression(step_timeout)
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
            strategy.run(custom_step, args=(x[:BATCH], y[:BATCH]))
        else:
            model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH), epochs=1, verbose=0, shuffle=False)
    except tf_backup.errors.StepTimeoutError as e:
        # TensorFlow's error that carried it out of the step: its context (Keras's traceback filtering
        # clears the cause of every error out of fit).
        return {"worker": 0, "error": e.message, "seconds": time.monotonic() - start,
                "context": type(e.__context__).__name__, "cause": type(e.__cause__).__name__}
    return {"worker": 0, "error": None}


def chief_fails_and_exits_late(step_timeout: float, exit_after: float):
    """2 workers, b = 0: worker 1 leaves at once, so the chief's fit fails with StepTimeoutError.

    The chief then aborts the job, which ends its ps task at once, and exits
    `exit_after` seconds later, as a chief whose teardown takes a while (a large
    checkpoint): the ps task fails first, because of the chief's failure.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy, model, (x, y) = _two_worker_regression(step_timeout)
    if strategy.worker_index == 1:
        return {"worker": 1}
    try:
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH), epochs=1, verbose=0, shuffle=False)
    except tf_backup.errors.StepTimeoutError:
        tf_backup.frontend.extended.shutdown_all(failed=True)  # aborts the job: the ps task exits now
        time.sleep(exit_after)
        raise
    return {"worker": 0}


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
        model = _regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)),
                      loss="mse", jit_compile=False)
    x, y = regression_data(4)
    try:
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH), epochs=1, verbose=0)
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
    first = model.fit(strategy.distribute_dataset(dataset), epochs=2, steps_per_epoch=steps[0] // 2,
                      verbose=0)
    step_after_first = strategy.stats()["global_step"]
    second = model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps[1],
                       verbose=0)
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    result = {
        "worker": strategy.worker_index,
        "config_errors": config_errors,
        "accuracy": float(accuracy),
        "step_after_first": step_after_first,
        "stats": strategy.stats(),
        "history_steps": first.history["global_step"] + second.history["global_step"],
        "weights": [w for w in model.get_weights()],
    }
    if strategy.is_chief:
        model.save(save_path)
        result["inner_iterations"] = int(model.optimizer.inner_optimizer.iterations.numpy())
    return result


def fail_on_worker_1():
    import os  # pylint: disable=g-import-not-at-top
    if os.environ["TF_BACKUP_TASK"] == "worker-1":
        raise RuntimeError("worker 1 broke on purpose")
    time.sleep(120)


def fail_until_started(times: int, marker_dir: str):
    """Fails (exit 1) in its first `times` processes of each task, then returns its task name and start count."""
    import os  # pylint: disable=g-import-not-at-top
    path = os.path.join(marker_dir, os.environ["TF_BACKUP_TASK"] + ".starts")
    starts = (int(open(path).read()) if os.path.exists(path) else 0) + 1
    _write_atomic(path, str(starts))
    with open(path + ".times", "a") as f:  # when each process ran, for the supervisor's back-off
        f.write(f"{time.time()}\n")
    if starts <= times:
        raise RuntimeError(f"start {starts} fails on purpose")
    return os.environ["TF_BACKUP_TASK"], starts


def fail_after_the_chief_returned(seconds: float):
    """The chief returns at once; every other worker fails `seconds` later."""
    import os  # pylint: disable=g-import-not-at-top
    if os.environ["TF_BACKUP_TASK"] != "worker-0":
        time.sleep(seconds)
        raise RuntimeError("fails after the chief returned")
    return "chief"


def environment_variable(name: str):
    """The task process's value of environment variable `name` (None: unset)."""
    import os  # pylint: disable=g-import-not-at-top
    return os.environ.get(name)


def sleep_forever():
    time.sleep(600)


def _write_atomic(path: str, text: str) -> None:
    import os  # pylint: disable=g-import-not-at-top
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _input_recorder_class():
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    class InputRecorder(keras.layers.Layer):
        """Passes the features on without their last column (a batch's position), which it records."""

        def __init__(self, record, **kwargs):
            super().__init__(**kwargs)
            self._record = record

        def call(self, x):
            # A stateful op: it runs with every step (not in Keras's symbolic build, which only traces).
            tf.py_function(self._record, [x[:, -1]], [])
            return x[:, :-1]

        def compute_output_shape(self, input_shape):
            return input_shape[:-1] + (input_shape[-1] - 1,)

    return InputRecorder


def input_log(progress_dir: str, task: str):
    """What `train_through_faults` recorded for `task`: per process in order, its (position, step) pairs."""
    runs = {}
    with open(os.path.join(progress_dir, f"{task}.input")) as f:
        for line in f:
            pid, position, step = (int(v) for v in line.split())
            runs.setdefault(pid, []).append((position, step))
    return list(runs.values())


def train_through_faults(steps: int, num_backup_workers: int, progress_dir: str,
                         checkpoint_dir=None, checkpoint_every_steps: int = 5,
                         worker_timeout: float = 3.0, chief_timeout: float = 8.0,
                         compute_seconds: float = 0.05, ps_restart_timeout: float = 0.0,
                         chief_rejoins: bool = False, chief_dies_after_fit: str = "", apply_on_ps: bool = False):
    """The program of the fault-injection tests: trains to global step `steps`.

    A linear model with SGD + momentum (so the optimizer has state to
    checkpoint). After every batch, each worker writes its global step to
    `progress_dir/<task>.step`, which the test watches to pick kill moments.
    Its input resumes at `strategy.input_position` (`resume_input`); each
    batch trained on appends `<pid> <position> <step>` to
    `progress_dir/<task>.input` (its position in the worker's shard of
    batches, and the step of the parameters it was computed on), written by
    the model's first layer as the step runs (`input_log`). A `fit` that raises
    `WorkersLostError` writes its message to `progress_dir/<task>.workers_lost`
    first. `chief_dies_after_fit`
    (a marker file's path): the chief's first process exits 1 once its fit
    returned (the last step done) and before the job is done.
    """
    import os  # pylint: disable=g-import-not-at-top
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(
        num_backup_workers=num_backup_workers, step_timeout=60.0, startup_timeout=60.0,
        chief_timeout=chief_timeout, worker_timeout=worker_timeout, max_steps=steps,
        checkpoint_dir=checkpoint_dir, checkpoint_every_steps=checkpoint_every_steps, ps_timeout=10.0,
        ps_restart_timeout=ps_restart_timeout, chief_rejoins=chief_rejoins, apply_on_ps=apply_on_ps)
    task = os.environ["TF_BACKUP_TASK"]
    InputRecorder = _input_recorder_class()  # pylint: disable=invalid-name
    x, y = regression_data(64)
    log_path = os.path.join(progress_dir, f"{task}.input")

    def record(positions):  # the position in the whole stream; this worker reads every num_workers-th batch
        position = (int(positions.numpy()[0]) - strategy.worker_index) // strategy.num_workers
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()} {position} {strategy.extended.latest_binding().client.step}\n")

    with strategy.scope():
        model = keras.Sequential([keras.Input((FEATURES + 1,)), InputRecorder(record), _regression_model(keras)])
        optimizer = tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.05, momentum=0.9))
        model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
        optimizer.build(model.trainable_variables)  # restores the checkpoint, joins the job
    initial_step = strategy.initial_step
    restored_optimizer = [v.numpy() for v in optimizer.inner_optimizer.variables]

    class Progress(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            time.sleep(compute_seconds)

        def on_train_batch_end(self, batch, logs=None):
            _write_atomic(os.path.join(progress_dir, f"{task}.step"), str(int(logs["global_step"])))

    def with_position(position, batch):  # the position as the features' last column
        features, labels = batch
        column = tf.fill([tf.shape(features)[0], 1], tf.cast(position, tf.float32))
        return tf.concat([features, column], axis=1), labels

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat().enumerate().map(with_position)
    # A worker that carries on through a chief's rejoin trains the redone steps too: up to
    # checkpoint_every_steps batches more than `steps` (max_steps ends every fit at step `steps`).
    spare = checkpoint_every_steps if chief_rejoins else 0
    try:
        model.fit(strategy.distribute_dataset(dataset, resume_input=True), epochs=1, steps_per_epoch=steps + spare,
                  verbose=0, callbacks=[Progress()])
    except tf_backup.errors.WorkersLostError as e:  # caught by type, as a user would: recorded, raised on
        _write_atomic(os.path.join(progress_dir, f"{task}.workers_lost"), e.message)
        raise
    if chief_dies_after_fit and strategy.is_chief and not os.path.exists(chief_dies_after_fit):
        open(chief_dies_after_fit, "w").close()
        os._exit(1)  # the job reached its last step (FINISHED); its shutdown would have marked it done
    result = {"worker": strategy.worker_index, "initial_step": initial_step, "stats": strategy.stats(),
              "weights": [v.numpy() for v in model.trainable_variables],
              "input_position": strategy.input_position,
              "generation": strategy.counters().state_generation}
    if strategy.is_chief:
        result["state_rewrites"] = strategy.counters().state_rewrites
        result["events"] = [(e.worker, e.event, e.step, e.last_step) for e in strategy.worker_events()]
        result["contributions"] = [(r.step, r.contributions) for r in strategy.step_history()]
        result["restored_optimizer"] = restored_optimizer
        result["master"] = [v.numpy() for v in optimizer.master_variables]
        result["wake_queue_sizes"] = strategy.extended.latest_binding().state.wake_queue_sizes()
    return result



def train_through_a_silent_connection(steps: int, silent_worker: int, silent_at: int, ps_restart_timeout: float):
    """`train_regression` (b = 1) in which one worker's connection to ps 0 goes silent at its batch `silent_at`
    (-1: after its last batch, so the first run to meet it is the end of the fit round's).

    That worker reaches ps 0 through a `tests.relay.Relay` (its TF_CONFIG names
    the relay), whose connections open at that batch stop forwarding: its runs
    meet their deadline (`ps_timeout`, 5 s) and new connections work.
    """
    import os  # pylint: disable=g-import-not-at-top
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top
    from tests.relay import relay_ps0_in_tf_config  # pylint: disable=g-import-not-at-top

    relay = relay_ps0_in_tf_config() if os.environ["TF_BACKUP_TASK"] == f"worker-{silent_worker}" else None
    strategy = tf_backup.BackupWorkerStrategy(
        num_backup_workers=1, step_timeout=60.0, ps_timeout=5.0, max_steps=steps,
        ps_restart_timeout=ps_restart_timeout)
    x, y = regression_data(steps * strategy.num_workers)
    with strategy.scope():
        model = _regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)), loss="mse")

    class Silence(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            time.sleep(0.05)
            if relay is not None and batch == silent_at:
                relay.silence_all()

        def on_epoch_end(self, epoch, logs=None):  # before Keras ends the round (finalize_variable_values)
            if relay is not None and silent_at < 0:
                relay.silence_all()

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    start = time.monotonic()
    error = None
    try:
        model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps, verbose=0,
                  callbacks=[Silence()])
    except tf_backup.PsUnavailableError as e:
        error = type(e).__name__
    result = {"worker": strategy.worker_index, "error": error, "seconds": time.monotonic() - start,
              "connections": None if relay is None else relay.connections}
    if error is None:
        counters = strategy.counters()
        result.update(stats=strategy.stats(), weights=[v.numpy() for v in model.trainable_variables],
                      generation=counters.state_generation, state_rewrites=counters.state_rewrites,
                      step=counters.step)
    if strategy.is_chief:
        result["events"] = [(e.worker, e.event) for e in strategy.worker_events()]
    return result


def train_regression_on_local_devices(steps: int, local_devices: int, inner: str = "sgd",
                                      jit_compile: bool = False):
    """Each worker runs `local_devices` logical CPU replicas on host batches of BATCH * local_devices.

    Worker w reads host batches w, w + W, ...; step k of the whole cluster therefore reads
    rows [k * R, (k + 1) * R) with R = W * BATCH * local_devices, whatever W and local_devices
    are: 2 workers x 2 devices and 4 workers x 1 device see the same rows per step.
    """
    import tf_backup.frontend.local_devices  # pylint: disable=g-import-not-at-top
    tf_backup.frontend.local_devices.set_logical_cpus(local_devices)  # before TensorFlow initializes
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(step_timeout=120.0)
    host_batch = BATCH * local_devices
    x, y = regression_data(steps * strategy.num_workers * local_devices)
    with strategy.scope():
        model = _regression_model(keras)
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
        keras.Input((FEATURES,)),
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
    x, y = regression_data(steps * strategy.num_workers)
    with strategy.scope():
        model = mlp_regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(make_inner_optimizer(keras, optimizer)), loss="mse",
                      jit_compile=False)
    initial = [v.numpy() for v in model.trainable_variables]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
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
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top
    from tf_backup import topology  # pylint: disable=g-import-not-at-top

    config = json.loads(os.environ["TF_CONFIG"])
    tpu_like = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": config["cluster"]["worker"]}), task_type="worker",
        task_id=config["task"]["index"], num_accelerators={"TPU": 8})
    resolver = topology.with_ps(tpu_like, ps=config["cluster"]["ps"])
    strategy = tf_backup.BackupWorkerStrategy(cluster_resolver=resolver, step_timeout=120.0)
    x, y = regression_data(steps * strategy.num_workers)
    with strategy.scope():
        model = _regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)), loss="mse",
                      jit_compile=False)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps, verbose=0)
    return {"worker": strategy.worker_index, "weights": [v.numpy() for v in model.trainable_variables],
            "stats": strategy.stats(), "tpu_cores": topology.tpu_topology(resolver).replicas_per_worker}


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


def train_embedding(steps: int, local_devices: int = 1, num_backup_workers: int = 0, slow_worker: int = -1,
                    checkpoint_dir=None, gather: bool = False, sparse_variables=None, jit_compile: bool = False):
    """An Embedding model (IndexedSlices gradients) through model.fit; host batch BATCH * local_devices.

    `gather`: the table is a custom layer's, read by `tf.gather` (`gather_model`).
    """
    import tf_backup.frontend.local_devices  # pylint: disable=g-import-not-at-top
    tf_backup.frontend.local_devices.set_logical_cpus(local_devices)
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=num_backup_workers, step_timeout=120.0,
                                              checkpoint_dir=checkpoint_dir)
    host_batch = BATCH * local_devices
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
    callbacks = []
    if strategy.worker_index == slow_worker:
        callbacks.append(WaitUntilStale(strategy, 0.2, last_step=steps).callback)
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
            "initial_step": strategy.initial_step}


def train_regression_custom_loop(steps: int, local_devices: int = 1, jit_compile: bool = True,
                                 always_split: bool = False):
    """`train_regression_on_local_devices` in a custom loop whose replica function is compiled.

    The loop is a `tf.function` without jit_compile around `strategy.run` of a
    `tf.function(jit_compile=True)` replica step: the exchange runs in `run`,
    after the compiled step, on the host.
    """
    import tf_backup.frontend.local_devices  # pylint: disable=g-import-not-at-top
    tf_backup.frontend.local_devices.set_logical_cpus(local_devices)
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(step_timeout=120.0)
    strategy.extended.always_split = always_split
    host_batch = BATCH * local_devices
    x, y = regression_data(steps * strategy.num_workers * local_devices)
    with strategy.scope():
        model = _regression_model(keras)
        optimizer = tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1))
        optimizer.build(model.trainable_variables)

    def replica_step(features, labels):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(features, training=True) - labels))
            loss = loss / strategy.num_replicas_in_sync  # the replicas' gradients are summed in the host
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    replica = tf.function(replica_step, jit_compile=jit_compile)

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
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = tf_backup.BackupWorkerStrategy(step_timeout=120.0)
    x, y = regression_data(steps * strategy.num_workers)
    with strategy.scope():
        model = _regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)), loss="mse",
                      jit_compile=jit_compile)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps, verbose=0)
    return {"worker": strategy.worker_index, "optimizer": type(model.optimizer).__name__,
            "weights": [v.numpy() for v in model.trainable_variables], "stats": strategy.stats(),
            "loss_scale": float(model.optimizer.dynamic_scale.numpy())}


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
    x, y = regression_data(2)
    with strategy.scope():
        model = _regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
        model.optimizer.build(model.trainable_variables)
    replica = tf.function(model.train_step, jit_compile=True)

    @tf.function
    def step(features, labels):
        return strategy.run(replica, args=((features, labels),))

    concrete = step.get_concrete_function(tf.TensorSpec([BATCH, FEATURES], tf.float32),
                                          tf.TensorSpec([BATCH, 1], tf.float32))
    graph = concrete.graph.as_graph_def()

    def describe(nodes):
        return {"ops": sorted({n.op for n in nodes}), "devices": sorted({n.device for n in nodes if n.device})}

    library = {f.signature.name: f for f in graph.library.function}
    compiled = [f for f in library.values() if f.attr["_XlaMustCompile"].b]
    logs = step(tf.constant(x[:BATCH]), tf.constant(y[:BATCH]))
    return {
        "compiled": [describe(f.node_def) for f in compiled],
        "host": describe(list(graph.node) + [n for name, f in library.items() if f not in compiled
                                             for n in f.node_def]),
        "global_step": int(logs["global_step"]), "stats": strategy.stats(),
    }


def compiled_step_errors(local_devices: int = 1):
    """The errors of compiled steps that cannot work; returns {case: (error type, message)}."""
    import tf_backup.frontend.local_devices  # pylint: disable=g-import-not-at-top
    tf_backup.frontend.local_devices.set_logical_cpus(local_devices)
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(step_timeout=60.0)
    x, y = regression_data(4)
    with strategy.scope():
        model = _regression_model(keras)
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

    if local_devices > 1:
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH * local_devices).repeat()
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

    record("custom_loop_run_inside_xla", lambda: run_inside_xla(x[:BATCH], y[:BATCH]))

    # Keras's train step inside XLA, fed twice without the strategy's iterator: the first
    # gradient is never exchanged.
    @tf.function(jit_compile=True)
    def keras_step_without_iterator(features, labels):
        return strategy.run(model.train_step, args=((features, labels),))

    def twice():
        keras_step_without_iterator(x[:BATCH], y[:BATCH])
        keras_step_without_iterator(x[BATCH:2 * BATCH], y[BATCH:2 * BATCH])
        strategy.extended.exchange_pending()

    record("two_steps_one_exchange", twice)
    return out


def train_adaptive(slow_steps: int, fast_steps: int, seconds: float = 0.05, slow_worker: int = 3, window: int = 20):
    """`num_backup_workers="auto"` on pure-noise regression (labels independent of the inputs: a
    high noise scale); every worker sleeps `seconds` before each batch, `slow_worker` 10x as long
    until the global step reaches `slow_steps`. Returns the chief's N and noise scale per step."""
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers="auto", adaptive_window=window, step_timeout=120.0)
    rng = np.random.default_rng(strategy.worker_index)
    x = rng.normal(size=(64 * BATCH, FEATURES)).astype(np.float32)
    y = rng.normal(size=(64 * BATCH, 1)).astype(np.float32)
    steps = slow_steps + fast_steps
    seen = {"step": 0}

    class Sleep(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            slow = strategy.worker_index == slow_worker and seen["step"] < slow_steps
            time.sleep(seconds * (10 if slow else 1))

        def on_train_batch_end(self, batch, logs=None):
            seen["step"] = int(logs["global_step"])

    with strategy.scope():
        model = _regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    history = model.fit(strategy.distribute_dataset(dataset), epochs=steps // 10, steps_per_epoch=10, verbose=0,
                        callbacks=[Sleep()])
    result = {"worker": strategy.worker_index, "history": history.history, "stats": strategy.stats(),
              "num_backup_workers": strategy.num_backup_workers, "adaptive": strategy.adaptive}
    if strategy.is_chief:
        records = strategy.step_history()
        result["replicas"] = [r.replicas for r in records]
        result["taken"] = [r.taken for r in records]
        result["noise_scale"] = [r.noise_scale for r in records]
    return result
