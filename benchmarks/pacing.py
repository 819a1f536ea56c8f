"""How a benchmark worker paces its fits: simulated compute and straggler sleeps, a start barrier,
no garbage collection.

Compute is simulated by a sleep in a Keras callback before each batch, on top of the (small) real
step, so the figures do not depend on how the processes share this machine's cores. Straggler
delays come from a seeded `tf_backup.sim.stragglers` model keyed by (worker, global step of the
parameters the batch is computed on), so every b sees the same delays at the same global step
(`make_sleep_callback`). A timed fit starts at a barrier of every worker (`FitBarrier`).

Every worker turns Python's garbage collector off (`keep_garbage`) before its first fit. Each
Keras `fit` under a `tf.distribute` strategy leaves ~1,100 objects in reference cycles, among them
the fit's input iterator (TF's `MultiDeviceIterator`); in our workers with stragglers, destroying
one stalled the collecting worker for 0.2-30 s (in steps of about 10 s), whenever the collector
happened to run: inside a later timed fit, or at the start of one. Kept alive, they cost a few MB
per fit. Tasks end with `os._exit`, so nothing is destroyed at exit either (WORKSPACE_NOTES).
The cause was found since (`tf_backup.frontend.iterator_reaper`: a lost wake-up of tf.data's
autotuner thread in the iterator's destructor), and tf_backup's iterators are now destroyed on a
thread of their own; the collector stays off here so that the committed tables stay comparable.
"""

import gc
import time
from typing import Optional

import numpy as np


def keep_garbage() -> None:
    """Turns the garbage collector off in this worker process (see the module docstring)."""
    gc.disable()


def make_sleep_callback(keras, worker: int, compute: float, straggler: Optional[str], seed: int,
                        step_source, strategy=None):
    """A callback sleeping `compute + delay(worker, step)` before each batch.

    `step_source()` gives the global step of the parameters at the start of a fit; afterwards the
    step comes from the batch logs (`global_step`, the step of the parameters just pulled). With
    `cancel` set (and a tf_backup `strategy`), the sleep ends early when the batch is superseded
    (`BackupWorkerStrategy.sleep_unless_superseded`): with "cancel" the batch is cancelled (not
    pushed); with "restart" the worker pulls the new step (`restart_superseded`) and sleeps that
    step's delay before the batch, which is then computed and pushed for the new step.
    """
    from tf_backup.sim import stragglers  # pylint: disable=g-import-not-at-top
    model = stragglers.parse(straggler or "none", seed=seed)

    class SleepCallback(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.active = True
            self.cancel = False
            self.param_step = 0
            self.slept = 0.0
            self.cut = 0
            self.first_batch = None  # time.time() at this fit's first batch
            self.gate = None  # called at each fit's first batch, before its sleep

        def on_train_begin(self, logs=None):
            self.first_batch = None
            step = step_source()
            if step is not None:
                self.param_step = step

        def on_train_batch_begin(self, batch, logs=None):
            if self.first_batch is None:
                if self.gate is not None:
                    self.gate()
                self.first_batch = time.time()
            if not self.active:
                return
            seconds = compute + model.delay(worker, self.param_step, compute)
            if self.cancel and strategy is not None:
                while strategy.sleep_unless_superseded(seconds):
                    self.cut += 1
                    if self.cancel != "restart":
                        break
                    step = strategy.restart_superseded()
                    if step is None:
                        break  # the round stopped: the batch ends the fit at once
                    self.param_step = step
                    seconds = compute + model.delay(worker, self.param_step, compute)
            elif seconds > 0:
                time.sleep(seconds)
                self.slept += seconds

        def on_train_batch_end(self, batch, logs=None):
            if logs and "global_step" in logs:
                self.param_step = int(logs["global_step"])
            else:
                self.param_step += 1

    return SleepCallback()


class FitBarrier:
    """A barrier of every worker of a tf_backup cluster, on the ps: `wait` returns once every worker called it.

    Made by every worker after the first optimizer is built (the chief creates the shared counter
    on ps 0, the others attach to it). Each `wait` is the next round of the barrier: this worker
    marks it reached, then polls until every worker has.

    With b >= 1 the other workers make steps without any one of them; a worker let loose before the
    others would run part of the round with fewer workers (and the chief would measure a short or
    empty window). Called in a fit's first batch, after Keras made the fit's input iterator (0.1-0.5 s
    per worker on 2 shared cores), it starts every worker's first batch within milliseconds.
    """

    def __init__(self, strategy, timeout: float = 300.0):
        from tf_backup.ps import accumulators  # pylint: disable=g-import-not-at-top
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        ext = strategy.extended
        info = ext.cluster
        self.w, self.timeout, self.rounds = info.worker_index, timeout, 0
        job_id = ext.monitor.job_id
        self.var = accumulators.SharedVariable(f"benchmarks/{job_id}/barrier", tf.int64, [info.num_workers],
                                               ext.endpoints.of(info.ps[0]))
        if info.is_chief:
            self.var.assign(np.zeros([info.num_workers], np.int64))
        else:
            self._poll(self.var.is_initialized, "the chief to create the barrier")

    def _poll(self, done, what) -> None:
        start = time.monotonic()
        while not done():
            if time.monotonic() - start > self.timeout:
                raise TimeoutError(f"worker {self.w} waited {self.timeout:.0f} s for "
                                   f"{what() if callable(what) else what}")
            time.sleep(0.002)

    def wait(self) -> None:
        self.rounds += 1
        self.var.scatter_max([self.w], [self.rounds])
        self._poll(lambda: self.var.read().min() >= self.rounds,
                   lambda: f"every worker at barrier round {self.rounds} (reached: {self.var.read().tolist()})")
