"""Adaptive N: the rule that picks how many gradients a step waits for (`num_backup_workers="auto"`).

Pure functions and small state, no I/O and no TensorFlow: the chief's aggregator
(`tf_backup.chief.aggregator`) feeds them the pushes' compute times and each take's gradient norms.

The rule. Choose N in `[n_min, n_max]` to maximise the expected progress per second,

    rate(N) = progress(N) / E[T_(N)],      progress(N) = 1 / (1 + B_simple / (N * batch)),

* `T_(N)`: seconds from a publish until the N-th gradient for the new step is in: the step
  overhead plus the N-th order statistic of the workers' compute times (`ArrivalWindow`,
  `AdaptiveN`), over the last `window` steps.
* `progress(N)`: the loss decrease of a step that averages N gradients of `batch` examples each,
  relative to a step on the full-batch gradient (McCandlish et al., "An Empirical Model of
  Large-Batch Training", 2018, eq. 2.6: with the best learning rate a step of batch B improves
  the loss by `1 / (1 + B_noise / B)` of the noiseless step's improvement).
* `B_simple = tr(Sigma) / |G|^2`, the simple noise scale (their eq. 2.8), estimated from the
  gradients each step averages (`NoiseScale`).

With the inner optimizer's factor f (`OPTIMIZER_NOISE`, measured) the model's B_simple is
f x the measured one. Ties go to the larger N, and the current N stays unless another's rate is
more than `MARGIN` higher. Until `warmup` steps were taken the rule answers `n_max`. It settles
in a few steps (issue 33): each worker's first timed sample is dropped (`skip`), a change point
in a worker's samples drops its older ones (`change_point`), and a worker in flight for long counts
as at least that slow (`in_flight`, `ArrivalWindow.expected_order_statistics`).
Learning rate: the chief averages the N gradients whatever N is, so the inner optimizer's learning
rate stays as set (a larger N gives a less noisy step of the same size, not a larger step).
Everything here is deterministic: the same observations give the same choices.
"""

import collections
import dataclasses
import math
from typing import Collection, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from tf_backup import _checks

MARGIN = 0.05  # another N replaces the current one only if its rate is 5% higher
CHANGE = 1.2  # a worker's newest RECENT samples all this many times slower (or faster): a change point
RECENT = 4
FAST = (2, 2.5)  # or its newest 2 samples both 2.5x off: a large change needs fewer pushes (`change_point`)
SPREAD = 16  # or its newest RECENT all beyond every one of at least SPREAD older samples
GAP = 1 + 1e-6  # `outside`: closer than this (a ratio) is the same time (float rounding, microsecond slots)

# What one more gradient is worth to the inner optimizer at the learning rate it was given (kept
# whatever N is), as a factor on the measured simple noise scale: the effective noise scale that
# fits the loss decrease per step of N = 1 .. 6 (`progress` with B = factor x B_simple), over the
# B_simple measured on the same runs (`benchmarks/progress_model.py`, the default job's MNIST-1D
# CNN, 400 steps, 2 seeds: sgd 0.31, momentum 0.13, adam 1.06; benchmarks/results/adaptive_sim.md).
# The paper's model assumes the best learning rate for every batch size: it holds for Adam here
# (1.06, taken as 1), while SGD and momentum at a fixed learning rate gain 3-8x less from more
# gradients than it says. Other optimizers: 1 (the paper's model, unmeasured).
OPTIMIZER_NOISE = {"sgd": 0.3, "momentum": 0.13, "adam": 1.0}


def noise_factor_for(class_name: str, momentum: float = 0.0) -> float:
    """`OPTIMIZER_NOISE` of a Keras optimizer by its class name (SGD with momentum > 0: "momentum";
    AdamW, Adamax, Nadam: "adam"); 1.0 for the others (the paper's model, unmeasured here)."""
    name = class_name.lower()
    if name == "sgd":
        return OPTIMIZER_NOISE["momentum" if momentum else "sgd"]
    if name in ("adam", "adamw", "adamax", "nadam"):
        return OPTIMIZER_NOISE["adam"]
    return 1.0


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


def in_flight(now: float, step: int, tags: Sequence[int], pushed: Sequence[int], pushed_at: Mapping[int, float],
              published_at: Mapping[int, float], started_at: float) -> List[float]:
    """Per worker, seconds it has been computing a gradient not pushed yet, after the take of `step`.

    0 for a worker whose last push was for `step` (it waits for the publish). Another started
    when the chief saw its last push (`pushed_at`), or when the step after that push's was
    published (`published_at`), whichever came later; `started_at` (the chief's start) stands
    for what is not known (no push yet, or a publish no longer kept). Times: one monotonic clock.
    """
    out = []
    for w, (tag, count) in enumerate(zip(tags, pushed)):
        if count and tag >= step:
            out.append(0.0)
            continue
        since = max(pushed_at.get(w, started_at), published_at.get(int(tag) + 1, started_at) if count else started_at)
        out.append(max(0.0, now - since))
    return out


class Choice(NamedTuple):
    """One decision of the rule, with what it was made from."""

    n: int
    b_simple: float
    expected_times: Tuple[float, ...]  # E[T_(n)] for n = n_min .. n_max (inf: not enough data)
    rates: Tuple[float, ...]  # progress(n) / E[T_(n)], same order


def choose(expected_times: Sequence[float], b_simple: float, batch: int, n_min: int,
           current: Optional[int] = None, margin: float = 0.0) -> Choice:
    """The N in `[n_min, n_min + len(expected_times) - 1]` with the highest progress per second.

    Args:
      expected_times: E[T_(n)] for n = n_min, n_min + 1, ...; inf where unknown.
      b_simple: the noise scale (inf: noise only).
      batch: examples in one worker's gradient.
      n_min: the N of `expected_times[0]`.
      current: the N in use; it is kept unless another's rate is more than `margin` (a fraction)
        higher. Estimates from a window are noisy: without this, N flaps between near-ties, and
        since E[T_(N)] is convex in N a mix of N - 1 and N + 1 is slower than N.
    """
    rates = []
    for k, t in enumerate(expected_times):
        n = n_min + k
        rates.append(0.0 if not t > 0 or math.isinf(t) else progress(n, b_simple, batch) / t)
    best = max(range(len(rates)), key=lambda k: (rates[k], k))  # ties: the larger N
    if rates[best] == 0.0:  # nothing known: wait for every worker allowed
        best = len(rates) - 1
    keep = None if current is None else current - n_min
    if keep is not None and 0 <= keep < len(rates) and rates[keep] > 0 and rates[best] <= (1 + margin) * rates[keep]:
        best = keep
    return Choice(n=n_min + best, b_simple=b_simple, expected_times=tuple(expected_times), rates=tuple(rates))


def changed(samples: Sequence[float], recent: int, ratio: float) -> bool:
    """A change point: the newest `recent` of `samples` (oldest first) are all more than `ratio` times
    slower, or all `ratio` times faster, than the median of the ones before (at least `recent` of them).

    All of them, not their mean: one Pareto stall is no change, a worker that became slow is; with
    `recent` = 3 and i.i.d. samples the test fires with probability P(X > ratio * median)^3 per push.
    """
    if recent < 1 or len(samples) < 2 * recent:
        return False
    before = float(np.median(samples[:-recent]))
    new = samples[-recent:]
    return min(new) > ratio * before or max(new) * ratio < before


def outside(samples: Sequence[float], recent: int, older: int) -> bool:
    """The newest `recent` of `samples` all below the least, or all above the greatest, of the ones
    before (at least `older` of them), by more than `GAP` (times equal up to rounding are no change).

    A shift too small for the ratio (a calm phase after Pareto stalls: 0.1 s against a median of
    0.118 s) but beyond the whole spread of the older samples. With i.i.d. continuous samples it
    fires with probability 2 recent! m! / (m + recent)! for m older ones (m = 16, recent = 4: 4e-4).
    """
    if recent < 1 or len(samples) < recent + max(older, 1):
        return False
    before, new = samples[:-recent], samples[-recent:]
    return max(new) * GAP < min(before) or min(new) > GAP * max(before)


def change_point(samples: Sequence[float], recent: int, ratio: float, fast: Optional[Tuple[int, float]] = FAST,
                 spread: int = SPREAD) -> int:
    """How many of a worker's newest `samples` (oldest first) to keep after a change point; 0: no change.

    Three tests, the first that fires wins: its newest `fast[0]` all `fast[1]` times off the median
    before (`changed`: a large change in few pushes); its newest `recent` all `ratio` times off;
    its newest `recent` all beyond the older ones' spread (`outside`, with at least `spread` of them).
    `recent` = 0 turns all three off; `fast` None or `spread` 0 turn theirs off.
    """
    if recent < 1:
        return 0
    if fast is not None and changed(samples, fast[0], fast[1]):
        return fast[0]
    if changed(samples, recent, ratio) or (spread and outside(samples, recent, spread)):
        return recent
    return 0


class ArrivalWindow:
    """Each worker's recent compute times, and the expected order statistics of the arrivals.

    A sample is one push: the worker, the step it was for, and the seconds from the worker's
    read of that step to its push (`pushes.PushSample`), late pushes the step was taken
    without included. A worker keeps its samples of the last `size` steps (at least its newest
    one). The arrivals of a step are modelled as one draw per worker from its own samples, so a
    worker that is slow, and therefore pushes less often, counts as much as a fast one.

    E[T_(n)], the mean of the n-th earliest arrival, is estimated by aligned resampling: row j
    takes each worker's j-th newest sample (cycling through a worker's samples when it has
    fewer), sorts the row, and the estimate is the mean of the rows' n-th entries. When every
    worker has one sample per step this is the plain mean over steps of each step's n-th
    arrival; deterministic either way. A worker without samples (or marked unavailable)
    arrives never (inf).
    """

    def __init__(self, num_workers: int, size: int, skip: int = 0, recent: int = 0, change: float = CHANGE,
                 fast: Optional[Tuple[int, float]] = FAST, spread: int = SPREAD):
        self.num_workers = _checks.check_int("num_workers", num_workers, 1)
        self.size = _checks.check_int("window", size, 1)
        self.skip = _checks.check_int("skip", skip, 0)
        self.recent_size = _checks.check_int("recent", recent, 0)
        self.change = change
        self.fast, self.spread = fast, spread
        self._samples = [collections.deque(maxlen=self.size) for _ in range(self.num_workers)]
        self._skipped = [0] * self.num_workers
        self._steps = 0  # the steps `add` recorded
        self.changes: List[Tuple[int, int]] = []  # (worker, step) of each change point found, until drained

    def add_sample(self, worker: int, step: int, seconds: float) -> None:
        """One push of `worker`, for `step`, `seconds` after it read that step.

        A worker's first `skip` samples are dropped (they include tracing and cold caches). With
        `recent` > 0, a change point (`change_point`) drops the worker's samples before the newest
        ones that changed.
        """
        if self._skipped[worker] < self.skip:
            self._skipped[worker] += 1
            return
        samples = self._samples[worker]
        samples.append((int(step), float(seconds)))
        keep = self.recent_size and change_point([x for _, x in samples], self.recent_size, self.change, self.fast,
                                                 self.spread)
        if keep:
            self.changes.append((worker, int(step)))
            for _ in range(len(samples) - keep):
                samples.popleft()

    def drain_changes(self) -> List[Tuple[int, int]]:
        """The change points found since the last drain, oldest first; forgets them (a long job finds thousands)."""
        out, self.changes = self.changes, []
        return out

    def add(self, arrivals: Sequence[float]) -> None:
        """A whole step: per worker its arrival (inf: none), as the step after the last `add`."""
        if len(arrivals) != self.num_workers:
            raise ValueError(f"`arrivals` must have one time per worker ({self.num_workers}). "
                             f"Received {len(arrivals)}")
        for w, seconds in enumerate(arrivals):
            if math.isfinite(seconds):
                self.add_sample(w, self._steps, seconds)
        self._steps += 1

    def sample_for(self, worker: int, step: int) -> Optional[float]:
        """`worker`'s compute time for `step`, if its push for it was seen."""
        for s, seconds in reversed(self._samples[worker]):
            if s == step:
                return seconds
            if s < step:
                break
        return None

    def recent(self, worker: int, step: Optional[int] = None) -> List[float]:
        """`worker`'s samples for steps after `step - size` (newest last; at least its newest)."""
        samples = self._samples[worker]
        if step is None:
            step = self._steps
        kept = [seconds for s, seconds in samples if s > step - self.size]
        return kept or [seconds for _, seconds in list(samples)[-1:]]

    def expected_order_statistics(self, step: Optional[int] = None, unavailable: Collection[int] = (),
                                  pending: Optional[Sequence[float]] = None) -> np.ndarray:
        """E[T_(n)] for n = 1 .. num_workers (inf where fewer than n workers have samples).

        `pending`: per worker, seconds it has been computing a gradient not pushed yet (0: none).
        Once that is more than twice its slowest recent sample, its next arrival is at least that
        late (a censored sample): each of its samples counts as `max(sample, pending)`, so a worker
        that stopped pushing (dead, or asleep) is left out as fast as its silence grows, without
        waiting for its next sample or a heartbeat. Below that it is a stall its samples already
        hold (counting those too made the event model's Pareto phase pick N one too small).
        """
        samples = [[] if w in unavailable else self.recent(w, step) for w in range(self.num_workers)]
        if pending is not None:
            samples = [[max(x, float(p)) for x in xs] if xs and p > 2 * max(xs) else xs for xs, p in zip(samples, pending)]
        rows = max((len(x) for x in samples), default=0)
        if rows == 0:
            return np.full([self.num_workers], np.inf)
        table = np.array([[x[-1 - j % len(x)] if x else np.inf for x in samples] for j in range(rows)])
        return np.sort(table, axis=1).mean(axis=0)

    def expected_order_statistic(self, n: int, step: Optional[int] = None) -> float:
        n = _checks.check_int("n", n, 1)
        if n > self.num_workers:
            raise ValueError(f"`n` must be at most the number of workers ({self.num_workers}). Received n={n}")
        return float(self.expected_order_statistics(step)[n - 1])


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
    """The rule with its state: observe pushes and takes, choose the next step's N.

    E[T_(N)] = the window's mean step overhead (a step's period minus the compute time of its
    last gradient taken: wake-ups, pulls, pushes, the chief's apply) + the expected N-th
    compute time (`ArrivalWindow`).

    Args:
      num_workers: N + b.
      batch: examples in one worker's gradient; 1 measures the noise scale in worker batches
        (what the chief does: it does not know the batch, and `progress` needs only the ratio).
      n_min, n_max: the bounds of N (`check_bounds`).
      window: steps the arrival times, the overhead and the noise estimates are averaged over.
      warmup: takes observed before the rule answers anything but `n_max`.
      margin: how much higher (a fraction) another N's rate must be to replace the last choice.
      noise_factor: what one more gradient is worth to the inner optimizer, as a factor on the
        measured noise scale (`OPTIMIZER_NOISE`; 1: the model's SGD with the best learning rate).
      skip: each worker's first timed samples dropped (`ArrivalWindow`).
      recent: samples of a change-point test (`changed`; 0: none): a worker's older samples are
        dropped once its `recent` newest all differ from them by more than `CHANGE`.
    """

    def __init__(self, num_workers: int, batch: int = 1, n_min: Optional[int] = None,
                 n_max: Optional[int] = None, window: int = 50, warmup: int = 5, margin: float = MARGIN,
                 noise_factor: float = 1.0, skip: int = 1, recent: int = RECENT, change: float = CHANGE,
                 fast: Optional[Tuple[int, float]] = FAST, spread: int = SPREAD):
        self.n_min, self.n_max = check_bounds(num_workers, n_min, n_max)
        self.batch = _checks.check_int("batch", batch, 1)
        self.warmup = _checks.check_int("warmup", warmup, 0)
        if not (isinstance(noise_factor, (int, float)) and math.isfinite(noise_factor) and noise_factor > 0):
            raise ValueError(f"`noise_factor` must be a finite number > 0. Received noise_factor={noise_factor!r}")
        self.noise_factor = float(noise_factor)
        self.arrivals = ArrivalWindow(num_workers, window, skip=skip, recent=recent, change=change, fast=fast,
                                      spread=spread)
        self.noise = NoiseScale(batch, window)
        self._overheads = collections.deque(maxlen=window)
        self.takes = 0
        self.margin = margin
        self.current: Optional[int] = None  # the last choice

    @property
    def overhead(self) -> float:
        """The window's median step overhead (a median: a step stalled by a pull or a save is not overhead)."""
        return float(np.median(self._overheads)) if self._overheads else 0.0

    def observe_push(self, sample) -> None:
        """One push (a `pushes.PushSample`: worker, step, seconds)."""
        self.arrivals.add_sample(sample.worker, sample.step, sample.seconds)

    def observe_take(self, step: int, workers: Sequence[int], period: float, sum_sq_norms: float,
                     sq_norm_of_sum: float, n: int) -> None:
        """The take of `step`: the `workers` whose gradients it averaged (n in all), the seconds since
        the step was published, and the norms (`NoiseScale.add`)."""
        self.takes += 1
        self.noise.add(sum_sq_norms, sq_norm_of_sum, n)
        last = [self.arrivals.sample_for(w, step) for w in workers]
        if last and all(t is not None for t in last):
            self._overheads.append(max(0.0, period - max(last)))

    def observe(self, arrivals: Sequence[float], sum_sq_norms: float, sq_norm_of_sum: float, n: int) -> None:
        """A whole step at once (a generated trace): every worker's arrival, the norms of the n averaged."""
        self.arrivals.add(arrivals)
        self.noise.add(sum_sq_norms, sq_norm_of_sum, n)
        self.takes += 1

    def choose(self, step: Optional[int] = None, unavailable: Collection[int] = (),
               pending: Optional[Sequence[float]] = None) -> Choice:
        """The N of the step after `step` (None: after the last `observe`); never more than the workers
        that are not `unavailable` (declared dead or left), nor fewer than `n_min`.

        `pending`: per worker, seconds since it started a gradient it has not pushed (0: none;
        `ArrivalWindow.expected_order_statistics`). The progress model uses `noise_factor` times
        the measured noise scale (`OPTIMIZER_NOISE`).
        """
        b_simple = self.noise.b_simple * self.noise_factor
        n_max = max(self.n_min, min(self.n_max, self.arrivals.num_workers - len(set(unavailable))))
        span = n_max - self.n_min + 1
        if self.takes < max(self.warmup, 1):
            return Choice(n_max, b_simple, (math.inf,) * span, (0.0,) * span)
        times = self.arrivals.expected_order_statistics(step, unavailable, pending)[self.n_min - 1:n_max]
        times = times + self.overhead
        choice = choose([float(t) for t in times], b_simple, self.batch, self.n_min, self.current, self.margin)
        self.current = choice.n
        return choice
