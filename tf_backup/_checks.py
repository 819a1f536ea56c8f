"""Argument checks and bounded polling, the idioms every module of tf_backup shares.

Errors name the argument and the value received, as Keras's do:
"`max_steps` must be an integer >= 1. Received max_steps=0".
"""

import math
import time
from typing import Callable, Iterator, Optional, TypeVar

import numpy as np

T = TypeVar("T")


def check_int(name: str, value, minimum: int, *, kind: Optional[str] = None) -> int:
    """`value` as an int >= `minimum`.

    Raises:
      TypeError: `value` is not an integer (bools are not).
      ValueError: `value` is below `minimum`.
    """
    kind = kind or f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be {kind}. Received {name}={value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be {kind}. Received {name}={value!r}")
    return int(value)


def check_optional_int(name: str, value, minimum: int, *, kind: Optional[str] = None) -> Optional[int]:
    """None, or `value` as checked by `check_int`."""
    return None if value is None else check_int(name, value, minimum, kind=kind)


def check_seconds(name: str, value, *, allow_zero: bool = False) -> float:
    """`value` as float seconds: positive (or >= 0 with `allow_zero`) and finite.

    Raises:
      ValueError: anything else, a string or None included.
    """
    number = not isinstance(value, bool) and isinstance(value, (int, float, np.floating, np.integer))
    if not number or not math.isfinite(value) or not (value >= 0 if allow_zero else value > 0):
        kind = "a finite number of seconds >= 0" if allow_zero else "a positive number of seconds"
        raise ValueError(f"`{name}` must be {kind}. Received {name}={value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    """Raises TypeError unless `value` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool. Received {name}={value!r}")
    return value


def backoff(first: float, longest: float, factor: float = 1.5) -> Iterator[float]:
    """Sleeps between polls: `first`, then growing by `factor` up to `longest`."""
    delay = first
    while True:
        yield delay
        delay = min(delay * factor, longest)


def poll_until(condition: Callable[[], T], *, timeout: float, on_timeout: Callable[[float], BaseException],
               first: float = 0.0005, longest: float = 0.01,
               between: Optional[Callable[[], None]] = None) -> T:
    """Calls `condition()` until it returns something other than None or False, and returns that.

    Args:
      condition: what is polled (a bool, or a result that is None until ready).
      timeout: seconds; past them, the error `on_timeout(waited)` is raised.
        It must say what was waited for.
      first, longest: the sleeps between polls (see `backoff`).
      between: called after each false poll, before the sleep (health
        checks that raise when waiting is pointless).
    """
    start = time.monotonic()
    for delay in backoff(first, longest):
        got = condition()
        if got is not None and got is not False:
            return got
        waited = time.monotonic() - start
        if waited > timeout:
            raise on_timeout(waited)
        if between is not None:
            between()
        time.sleep(delay)
    raise AssertionError("unreachable")  # backoff never ends
