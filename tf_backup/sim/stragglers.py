"""Straggler simulation: the seeded models and `StragglerCallback`, which sleeps their delays.

The models live in `tf_backup.sim.straggler_models`, `parse` in `tf_backup.sim.specs` and
`ideal_step_times` in `tf_backup.sim.ideal`; they are re-exported here, so `stragglers.parse(...)`
and `stragglers.StragglerCallback(...)` are one import for users.

Usage:

  model = stragglers.parse("pareto:1.5:0.02", seed=7)
  callback = stragglers.StragglerCallback(model, worker=task_id)
  keras_model.fit(dataset, callbacks=[callback])
"""

import math
import time

import keras

from tf_backup import _checks
from tf_backup.sim.ideal import ideal_step_times
from tf_backup.sim.specs import parse
from tf_backup.sim.straggler_models import ExponentialDelay
from tf_backup.sim.straggler_models import NoStragglers
from tf_backup.sim.straggler_models import ParetoDelay
from tf_backup.sim.straggler_models import PhasedDelay
from tf_backup.sim.straggler_models import SlowWorkers
from tf_backup.sim.straggler_models import StragglerModel
from tf_backup.sim.straggler_models import SumDelay
from tf_backup.sim.straggler_models import TraceDelay

__all__ = ["ExponentialDelay", "NoStragglers", "ParetoDelay", "PhasedDelay", "SlowWorkers", "StragglerCallback", "StragglerModel",
           "SumDelay", "TraceDelay", "ideal_step_times", "parse"]


class StragglerCallback(keras.callbacks.Callback):
    """Sleeps a straggler model's delay before each training batch of one worker.

    Before batch `step` (counted over every batch this callback has seen,
    across `fit` calls, from 0) it sleeps
    `min(model.delay(worker, step, compute_seconds), max_delay)` seconds, where
    `compute_seconds` is the measured duration of this worker's previous batch
    (from the end of the previous sleep to the previous batch's end; 0.0 for
    the first batch). With `steps_per_execution > 1` Keras calls it once per
    execution, so a delay stands for the whole execution.

    With `cancel=strategy`, the sleep goes through
    `strategy.sleep_unless_superseded`: the chief's next publish cuts it short
    and the batch is cancelled (not pushed). With `restart=True` as well, a
    cut sleep is followed by `strategy.restart_superseded()`: the worker pulls
    the new step and sleeps a fresh delay (the model's next one) before the
    same batch, which is then computed and pushed for the new step. That is a
    straggler interrupted and restarted at once, the model of
    `ideal_step_times`.

    Attributes:
      straggler_model: the `StragglerModel` (`model` is Keras' model).
      worker: this worker's index.
      max_delay: the cap on one sleep, seconds.
      step: the number of delays drawn so far: one per batch, plus one per
        restart.
      delays: the seconds slept before each batch, in order (with restarts,
        the sum of the batch's sleeps).
      total_delay: the sum of `delays`.
      capped: how many delays were cut to `max_delay`.
      cancelled: how many sleeps were cut short because the batch was superseded.
      restarted: how many of those were followed by a restart on the new step.
    """

    def __init__(self, model: StragglerModel, worker: int, *, max_delay: float = 60.0, cancel=None,
                 restart: bool = False):
        """Creates the callback.

        Args:
          model: the straggler model, e.g. from `parse`.
          worker: this worker's index, an integer >= 0.
          max_delay: the longest one sleep may last, seconds, >= 0.
          cancel: None, or the `BackupWorkerStrategy` whose
            `sleep_unless_superseded` cuts superseded sleeps short.
          restart: after a cut sleep, restart the batch on the new step
            (`cancel.restart_superseded()`) instead of cancelling it.

        Raises:
          TypeError: if `model` is not a `StragglerModel`, `worker` is not an
            integer, `cancel` has no `sleep_unless_superseded` (with `restart`,
            no `restart_superseded`), or `restart` is not a bool.
          ValueError: if `worker` is negative, `max_delay` is negative or not
            a finite number, or `restart` is set without `cancel`.
        """
        if not isinstance(model, StragglerModel):
            raise TypeError("`model` must be a StragglerModel (see stragglers.parse). "
                            f"Received: model={model!r}")
        worker = _checks.check_int("worker", worker, 0)
        if (isinstance(max_delay, bool) or not isinstance(max_delay, (int, float))
                or not math.isfinite(max_delay) or max_delay < 0):
            raise ValueError("`max_delay` must be a finite number of seconds >= 0. "
                             f"Received: max_delay={max_delay!r}")
        if cancel is not None and not callable(getattr(cancel, "sleep_unless_superseded", None)):
            raise TypeError("`cancel` must be None or a tf_backup.BackupWorkerStrategy. "
                            f"Received: cancel={cancel!r}")
        if not isinstance(restart, bool):
            raise TypeError(f"`restart` must be a bool. Received: restart={restart!r}")
        if restart and cancel is None:
            raise ValueError("`restart=True` needs `cancel=strategy`: only a sleep the strategy cuts "
                             "short can restart. Received: cancel=None")
        if restart and not callable(getattr(cancel, "restart_superseded", None)):
            raise TypeError("`restart=True` needs a `cancel` with `restart_superseded` (a "
                            f"tf_backup.BackupWorkerStrategy). Received: cancel={cancel!r}")
        super().__init__()
        self.cancel = cancel
        self.restart = restart
        self.cancelled = 0
        self.restarted = 0
        self.straggler_model = model
        self.worker = worker
        self.max_delay = float(max_delay)
        self.step = 0
        self.delays = []
        self.total_delay = 0.0
        self.capped = 0
        self._last_compute_seconds = 0.0
        self._batch_start = None

    def _draw(self) -> float:
        wanted = self.straggler_model.delay(self.worker, self.step, self._last_compute_seconds)
        self.step += 1
        if wanted > self.max_delay:
            self.capped += 1
        return min(wanted, self.max_delay)

    def on_train_batch_begin(self, batch, logs=None):
        seconds = self._draw()
        if self.cancel is None:
            if seconds > 0:
                time.sleep(seconds)
            slept = seconds
        else:
            slept = 0.0
            while True:
                start = time.monotonic()
                cut = self.cancel.sleep_unless_superseded(seconds)
                slept += time.monotonic() - start if cut else seconds
                if not cut:
                    break
                self.cancelled += 1
                if not self.restart or self.cancel.restart_superseded() is None:
                    break  # cancelled; or the round stopped and this batch ends the fit
                self.restarted += 1
                seconds = self._draw()
        self.delays.append(slept)
        self.total_delay += slept
        self._batch_start = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        if self._batch_start is not None:
            self._last_compute_seconds = max(0.0, time.monotonic() - self._batch_start)
            self._batch_start = None
