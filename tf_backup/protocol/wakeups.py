"""Wake-up tokens: the values in the `wake/<w>` and `arrivals` queues, and what a waiter makes of them; no I/O.

A wait blocks on the ps (a dequeue) instead of polling: whoever changes what a
waiter looks for enqueues a token after the change. Tokens are steps, `WAKE`
or `POKE`.
"""

from typing import Optional

import numpy as np

from tf_backup.protocol.rounds import round_running
from tf_backup.protocol.rounds import round_stopped
from tf_backup.protocol.slots import ControlView

WAKE = -1  # a wake-up token that is not a step: "the control vector changed, look"
POKE = -2  # a `Waker`'s token: "your wait is past its deadline", nothing changed
WAKE_WAIT = 1.0  # the longest blocking wait on the ps before health checks run again
AGGREGATOR_WAIT = 0.5  # the aggregator's wait while a fit round runs, or waits to be closed
IDLE_WAIT = 5.0  # its wait between fit rounds: a push (a new round), a round's end or a stop wakes it sooner
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


def aggregator_wait(ctl: Optional[ControlView], staleness_check: bool) -> float:
    """The seconds the aggregator's next wait may block before its waker ends it, given `ctl` (None: not read yet).

    Between fit rounds, with every stopped round closed, nothing happens until
    a push (its token starts the wait's look), a worker's end of a round
    (`WAKE`) or a stop: the wait blocks `IDLE_WAIT`. An optimizer whose fits
    are over keeps its aggregator until the strategy ends, and a chief may hold
    several: at `AGGREGATOR_WAIT` each made four runs a second on ps 0 for
    nothing. Asynchronous training applies between rounds too.
    """
    if ctl is None or not staleness_check or round_running(ctl) or ctl.closed < ctl.stop_round:
        return AGGREGATOR_WAIT
    return IDLE_WAIT
