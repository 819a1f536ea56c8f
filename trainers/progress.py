"""The chief's progress line: one fixed, greppable format.

  train | step: 120/960 | loss: 0.5312 | accuracy: 0.8125 | dropped: 12 | N: 4 | steps/s: 9.10 | elapsed: 13s
"""

import time

import keras


class ProgressLine(keras.callbacks.Callback):
    """Prints a progress line every `every` global steps (and at the last batch).

    Reads `global_step`, `dropped_gradients` and `replicas_to_aggregate` (N,
    which adaptive N changes) from the logs that `BackupWorkerStrategy` adds to
    every training step.
    """

    def __init__(self, every: int, total_steps: int, print_fn=print, initial_step: int = 0):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be a positive integer. Received every={every!r}")
        self.every = every
        self.total_steps = total_steps
        self._print = print_fn
        self._start = None
        self._initial_step = initial_step
        self._last_printed = initial_step

    def on_train_begin(self, logs=None):
        self._start = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        step = int(logs.get("global_step", 0))
        if step - self._last_printed < self.every:
            return
        self._last_printed = step - step % self.every
        self._emit(step, logs)

    def _emit(self, step, logs):
        elapsed = time.monotonic() - (self._start or time.monotonic())
        parts = [f"train | step: {step}/{self.total_steps}"]
        for key in ("loss", "accuracy"):
            if key in logs:
                parts.append(f"{key}: {float(logs[key]):.4f}")
        parts.append(f"dropped: {int(logs.get('dropped_gradients', 0))}")
        if "replicas_to_aggregate" in logs:
            parts.append(f"N: {int(logs['replicas_to_aggregate'])}")
        rate = (step - self._initial_step) / elapsed if elapsed > 0 else 0.0
        parts.append(f"steps/s: {rate:.2f}")
        parts.append(f"elapsed: {elapsed:.0f}s")
        self._print(" | ".join(parts), flush=True)
