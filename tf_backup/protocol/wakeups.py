"""Wake-up tokens: the values in the `wake/<w>` and `arrivals` queues, and what a waiter makes of them; no I/O.

A wait blocks on the ps (a dequeue) instead of polling: whoever changes what a
waiter looks for enqueues a token after the change. Tokens are steps, `WAKE`
or `POKE`.
"""

import numpy as np

from tf_backup.protocol.rounds import round_stopped
from tf_backup.protocol.slots import ControlView

WAKE = -1  # a wake-up token that is not a step: "the control vector changed, look"
POKE = -2  # a `Waker`'s token: "your wait is past its deadline", nothing changed
WAKE_WAIT = 1.0  # the longest blocking wait on the ps before health checks run again
SLEEP_MARGIN = 0.003  # `sleep_unless_superseded` sleeps its last seconds locally (see there)


def superseded(tokens: np.ndarray, ctl: ControlView, step: int, round_: int, job_done: bool) -> bool:
    """Whether wake-up `tokens` (and `ctl`, read after them) make a batch on step `step` useless.

    Every change a later wait looks for comes with a token after it; a token
    taken here is acted on now (or was about an older step or round).
    """
    return tokens.max(initial=WAKE) > step or bool((tokens == WAKE).any() and round_stopped(ctl, round_, job_done))


def missed_wakeup(tokens: np.ndarray, need: int) -> bool:
    """Whether a wait ended by its waker alone (fewer real tokens than `need`)."""
    return bool((tokens == POKE).any() and (tokens != POKE).sum() < need)
