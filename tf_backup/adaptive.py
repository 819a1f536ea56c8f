"""Adaptive N: the rule that picks how many gradients a step waits for (issue 19, the policy only).

Pure functions and small state, no I/O and no TensorFlow: the chief's aggregator is to feed them
each step's arrival times and gradient norms (not wired yet: `num_backup_workers="auto"` does not
exist yet).

The rule. Choose N in `[n_min, n_max]` to maximise the expected progress per second,

    rate(N) = progress(N) / E[T_(N)],      progress(N) = 1 / (1 + B_simple / (N * batch)),

* `T_(N)`: seconds from a publish until the N-th gradient for the new step arrives, the N-th
  order statistic of the workers' arrival times; `E[T_(N)]` is its mean over the last `window`
  steps (`ArrivalWindow`).
* `progress(N)`: the loss decrease of a step that averages N gradients of `batch` examples each,
  relative to a step on the full-batch gradient (McCandlish et al., "An Empirical Model of
  Large-Batch Training", 2018, eq. 2.6: with the best learning rate a step of batch B improves
  the loss by `1 / (1 + B_noise / B)` of the noiseless step's improvement).
* `B_simple = tr(Sigma) / |G|^2`, the simple noise scale (their eq. 2.8), estimated from the
  gradients each step averages (`NoiseScale`).

Ties go to the larger N. Until the window holds `warmup` steps the rule answers `n_max`.
Learning rate: the chief averages the N gradients whatever N is, so the inner optimizer's learning
rate stays as set (a larger N gives a less noisy step of the same size, not a larger step).
Everything here is deterministic: the same observations give the same choices.
"""

import collections
import dataclasses
import math
from typing import NamedTuple, Optional, Sequence, Tuple

from tf_backup import _checks


def check_bounds(num_workers: int, n_min: Optional[int], n_max: Optional[int]) -> Tuple[int, int]:
    """The bounds of N, defaults 1 and `num_workers`.

    Raises:
      TypeError, ValueError: a bound that is not an integer, or not `1 <= n_min <= n_max <=
        num_workers`, naming the argument and the value.
    """
    n_min = 1 if n_min is None else _checks.check_int("min_replicas_to_aggregate", n_min, 1)
    n_max = num_workers if n_max is None else _checks.check_int("max_replicas_to_aggregate", n_max, 1)
    if n_max > num_workers:
        raise ValueError(f"`max_replicas_to_aggregate` must be at most the number of workers ({num_workers}). "
                         f"Received max_replicas_to_aggregate={n_max}")
    if n_min > n_max:
        raise ValueError("`min_replicas_to_aggregate` must not exceed `max_replicas_to_aggregate`. Received "
                         f"min_replicas_to_aggregate={n_min}, max_replicas_to_aggregate={n_max}")
    return n_min, n_max


def progress(n: int, b_simple: float, batch: int) -> float:
    """The relative loss decrease of a step averaging `n` gradients of `batch` examples."""
    if math.isinf(b_simple):
        return float(n)  # the limit up to a constant factor (n * batch / B_simple): only ratios matter
    return 1.0 / (1.0 + b_simple / (n * batch))


class Choice(NamedTuple):
    """One decision of the rule, with what it was made from."""

    n: int
    b_simple: float
    expected_times: Tuple[float, ...]  # E[T_(n)] for n = n_min .. n_max (inf: not enough data)
    rates: Tuple[float, ...]  # progress(n) / E[T_(n)], same order


def choose(expected_times: Sequence[float], b_simple: float, batch: int, n_min: int) -> Choice:
    """The N in `[n_min, n_min + len(expected_times) - 1]` with the highest progress per second.

    Args:
      expected_times: E[T_(n)] for n = n_min, n_min + 1, ...; inf where unknown.
      b_simple: the noise scale (inf: noise only).
      batch: examples in one worker's gradient.
      n_min: the N of `expected_times[0]`.
    """
    rates = []
    for k, t in enumerate(expected_times):
        n = n_min + k
        rates.append(0.0 if not t > 0 or math.isinf(t) else progress(n, b_simple, batch) / t)
    best = max(range(len(rates)), key=lambda k: (rates[k], k))  # ties: the larger N
    if rates[best] == 0.0:  # nothing known: wait for every worker allowed
        best = len(rates) - 1
    return Choice(n=n_min + best, b_simple=b_simple, expected_times=tuple(expected_times), rates=tuple(rates))


class ArrivalWindow:
    """The workers' arrival times of the last `size` steps, and their order statistics.

    One step's arrivals: per worker, the seconds from the publish of the step to that worker's
    gradient for it; `inf` for a worker whose gradient did not come before the step was taken.
    """

    def __init__(self, num_workers: int, size: int, min_fraction: float = 0.5):
        self.num_workers = _checks.check_int("num_workers", num_workers, 1)
        self.size = _checks.check_int("window", size, 1)
        self.min_fraction = min_fraction
        self._steps = collections.deque(maxlen=self.size)

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, arrivals: Sequence[float]) -> None:
        if len(arrivals) != self.num_workers:
            raise ValueError(f"`arrivals` must have one time per worker ({self.num_workers}). "
                             f"Received {len(arrivals)}")
        self._steps.append(tuple(sorted(float(a) for a in arrivals)))

    def expected_order_statistic(self, n: int) -> float:
        """The mean over the window of the n-th arrival; inf if it was missing in too many steps.

        A step whose n-th gradient never came (the step was taken with fewer) tells only that it
        would have been late: the mean is over the steps where it came, and inf if those are fewer
        than `min_fraction` of the window.
        """
        n = _checks.check_int("n", n, 1)
        if n > self.num_workers:
            raise ValueError(f"`n` must be at most the number of workers ({self.num_workers}). Received n={n}")
        seen = [step[n - 1] for step in self._steps if math.isfinite(step[n - 1])]
        if not seen or len(seen) < self.min_fraction * len(self._steps):
            return math.inf
        return sum(seen) / len(seen)


@dataclasses.dataclass
class NoiseScale:
    """The simple noise scale `B_simple = tr(Sigma) / |G|^2`, from the gradients the steps average.

    Each step that averages n >= 2 gradients, each a mean over `batch` examples, gives
    `sum_i |g_i|^2` and `|sum_i g_i|^2`. With `B_small = batch` and `B_big = n * batch`,
    `|G_small|^2 = sum_i |g_i|^2 / n` and `|G_big|^2 = |sum_i g_i|^2 / n^2` are unbiased for
    `|G|^2 + tr(Sigma) / B`, which gives the unbiased estimates (McCandlish et al., appendix A.1)

        |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big).

    Both are averaged over the last `window` steps before their ratio is taken (the ratio of
    means, as the paper advises: each step's estimate of |G|^2 can be negative).
    """

    batch: int
    window: int = 100
    _g2: collections.deque = dataclasses.field(default=None, repr=False)
    _trace: collections.deque = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        _checks.check_int("batch", self.batch, 1)
        _checks.check_int("window", self.window, 1)
        self._g2 = collections.deque(maxlen=self.window)
        self._trace = collections.deque(maxlen=self.window)

    def __len__(self) -> int:
        return len(self._g2)

    def add(self, sum_sq_norms: float, sq_norm_of_sum: float, n: int) -> None:
        """One step's `sum_i |g_i|^2` and `|sum_i g_i|^2` over its `n` gradients (n < 2: ignored)."""
        if n < 2:
            return
        small, big = sum_sq_norms / n, sq_norm_of_sum / (n * n)
        b_small, b_big = self.batch, n * self.batch
        self._g2.append((b_big * big - b_small * small) / (b_big - b_small))
        self._trace.append((small - big) / (1.0 / b_small - 1.0 / b_big))

    @property
    def b_simple(self) -> float:
        """The estimate; 0 before any step (no noise known: every N makes the same progress)."""
        if not self._g2:
            return 0.0
        g2, trace = sum(self._g2) / len(self._g2), sum(self._trace) / len(self._trace)
        if g2 <= 0:
            return math.inf
        return max(trace, 0.0) / g2


class AdaptiveN:
    """The rule with its state: observe each step, choose the next step's N.

    Args:
      num_workers: N + b.
      batch: examples in one worker's gradient.
      n_min, n_max: the bounds of N (`check_bounds`).
      window: steps the arrival times and the noise estimates are averaged over.
      warmup: steps observed before the rule answers anything but `n_max`.
    """

    def __init__(self, num_workers: int, batch: int, n_min: Optional[int] = None, n_max: Optional[int] = None,
                 window: int = 100, warmup: int = 10):
        self.n_min, self.n_max = check_bounds(num_workers, n_min, n_max)
        self.batch = _checks.check_int("batch", batch, 1)
        self.warmup = _checks.check_int("warmup", warmup, 0)
        self.arrivals = ArrivalWindow(num_workers, window)
        self.noise = NoiseScale(batch, window)

    def observe(self, arrivals: Sequence[float], sum_sq_norms: float, sq_norm_of_sum: float, n: int) -> None:
        """One taken step: every worker's arrival time, and the norms of the n gradients averaged."""
        self.arrivals.add(arrivals)
        self.noise.add(sum_sq_norms, sq_norm_of_sum, n)

    def choose(self) -> Choice:
        b_simple = self.noise.b_simple
        if len(self.arrivals) < max(self.warmup, 1):
            span = self.n_max - self.n_min + 1
            return Choice(self.n_max, b_simple, (math.inf,) * span, (0.0,) * span)
        times = [self.arrivals.expected_order_statistic(n) for n in range(self.n_min, self.n_max + 1)]
        return choose(times, b_simple, self.batch, self.n_min)
