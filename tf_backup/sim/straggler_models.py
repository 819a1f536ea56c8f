"""Seeded straggler models: extra delay per worker per step.

Backup workers pay off when some workers are slow. To measure that on a
machine where every worker is equally fast, a worker sleeps before each batch
for a delay drawn from a straggler model. The training binary, the benchmarks
and the tests share these models, chosen by a spec string (`parse`):

* `none`: no delay.
* `slow:WORKER:FACTOR` (or `slow:W1,W2:FACTOR`): the listed workers are
  persistently FACTOR (>= 1) times slower. Their delay is
  `(FACTOR - 1) * compute_seconds`, where `compute_seconds` is the step's
  measured compute time given by the caller; the other workers get 0.
* `exp:MEAN`: every worker, every step, an exponential delay with mean MEAN
  seconds: many small hiccups.
* `pareto:SHAPE:SCALE`: a heavy tail, `SCALE * rng.pareto(SHAPE)` seconds
  (Lomax: survival `P(delay > x) = (1 + x / SCALE) ** -SHAPE`; the mean is
  `SCALE / (SHAPE - 1)` for SHAPE > 1 and infinite otherwise): rare, long
  stalls.
* `trace:PATH`: replays a recorded CSV, one row per step and one column per
  worker (delays in seconds, `#` lines are comments). Steps past the last row
  wrap around to the first.
* `phases:SPEC;STEP:SPEC[;STEP:SPEC...]`: conditions that change while a job
  runs: the first model before step STEP, the next from there on (the step a
  model is asked for: `StragglerCallback` counts the worker's batches; for
  example `phases:pareto:1.5:0.02;500:slow:4,5:5`, two workers 5x slow from
  step 500). Each phase is any spec above but `phases` (quote it in a shell:
  `;`).

A delay is a pure function of `(seed, worker, step)` (and `compute_seconds`
for `slow`): it is drawn from `np.random.default_rng([seed, worker, step])`,
so it does not depend on the order of the calls or on which process asks. Every
process of a job given the same spec and seed agrees on who straggles when.

The ideal. With `total_num_replicas = N + b` workers of which the chief
aggregates the first `replicas_to_aggregate = N` gradients to arrive, a step
lasts as long as the N-th fastest worker, not the slowest: with
communication left out, the ideal step time is the N-th order statistic of the
N + b workers' times (Chen et al. 2016, "Revisiting Distributed Synchronous
SGD", arXiv:1604.00981). `ideal_step_times` computes it from a
`[steps, workers]` matrix of times, so a benchmark can set measured step times
beside the ideal ones.

Usage (`tf_backup.sim.stragglers` re-exports these names beside `StragglerCallback`,
which sleeps a model's delays in `fit`):

  model = stragglers.parse("pareto:1.5:0.02", seed=7)
  # Benchmarks, without training:
  times = compute + model.delays(num_workers=4, num_steps=1000,
                                 compute_seconds=compute)
  ideal = stragglers.ideal_step_times(times, n=3)  # 3 of 4 aggregated
"""

import dataclasses
import math
import os
from typing import Tuple

import numpy as np

from tf_backup import _checks

_EXPECTED_ANY = ("one of none, slow:WORKER[,WORKER...]:FACTOR, exp:MEAN, "
                 "pareto:SHAPE:SCALE, trace:PATH, phases:SPEC;STEP:SPEC[;STEP:SPEC...]")
_EXPECTED_PHASES = ("phases:SPEC;STEP:SPEC[;STEP:SPEC...] with increasing integer STEP >= 1 and "
                    "each SPEC a straggler spec other than phases")
_EXPECTED_SLOW = ("slow:WORKER:FACTOR or slow:W1,W2,...:FACTOR with integer "
                  "WORKER >= 0 and FACTOR >= 1")
_EXPECTED_EXP = "exp:MEAN with MEAN > 0 (seconds)"
_EXPECTED_PARETO = "pareto:SHAPE:SCALE with SHAPE > 0 and SCALE > 0 (seconds)"
_EXPECTED_TRACE = ("trace:PATH naming a CSV file with one row per step and one "
                   "column per worker, delays >= 0 in seconds")


def _invalid(spec, expected, detail=None):
    message = f"Straggler spec {spec!r} is not valid: expected {expected}"
    if detail:
        message += f". {detail}"
    return ValueError(message)


def _number(value):
    """Formats a float for a normalized spec: `3.0` -> `3`, `0.1` -> `0.1`."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclasses.dataclass(frozen=True)
class StragglerModel:
    """A straggler model: the delay of each worker at each step.

    Build one with `parse`. Subclasses implement `_delay`.

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
        return (f"stragglers: slow: worker(s) {names} {_number(self.factor)}x slower "
                f"(delay = {_number(self.factor - 1)} x compute time)")

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
        return (f"stragglers: exp: exponential delay, mean {_number(self.mean)} s, "
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
        return (f"stragglers: pareto: Lomax delay, shape {_number(self.shape)}, scale "
                f"{_number(self.scale)} s (mean {mean}), every worker every step "
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


def _parse_phases(spec: str, rest: str, seed: int) -> PhasedDelay:
    pieces = [piece.strip() for piece in rest.split(";")]
    if len(pieces) < 2 or not all(pieces):
        raise _invalid(spec, _EXPECTED_PHASES)
    starts, models = [0], [pieces[0]]
    for piece in pieces[1:]:
        step, _, sub = piece.partition(":")
        step = step.strip()
        if not step.isdecimal() or int(step) <= starts[-1] or not sub.strip():
            raise _invalid(spec, _EXPECTED_PHASES, f"Received: {piece!r}")
        starts.append(int(step))
        models.append(sub.strip())
    parsed = []
    for text in models:
        if text.lower().startswith("phases"):
            raise _invalid(spec, _EXPECTED_PHASES, "A phase cannot be phases itself")
        try:
            parsed.append(parse(text, seed=seed))
        except ValueError as e:
            raise _invalid(spec, _EXPECTED_PHASES, str(e)) from None
    normalized = "phases:" + ";".join(
        [parsed[0].spec] + [f"{start}:{model.spec}" for start, model in zip(starts[1:], parsed[1:])])
    return PhasedDelay(spec=normalized, seed=seed, starts=tuple(starts), models=tuple(parsed))


def _parse_float(spec, expected, text, name, lower, inclusive):
    try:
        value = float(text)
    except ValueError:
        raise _invalid(spec, expected, f"Received: {name}={text!r}") from None
    if not math.isfinite(value) or value < lower or (value == lower and not inclusive):
        raise _invalid(spec, expected, f"Received: {name}={text!r}")
    return value


def _load_trace(spec, path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _invalid(spec, _EXPECTED_TRACE,
                       f"Cannot read trace file {path!r}: {e}") from None
    rows = []
    for lineno, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [field.strip() for field in line.split(",")]
        try:
            row = [float(field) for field in fields]
        except ValueError:
            raise _invalid(spec, _EXPECTED_TRACE,
                           f"Trace file {path!r} line {lineno} is not numeric: "
                           f"{line!r}") from None
        if not all(math.isfinite(x) and x >= 0 for x in row):
            raise _invalid(spec, _EXPECTED_TRACE,
                           f"Trace file {path!r} line {lineno} has a delay that is negative "
                           f"or not finite: {line!r}")
        if rows and len(row) != len(rows[0]):
            raise _invalid(spec, _EXPECTED_TRACE,
                           f"Trace file {path!r} line {lineno} has {len(row)} column(s), "
                           f"the first row has {len(rows[0])}")
        rows.append(row)
    if not rows:
        raise _invalid(spec, _EXPECTED_TRACE, f"Trace file {path!r} has no rows")
    table = np.array(rows, dtype=np.float64)
    table.setflags(write=False)
    return table


def parse(spec: str, seed: int = 0) -> StragglerModel:
    """Builds the straggler model described by `spec` (see the module docstring).

    Args:
      spec: `none`, `slow:WORKER[,WORKER...]:FACTOR`, `exp:MEAN`,
        `pareto:SHAPE:SCALE` or `trace:PATH`. The kind is case-insensitive and
        spaces around fields are ignored.
      seed: an integer >= 0 seeding the random draws.

    Returns:
      A `StragglerModel` whose `spec` is the normalized spec.

    Raises:
      TypeError: if `spec` is not a str or `seed` is not an integer.
      ValueError: if `spec` is not valid (the message names it and what was
        expected), if a trace file cannot be read or is malformed (the message
        names the path), or if `seed` is negative.
    """
    if not isinstance(spec, str):
        raise TypeError(f"Straggler spec must be a str. Received: {spec!r} "
                        f"of type {type(spec).__name__}")
    seed = _checks.check_int("seed", seed, 0)
    kind, separator, rest = spec.strip().partition(":")
    kind = kind.strip().lower()

    if kind == "phases":
        return _parse_phases(spec, rest, seed)

    if kind == "trace":
        path = rest.strip()
        if not path:
            raise _invalid(spec, _EXPECTED_TRACE, "The path is empty")
        return TraceDelay(spec=f"trace:{path}", seed=seed, path=path,
                          table=_load_trace(spec, os.path.expanduser(path)))

    fields = [field.strip() for field in rest.split(":")] if separator else []
    if kind == "none":
        if fields:
            raise _invalid(spec, "none (with no fields)")
        return NoStragglers(spec="none", seed=seed)

    if kind == "slow":
        if len(fields) != 2:
            raise _invalid(spec, _EXPECTED_SLOW)
        workers = set()
        for text in fields[0].split(","):
            text = text.strip()
            if not text.isdecimal():  # Rejects "", "-1", "1.5", "²".
                raise _invalid(spec, _EXPECTED_SLOW, f"Received: WORKER={text!r}")
            workers.add(int(text))
        factor = _parse_float(spec, _EXPECTED_SLOW, fields[1], "FACTOR", 1.0, inclusive=True)
        workers = tuple(sorted(workers))
        normalized = f"slow:{','.join(str(w) for w in workers)}:{_number(factor)}"
        return SlowWorkers(spec=normalized, seed=seed, workers=workers, factor=factor)

    if kind == "exp":
        if len(fields) != 1:
            raise _invalid(spec, _EXPECTED_EXP)
        mean = _parse_float(spec, _EXPECTED_EXP, fields[0], "MEAN", 0.0, inclusive=False)
        return ExponentialDelay(spec=f"exp:{_number(mean)}", seed=seed, mean=mean)

    if kind == "pareto":
        if len(fields) != 2:
            raise _invalid(spec, _EXPECTED_PARETO)
        shape = _parse_float(spec, _EXPECTED_PARETO, fields[0], "SHAPE", 0.0, inclusive=False)
        scale = _parse_float(spec, _EXPECTED_PARETO, fields[1], "SCALE", 0.0, inclusive=False)
        return ParetoDelay(spec=f"pareto:{_number(shape)}:{_number(scale)}", seed=seed,
                           shape=shape, scale=scale)

    raise _invalid(spec, _EXPECTED_ANY)


def ideal_step_times(compute_times: np.ndarray, n: int) -> np.ndarray:
    """The ideal step times of sync SGD aggregating `n` of the workers.

    Per step, the n-th smallest of the workers' times: the time at which the
    n-th gradient arrives (Chen et al. 2016). With `n` equal to the number of
    workers it is the slowest worker's time, plain synchronous SGD.

    Args:
      compute_times: `[steps, workers]` times (compute plus delay) of each
        worker at each step.
      n: `replicas_to_aggregate`, an integer in `[1, workers]`.

    Returns:
      A float64 array `[steps]`.

    Raises:
      ValueError: if `compute_times` is not 2-D with at least one column, or
        `n` is not an integer in `[1, workers]`.
    """
    times = np.asarray(compute_times, dtype=np.float64)
    if times.ndim != 2 or times.shape[1] < 1:
        raise ValueError("`compute_times` must be a 2-D [steps, workers] array with at "
                         f"least one worker. Received: shape={times.shape}")
    workers = times.shape[1]
    if (isinstance(n, bool) or not isinstance(n, (int, np.integer))
            or not 1 <= n <= workers):
        raise ValueError(f"`n` must be an integer in [1, {workers}] (at most the number of "
                         f"workers, the columns of compute_times). Received: n={n!r}")
    if times.shape[0] == 0:
        return np.zeros((0,), dtype=np.float64)
    return np.partition(times, int(n) - 1, axis=1)[:, int(n) - 1]
