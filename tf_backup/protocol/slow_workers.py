"""Persistent stragglers: which worker is slow, by how much, and since which step. Pure, no I/O.

An operator replaces a host that is slow for long stretches; a Pareto stall of one step is no reason
to. A worker is *persistently slow* once its median compute time over the arrival window
(`adaptive.ArrivalWindow`, the same samples the adaptive rule uses: every push, late ones
included) has been at least `threshold` times the median of all workers' medians at `persist`
consecutive checks (one a step). It is reported with that ratio, as of the latest check, and
the step of the first check of the run; it is no longer slow at the first check below the
threshold. A worker without samples (not pushed yet, or declared dead: the liveness events say
so) is not judged. The slowest of them reaches every worker's Keras logs through `control`'s SLOW
slots (`Slowest`).
"""

import statistics
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from tf_backup import _checks

THRESHOLD = 1.2  # 20% slower than the typical worker, as a median
PERSIST = 20  # checks (steps) in a row


class SlowWorker(NamedTuple):
    """A persistently slow worker: its median compute time over the workers' median, since `since_step`."""

    worker: int
    factor: float
    since_step: int


class SlowWorkerDetector:
    """The state machine per worker: fast -> suspect (since a step) -> slow (reported) -> fast."""

    def __init__(self, num_workers: int, threshold: float = THRESHOLD, persist: int = PERSIST):
        self.num_workers = _checks.check_int("num_workers", num_workers, 1)
        if not (isinstance(threshold, (int, float)) and threshold > 1):
            raise ValueError(f"`threshold` must be a number > 1. Received threshold={threshold!r}")
        self.threshold = float(threshold)
        self.persist = _checks.check_int("persist", persist, 1)
        self._since: Dict[int, int] = {}  # worker -> the first step of its run above the threshold
        self._runs: Dict[int, int] = {}  # worker -> checks in a row above the threshold
        self._factors: Dict[int, float] = {}
        self.slow: Tuple[SlowWorker, ...] = ()

    def check(self, step: int, medians: Sequence[Optional[float]]) -> Tuple[SlowWorker, ...]:
        """One check at `step` from each worker's median compute time (None: no samples); the slow workers."""
        if len(medians) != self.num_workers:
            raise ValueError(f"`medians` must have one value per worker ({self.num_workers}). "
                             f"Received {len(medians)}")
        known = [m for m in medians if m is not None]
        typical = statistics.median(known) if known else 0.0
        for w, m in enumerate(medians):
            if m is None or typical <= 0 or m < self.threshold * typical:
                self._since.pop(w, None)
                self._runs.pop(w, None)
                self._factors.pop(w, None)
                continue
            self._since.setdefault(w, int(step))
            self._runs[w] = self._runs.get(w, 0) + 1
            self._factors[w] = m / typical
        self.slow = tuple(SlowWorker(w, self._factors[w], self._since[w]) for w in sorted(self._runs)
                          if self._runs[w] >= self.persist)
        return self.slow


class Slowest(NamedTuple):
    """What every worker's Keras logs show of the slow workers (the control vector's SLOW slots): how many,
    and the slowest one's index (-1: none), factor (0: none) and first step (-1: none)."""

    count: int
    worker: int
    factor: float
    since_step: int

    @classmethod
    def of(cls, slow: Sequence[SlowWorker]) -> "Slowest":
        """The slowest of `slow` (the largest factor; ties: the lower index)."""
        if not slow:
            return NONE
        top = max(slow, key=lambda s: (s.factor, -s.worker))
        return cls(len(slow), top.worker, top.factor, top.since_step)

    def as_slots(self) -> Tuple[int, int, int, int]:
        """As the four int64 slots (`slots.Control.SLOW`): the factor in thousandths."""
        return self.count, self.worker, int(round(self.factor * FACTOR_SCALE)), self.since_step

    @classmethod
    def from_slots(cls, values: Sequence[int]) -> "Slowest":
        count, worker, factor, since = (int(v) for v in values)
        if count <= 0:  # also a control vector written before any check (all zeros)
            return NONE
        return cls(count, worker, factor / FACTOR_SCALE, since)


FACTOR_SCALE = 1000  # the factor's slot holds thousandths (the control vector is int64)
NONE = Slowest(0, -1, 0.0, -1)


def medians(recent: Sequence[List[float]]) -> List[Optional[float]]:
    """Each worker's median of its recent samples (None: none)."""
    return [statistics.median(x) if x else None for x in recent]


class SlowSpan(NamedTuple):
    """One stretch in which a worker was reported slow: from `since_step` to `last_step` (inclusive),
    the largest factor it was reported with."""

    worker: int
    since_step: int
    last_step: int
    factor: float


def spans(per_step: Sequence[Tuple[int, Sequence[SlowWorker]]]) -> List[SlowSpan]:
    """The stretches of slowness in a step record: `(step, slow workers as of it)` in step order."""
    open_spans: Dict[Tuple[int, int], SlowSpan] = {}
    for step, slow in per_step:
        for s in slow:
            key = (s.worker, s.since_step)
            old = open_spans.get(key)
            open_spans[key] = SlowSpan(s.worker, s.since_step, step, max(s.factor, old.factor if old else 0.0))
    return sorted(open_spans.values(), key=lambda s: (s.since_step, s.worker))
