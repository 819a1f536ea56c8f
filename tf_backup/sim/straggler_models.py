"""Seeded straggler models: extra delay per worker per step.

Backup workers pay off when some workers are slow. To measure that on a
machine where every worker is equally fast, a worker sleeps before each batch
for a delay drawn from a straggler model. The training binary, the benchmarks
and the tests share these models, each built from a spec string
(`tf_backup.sim.specs.parse`, which lists the specs): `NoStragglers`,
`SlowWorkers`, `ExponentialDelay`, `ParetoDelay`, `TraceDelay`, `SumDelay`,
whose conditions hold at once, and `PhasedDelay`, whose conditions change while
a job runs.

A delay is a pure function of `(seed, worker, step)` (and `compute_seconds`
for `slow`): it is drawn from `np.random.default_rng([seed, worker, step])`,
so it does not depend on the order of the calls or on which process asks. Every
process of a job given the same spec and seed agrees on who straggles when.

Usage (`tf_backup.sim.stragglers` re-exports these names beside `parse`,
`ideal_step_times` and `StragglerCallback`, which sleeps a model's delays in `fit`):

  model = stragglers.parse("pareto:1.5:0.02", seed=7)
  # Benchmarks, without training:
  times = compute + model.delays(num_workers=4, num_steps=1000,
                                 compute_seconds=compute)
  ideal = stragglers.ideal_step_times(times, n=3)  # 3 of 4 aggregated
"""

import dataclasses
import math
from typing import Tuple

import numpy as np

from tf_backup import _checks


def spec_number(value) -> str:
    """Formats a float for a normalized spec: `3.0` -> `3`, `0.1` -> `0.1`."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclasses.dataclass(frozen=True)
class StragglerModel:
    """A straggler model: the delay of each worker at each step.

    Build one with `tf_backup.sim.specs.parse`. Subclasses implement `_delay`.

    Attributes:
      spec: the normalized spec string; `parse(model.spec, model.seed)` gives an
        equal model.
      seed: the seed of the random draws (unused by deterministic models).
    """

    spec: str
    seed: int

    def delay(self, worker: int, step: int, compute_seconds: float = 0.0) -> float:
        """Seconds that `worker` waits before computing `step`.

        Args:
          worker: the worker index, >= 0.
          step: the step (batch) index, >= 0.
          compute_seconds: the measured compute time of the step, >= 0; only
            `slow` uses it.

        Returns:
          The delay in seconds, >= 0. The same arguments give the same value in
          every process, whatever was asked before.

        Raises:
          TypeError: if `worker` or `step` is not an integer.
          ValueError: if `worker` or `step` is negative, `compute_seconds` is
            negative or not finite, or (`trace`) `worker` has no column.
        """
        worker = _checks.check_int("worker", worker, 0)
        step = _checks.check_int("step", step, 0)
        compute_seconds = float(compute_seconds)
        if not math.isfinite(compute_seconds) or compute_seconds < 0:
            raise ValueError("`compute_seconds` must be a finite number >= 0. "
                             f"Received: compute_seconds={compute_seconds!r}")
        return float(self._delay(worker, step, compute_seconds))

    def delays(self, num_workers: int, num_steps: int, compute_seconds=0.0) -> np.ndarray:
        """The delays of workers `0..num_workers-1` at steps `0..num_steps-1`.

        Args:
          num_workers: number of workers (columns), >= 1.
          num_steps: number of steps (rows), >= 0.
          compute_seconds: a float, or an array broadcastable to
            `[num_steps, num_workers]` of per-step compute times.

        Returns:
          A float64 array of shape `[num_steps, num_workers]`; entry `[s, w]`
          is `delay(w, s, compute_seconds[s, w])`.

        Raises:
          ValueError: if a count is out of range or `compute_seconds` does not
            broadcast; as `delay` otherwise.
        """
        num_workers = _checks.check_int("num_workers", num_workers, 0)
        num_steps = _checks.check_int("num_steps", num_steps, 0)
        if num_workers < 1:
            raise ValueError(f"`num_workers` must be >= 1. Received: num_workers={num_workers}")
        compute = np.broadcast_to(np.asarray(compute_seconds, dtype=np.float64),
                                  (num_steps, num_workers))
        out = np.empty((num_steps, num_workers), dtype=np.float64)
        for step in range(num_steps):
            for worker in range(num_workers):
                out[step, worker] = self.delay(worker, step, compute[step, worker])
        return out

    def describe(self) -> str:
        """One line for summaries and logs."""
        raise NotImplementedError

    def _rng(self, worker, step):
        return np.random.default_rng([self.seed, worker, step])

    def _delay(self, worker, step, compute_seconds):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class NoStragglers(StragglerModel):
    """`none`: every delay is 0."""

    def describe(self) -> str:
        return "stragglers: none"

    def _delay(self, worker, step, compute_seconds):
        return 0.0


@dataclasses.dataclass(frozen=True)
class SlowWorkers(StragglerModel):
    """`slow:W1,W2:FACTOR`: the listed workers are FACTOR times slower.

    Attributes:
      workers: the slow workers, sorted, without repeats.
      factor: how many times slower, >= 1.
    """

    workers: Tuple[int, ...] = ()
    factor: float = 1.0

    def describe(self) -> str:
        names = ",".join(str(w) for w in self.workers)
        return (f"stragglers: slow: worker(s) {names} {spec_number(self.factor)}x slower "
                f"(delay = {spec_number(self.factor - 1)} x compute time)")

    def _delay(self, worker, step, compute_seconds):
        if worker in self.workers:
            return (self.factor - 1.0) * compute_seconds
        return 0.0


@dataclasses.dataclass(frozen=True)
class ExponentialDelay(StragglerModel):
    """`exp:MEAN`: an exponential delay with mean MEAN seconds.

    Attributes:
      mean: the mean delay in seconds, > 0.
    """

    mean: float = 1.0

    def describe(self) -> str:
        return (f"stragglers: exp: exponential delay, mean {spec_number(self.mean)} s, "
                f"every worker every step (seed {self.seed})")

    def _delay(self, worker, step, compute_seconds):
        return self._rng(worker, step).exponential(self.mean)


@dataclasses.dataclass(frozen=True)
class ParetoDelay(StragglerModel):
    """`pareto:SHAPE:SCALE`: a Lomax delay, `SCALE * rng.pareto(SHAPE)` seconds.

    Attributes:
      shape: the tail index, > 0; the smaller, the heavier the tail.
      scale: seconds, > 0.
    """

    shape: float = 1.0
    scale: float = 1.0

    @property
    def mean(self) -> float:
        """The mean delay in seconds: `scale / (shape - 1)`, or inf if shape <= 1."""
        return self.scale / (self.shape - 1.0) if self.shape > 1.0 else math.inf

    def describe(self) -> str:
        mean = f"{self.mean:.4g} s" if math.isfinite(self.mean) else "infinite"
        return (f"stragglers: pareto: Lomax delay, shape {spec_number(self.shape)}, scale "
                f"{spec_number(self.scale)} s (mean {mean}), every worker every step "
                f"(seed {self.seed})")

    def _delay(self, worker, step, compute_seconds):
        return self.scale * self._rng(worker, step).pareto(self.shape)


@dataclasses.dataclass(frozen=True)
class TraceDelay(StragglerModel):
    """`trace:PATH`: replays a recorded `[steps, workers]` table of delays.

    Attributes:
      path: the CSV file, as given in the spec.
      table: the delays, float64 `[steps, workers]`, read-only.
    """

    path: str = ""
    table: np.ndarray = dataclasses.field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        steps, workers = self.table.shape
        return (f"stragglers: trace {self.path!r}: {steps} steps x {workers} workers, "
                f"mean {self.table.mean():.4g} s, wraps around after step {steps - 1}")

    def _delay(self, worker, step, compute_seconds):
        steps, workers = self.table.shape
        if worker >= workers:
            raise ValueError(f"Straggler trace {self.path!r} has {workers} worker column(s) "
                             f"(workers 0..{workers - 1}). Received: worker={worker}")
        return self.table[step % steps, worker]


@dataclasses.dataclass(frozen=True)
class PhasedDelay(StragglerModel):
    """`phases:A;S1:B;...`: model A before global step S1, then B, and so on.

    Attributes:
      starts: the first step of each phase (0 for the first), increasing.
      models: the model of each phase.
    """

    starts: Tuple[int, ...] = (0,)
    models: Tuple[StragglerModel, ...] = ()

    def phase(self, step: int) -> int:
        """The index of the phase that `step` is in."""
        return sum(1 for start in self.starts[1:] if step >= start)

    def describe(self) -> str:
        parts = [f"from step {start}: {model.describe().removeprefix('stragglers: ')}"
                 for start, model in zip(self.starts, self.models)]
        return "stragglers: phases: " + "; ".join(parts)

    def _delay(self, worker, step, compute_seconds):
        return self.models[self.phase(step)]._delay(worker, step, compute_seconds)  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class SumDelay(StragglerModel):
    """`A+B[+...]`: conditions that hold at once; a delay is the sum of the parts' delays.

    Part i draws with seed `seed + i`, so two random parts are independent and
    part 0 draws what it would alone (`pareto:1.5:0.02+slow:5:2`: the same
    background as `pareto:1.5:0.02`, worker 5 also slow).

    Attributes:
      models: the parts, in the spec's order.
    """

    models: Tuple[StragglerModel, ...] = ()

    def describe(self) -> str:
        return "stragglers: " + " + ".join(m.describe().removeprefix("stragglers: ") for m in self.models)

    def _delay(self, worker, step, compute_seconds):
        return sum(m._delay(worker, step, compute_seconds) for m in self.models)  # pylint: disable=protected-access
