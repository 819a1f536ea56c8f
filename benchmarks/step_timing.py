"""Step times of timed fits: Keras callbacks stamping batch ends (and reading the cluster's CPU and
link counters over the same span), and the steady steps of a chief's step history.
"""

import time
from typing import Dict, List, Optional

import numpy as np

from benchmarks import cluster_counters


def step_durations(history: List[tuple], start_step: int, steps: int,
                   all_in: Optional[float] = None) -> Dict[int, float]:
    """{step s: seconds from step s-1's publish to step s's} for the steady steps of one rep.

    Leaves out the rep's first step (it holds the fit's start-up) and everything from step
    `start_step + steps - 1` on (workers end their fit at different times). With `all_in` (a
    `time.time()`: when the last worker began its fit's first batch), also the steps that began
    before it, which the late workers could not take part in.
    """
    ends = {s: t for s, _, t in history}
    out = {}
    for s in range(start_step + 1, start_step + steps - 1):
        if s in ends and s - 1 in ends and (all_in is None or ends[s - 1] >= all_in):
            out[s] = ends[s] - ends[s - 1]
    return out


def steady_step_times(ends: List[float]) -> List[float]:
    """Per-batch times of one fit from its batch-end stamps, leaving out the first and last batch."""
    d = np.diff(ends)
    return [float(x) for x in d[1:-1]] if len(d) > 2 else [float(x) for x in d]


def make_step_timer(keras, cpu_window: Optional[int] = None, net: bool = False):
    """A callback recording `time.monotonic()` at the end of every batch.

    With `cpu_window` (the fit's batches), it also reads `cluster_counters.cluster_cpu_seconds()` at the end of
    batch 1 and of batch `cpu_window - 2`, the span `steady_step_times` keeps: `cpu` is then
    {task: CPU seconds per batch over that span} (None if unavailable). With `net` too,
    `cluster_counters.cluster_net_bytes()` at the same two points: `net` is then {task: (bytes sent, bytes
    received) per batch} on each task's emulated link (empty on loopback).
    """

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []
            self.steps = []  # the global step after each batch (tf_backup's logs; else the batch count)
            self.cpu = None
            self.net = None
            self._cpu_start = None
            self._net_start = None
            self._pids = None

        def on_train_begin(self, logs=None):
            # With `net`, the task processes are found once per fit (they do not change), so that
            # each read of the links' counters comes within a millisecond of its batch end: at the
            # same point of every step, whatever the other tasks are sending then.
            self._pids = cluster_counters.cluster_task_pids() if net and cpu_window else None

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.monotonic())
            self.steps.append(int((logs or {}).get("global_step", batch + 1)))
            if cpu_window is None or cpu_window < 4:
                return
            if batch == 1:
                pids = self._pids if self._pids is not None else cluster_counters.cluster_task_pids()
                self._net_start = cluster_counters.cluster_net_bytes(pids) if net else None
                self._cpu_start = cluster_counters.cluster_cpu_seconds(pids)
            elif batch == cpu_window - 2 and self._cpu_start is not None:
                pids = self._pids if self._pids is not None else cluster_counters.cluster_task_pids()
                n = cpu_window - 3
                if self._net_start is not None:
                    end = cluster_counters.cluster_net_bytes(pids) or {}
                    self.net = {k: ((end[k][0] - v[0]) / n, (end[k][1] - v[1]) / n)
                                for k, v in self._net_start.items() if k in end}
                end = cluster_counters.cluster_cpu_seconds(pids) or {}
                self.cpu = {k: (end[k] - v) / n for k, v in self._cpu_start.items() if k in end}

    return StepTimer()


def make_link_reader(keras, window: int):
    """A callback reading this process's own link counters (`benchmarks.netem`: eth0 of its namespace).

    At the end of batch 1 and of batch `window - 2` (the span `make_step_timer` keeps): `net` is
    then (bytes sent, bytes received) per batch; None without such a link. Read at this worker's
    own batch ends, its push and pull of each step are inside the span whole.
    """
    import os  # pylint: disable=g-import-not-at-top

    from benchmarks import netem  # pylint: disable=g-import-not-at-top

    class LinkReader(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.net = None
            self._start = None

        def on_train_batch_end(self, batch, logs=None):
            if window < 4:
                return
            if batch == 1:
                self._start = netem.proc_net_dev(os.getpid())
            elif batch == window - 2 and self._start is not None:
                end = netem.proc_net_dev(os.getpid())
                n = window - 3
                self.net = ((end.tx_bytes - self._start.tx_bytes) / n, (end.rx_bytes - self._start.rx_bytes) / n)

    return LinkReader()


def timed_fits(keras, model, dataset, cfg, extra_callbacks=(), cpu: Optional[List] = None,
                net: Optional[List] = None, own_link: bool = False):
    """Step times of `reps` timed fits after a warm-up fit; with `cpu` (a list), also each fit's CPU per step.

    With cfg["per_global_step"], a fit's entry is one number: seconds per global step between its
    second and its last-but-one batch end (with backup workers this worker's batches skip steps).
    With `net` (a list), each fit's bytes per step: with `cpu`, on each task's link
    (`make_step_timer`); with `own_link`, on this process's own (`make_link_reader`).
    """
    model.fit(dataset, epochs=1, steps_per_epoch=cfg.get("warmup", 3), verbose=0, callbacks=list(extra_callbacks))
    reps = []
    for _ in range(cfg["reps"]):
        timer = make_step_timer(keras, cpu_window=cfg["steps"] if cpu is not None else None,
                                net=net is not None and not own_link)
        reader = make_link_reader(keras, cfg["steps"]) if net is not None and own_link else None
        model.fit(dataset, epochs=1, steps_per_epoch=cfg["steps"], verbose=0,
                  callbacks=[timer] + ([reader] if reader else []) + list(extra_callbacks))
        if cfg.get("per_global_step"):
            steps = timer.steps[-2] - timer.steps[1]
            reps.append([(timer.ends[-2] - timer.ends[1]) / max(steps, 1)])
        else:
            reps.append(steady_step_times(timer.ends))
        if cpu is not None:
            cpu.append(timer.cpu)
        if net is not None:
            net.append(reader.net if reader else timer.net)
    return reps
