"""`ArrivalTracker`: what the chief learns from the workers' pushes and takes: N, and who is slow.

Every push carries its compute time (seconds from the worker's read of a step to
its push; late ones included). The tracker feeds them to an arrival window, from
which `adaptive.AdaptiveN` (with `num_backup_workers="auto"`) chooses the next
step's N after each take, and `slow_workers.SlowWorkerDetector` names the
persistently slow workers (with any N). The aggregator owns one and calls it at
each wait (`observe_pushes`), take (`after_take`) and publish (`published`).
"""

import collections
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from tf_backup.protocol import adaptive as adaptive_lib
from tf_backup.protocol import config as config_lib
from tf_backup.protocol import pushes
from tf_backup.protocol import slots
from tf_backup.protocol import slow_workers as slow_workers_lib
from tf_backup.protocol.slots import Block


class ArrivalTracker:
    """The chief's compute-time window, adaptive N's rule (None with a fixed N) and slow-worker detector."""

    def __init__(self, config: config_lib.ProtocolConfig):
        settings = config.adaptive
        self.num_workers = config.num_workers
        self.rule = None if settings is None else adaptive_lib.AdaptiveN(
            config.num_workers, n_min=settings.n_min, n_max=settings.n_max, window=settings.window,
            warmup=settings.warmup, noise_factor=settings.noise_factor)
        # The rule's window, or one of its own for the persistent stragglers a fixed N has too.
        self.arrivals = (self.rule.arrivals if self.rule is not None else
                         adaptive_lib.ArrivalWindow(config.num_workers, config_lib.AdaptiveSettings.window, skip=1))
        self.slow_workers = slow_workers_lib.SlowWorkerDetector(config.num_workers)
        self._pushes_seen = np.zeros([config.num_workers], np.int64)  # per worker, pushes fed to the window
        self._pushed_at: Dict[int, float] = {}  # per worker, when its newest push was seen (monotonic)
        self._published_at: "collections.OrderedDict[int, float]" = collections.OrderedDict()  # step -> when
        self._started_at = time.monotonic()
        self._choice: Optional[adaptive_lib.Choice] = None  # the rule's last choice

    @property
    def adaptive(self) -> bool:
        return self.rule is not None

    @property
    def noise_scale(self) -> Optional[float]:
        """The rule's estimate of the simple noise scale (None with a fixed N)."""
        return None if self.rule is None else self.rule.noise.b_simple

    @property
    def expected_seconds(self) -> Tuple[float, ...]:
        """The step times the rule's last choice expected, per N from its lower bound up (`StepRecord`).

        () with a fixed N, or while the rule warms up (it expects nothing then: it waits for every worker).
        """
        if self._choice is None or not any(self._choice.rates):
            return ()
        return tuple(float(t) for t in self._choice.expected_times)

    def observe_pushes(self, ctl: slots.ControlView) -> None:
        """Feeds the window the compute times of the pushes new in `ctl` (late ones included)."""
        now = time.monotonic()
        for sample in pushes.new_pushes(self._pushes_seen, ctl):
            self._pushed_at[sample.worker] = now
            if sample.seconds >= 0:  # < 0: the first push of a fit (it traced), no time measured
                self.arrivals.add_sample(sample.worker, sample.step, sample.seconds)
        self._pushes_seen = np.maximum(self._pushes_seen, ctl.block(Block.PUSHED))

    def after_take(self, step: int, takes: List[pushes.Take], sq_norm_of_sum: float, period: float,
                   gone: frozenset, ctl: Optional[slots.ControlView]) -> Optional[int]:
        """After the take of `step` and its apply: updates the slow workers; returns the next step's N (None: fixed).

        `period`: seconds from the last publish to now (the wait, the take, the apply); `ctl`: the
        control vector last read (for the workers still computing).
        """
        n = None
        if self.rule is not None:
            counts = takes[0].counts
            self.rule.observe_take(step, np.flatnonzero(counts), period=period,
                                   sum_sq_norms=sum(t.sum_sq_norms for t in takes),
                                   sq_norm_of_sum=sq_norm_of_sum, n=int(counts.sum()))
            self._choice = self.rule.choose(step + 1, unavailable=gone, pending=self._pending(step, ctl))
            n = self._choice.n
        self.slow_workers.check(step, slow_workers_lib.medians(
            [self.arrivals.recent(w, step) for w in range(self.num_workers)]))
        return n

    def published(self, step: int, when: float) -> None:
        """`step` was published at `when` (monotonic): the workers computing it started then."""
        self._published_at[step] = when
        while len(self._published_at) > config_lib.AdaptiveSettings.window:
            self._published_at.popitem(last=False)

    def drain_changes(self) -> Tuple[int, ...]:
        """The workers with a change point in their compute times since the last drain (`StepRecord.change_points`)."""
        return tuple(w for w, _ in self.arrivals.drain_changes())

    def _pending(self, step: int, ctl: Optional[slots.ControlView]) -> List[float]:
        """Per worker, seconds it has been computing a gradient the chief has not seen (`adaptive.in_flight`)."""
        if ctl is None:
            return [0.0] * self.num_workers
        return adaptive_lib.in_flight(time.monotonic(), step, ctl.block(Block.LAST_TAG), ctl.block(Block.PUSHED),
                                      self._pushed_at, self._published_at, self._started_at)
