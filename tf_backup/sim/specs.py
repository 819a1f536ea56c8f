"""Straggler specs: the strings that choose a straggler model, parsed (`parse`).

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
* `SPEC+SPEC[+SPEC...]`: conditions that hold at once, their delays added
  (`pareto:1.5:0.02+slow:5:2`: every worker's Pareto delays, and worker 5 2x
  slow besides). Part i draws with seed `seed + i`. Each part is any spec above
  but a trace (whose path may hold a `+`).
* `phases:SPEC;STEP:SPEC[;STEP:SPEC...]`: conditions that change while a job
  runs: the first model before step STEP, the next from there on (the step a
  model is asked for: `StragglerCallback` counts the worker's batches; for
  example `phases:pareto:1.5:0.02;500:slow:4,5:5`, two workers 5x slow from
  step 500). Each phase is any spec above but `phases` (quote it in a shell:
  `;`), a sum included.

A model's `spec` is the normalized spec: `parse(model.spec, model.seed)` gives an equal model.
"""

import math
import os

import numpy as np

from tf_backup import _checks
from tf_backup.sim.straggler_models import ExponentialDelay
from tf_backup.sim.straggler_models import NoStragglers
from tf_backup.sim.straggler_models import ParetoDelay
from tf_backup.sim.straggler_models import PhasedDelay
from tf_backup.sim.straggler_models import SlowWorkers
from tf_backup.sim.straggler_models import StragglerModel
from tf_backup.sim.straggler_models import SumDelay
from tf_backup.sim.straggler_models import TraceDelay
from tf_backup.sim.straggler_models import spec_number

_EXPECTED_ANY = ("one of none, slow:WORKER[,WORKER...]:FACTOR, exp:MEAN, "
                 "pareto:SHAPE:SCALE, trace:PATH, SPEC+SPEC[+SPEC...], phases:SPEC;STEP:SPEC[;STEP:SPEC...]")
_EXPECTED_SUM = "SPEC+SPEC[+SPEC...] with each SPEC a straggler spec other than phases and trace"
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


def _parse_sum(spec: str, seed: int) -> SumDelay:
    pieces = [piece.strip() for piece in spec.split("+")]
    if not all(pieces):
        raise _invalid(spec, _EXPECTED_SUM, "A part is empty")
    parsed = []
    for i, text in enumerate(pieces):
        if text.lower().partition(":")[0].strip() in ("phases", "trace"):
            raise _invalid(spec, _EXPECTED_SUM, f"Received the part {text!r}")
        try:
            parsed.append(parse(text, seed=seed + i))
        except ValueError as e:
            raise _invalid(spec, _EXPECTED_SUM, str(e)) from None
    return SumDelay(spec="+".join(m.spec for m in parsed), seed=seed, models=tuple(parsed))


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
        `pareto:SHAPE:SCALE`, `trace:PATH`, a sum `SPEC+SPEC` or
        `phases:...`. The kind is case-insensitive and spaces around fields
        are ignored.
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

    if "+" in spec:
        return _parse_sum(spec, seed)

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
        normalized = f"slow:{','.join(str(w) for w in workers)}:{spec_number(factor)}"
        return SlowWorkers(spec=normalized, seed=seed, workers=workers, factor=factor)

    if kind == "exp":
        if len(fields) != 1:
            raise _invalid(spec, _EXPECTED_EXP)
        mean = _parse_float(spec, _EXPECTED_EXP, fields[0], "MEAN", 0.0, inclusive=False)
        return ExponentialDelay(spec=f"exp:{spec_number(mean)}", seed=seed, mean=mean)

    if kind == "pareto":
        if len(fields) != 2:
            raise _invalid(spec, _EXPECTED_PARETO)
        shape = _parse_float(spec, _EXPECTED_PARETO, fields[0], "SHAPE", 0.0, inclusive=False)
        scale = _parse_float(spec, _EXPECTED_PARETO, fields[1], "SCALE", 0.0, inclusive=False)
        return ParetoDelay(spec=f"pareto:{spec_number(shape)}:{spec_number(scale)}", seed=seed,
                           shape=shape, scale=scale)

    raise _invalid(spec, _EXPECTED_ANY)
