"""What the programs of several test files share: the regression task and its single-process
reference, straggler callbacks, atomic file writes.

`reference_fit` is what the tests compare a cluster's weights with.
"""

import time
from typing import NamedTuple, Optional

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


def regression_model(keras, units: int = 1):
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
    model = regression_model(keras)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x[rows], y[rows], batch_size=big, epochs=1, shuffle=False, verbose=0)
    return [v.numpy() for v in model.trainable_variables]


def fit_sgd_regression(strategy, steps: int, jit_compile: bool = False):
    """`regression_model` with SyncReplicasOptimizer(SGD(0.1)), fit for `steps` batches; returns the model.

    Worker w reads batches w, w + W, w + 2W, ... of `regression_data`, as `reference_fit` assumes.
    """
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    x, y = regression_data(steps * strategy.num_workers)
    with strategy.scope():
        model = regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)), loss="mse",
                      jit_compile=jit_compile)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps, verbose=0)
    return model


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
    """Keras callback: sleeps `seconds` before each batch, cut short when the batch is superseded.

    `cut`: per sleep, whether it was cut short. `sleeps`: per sleep, a `Sleep`
    with what the wait that cut it read after its wake-up (the same run), so a
    test tells a cut by a new step from one by the round's end.
    """

    def __init__(self, strategy, seconds: float):
        import keras  # pylint: disable=g-import-not-at-top
        from tf_backup.protocol import rounds  # pylint: disable=g-import-not-at-top

        outer = self

        class _Callback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                client = strategy.extended.latest_binding().client
                step = client.step
                cut = strategy.sleep_unless_superseded(seconds)
                outer.cut.append(cut)
                ctl = client.superseded.control if cut and client.superseded is not None else None
                outer.sleeps.append(Sleep(
                    step=step, cut=cut, seen_step=None if ctl is None else ctl.step,
                    round_stopped=None if ctl is None else rounds.round_stopped(ctl, client.round.number)))

        self.callback = _Callback()
        self.cut = []
        self.sleeps = []


class Sleep(NamedTuple):
    """One sleep of `CancelledSleeper`: the step of the worker's parameters; whether it was cut short; if so, the
    global step and whether the round had stopped, as the wait that cut it read them (None: not read)."""

    step: int
    cut: bool
    seen_step: Optional[int]
    round_stopped: Optional[bool]


def two_worker_regression(step_timeout: float):
    """(strategy, compiled regression model, (x, y)) of the failure programs' 2-worker, b = 0 cluster."""
    import keras  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(step_timeout=step_timeout, startup_timeout=60.0)
    with strategy.scope():
        model = regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)),
                      loss="mse", jit_compile=False)
    return strategy, model, regression_data(4)


def write_atomic(path: str, text: str) -> None:
    import os  # pylint: disable=g-import-not-at-top
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
