"""Fit rounds: when one runs, stops and closes, and a worker's round as a state machine; no I/O.

Every worker's k-th `fit` is round k. A worker announces its round
(ROUND = max(ROUND, k)) with its first push; the round runs while ROUND >
STOP_ROUND. The first worker whose fit ends stops it (STOP_ROUND = k); the
others see the stop at their next wait. The aggregator closes a stopped round
(CLOSED = k) once nothing more will be applied for it; only then are the
published parameters the round's final ones. FINISHED (the chief reached
`max_steps`) stops every round. The slots are `tf_backup.protocol.slots.Control`'s.
"""

import dataclasses
import enum
from typing import FrozenSet

from tf_backup.protocol.slots import Block
from tf_backup.protocol.slots import ControlView


def round_running(ctl: ControlView) -> bool:
    """Whether some fit round is being trained (started and not stopped)."""
    return ctl.round > ctl.stop_round


def round_stopped(ctl: ControlView, round_: int, job_done: bool = False) -> bool:
    """Whether fit round `round_` is over for a worker: stopped, finished, or the job is done."""
    return ctl.stop_round >= round_ or ctl.finished or job_done


def round_closed(ctl: ControlView, round_: int) -> bool:
    """Whether the aggregator closed `round_` (or the job finished): its final parameters are published."""
    return ctl.closed >= round_ or ctl.finished


def round_closable(ctl: ControlView, *, staleness_check: bool, pending: int, gone: FrozenSet[int]) -> bool:
    """Whether the aggregator may close the stopped rounds of `ctl`, read after its last take.

    With the staleness check no take starts once the round stopped, so nothing
    is left. Asynchronous training applies every gradient: it waits until every
    worker still in the job (not in `gone`) ended the round and no gradient is
    `pending` in the accumulator.
    """
    if round_running(ctl) or ctl.closed >= ctl.stop_round:
        return False
    if staleness_check:
        return True
    if pending:
        return False
    return all(e >= ctl.stop_round or w in gone for w, e in enumerate(ctl.block(Block.ENDED)))


class RoundState(enum.Enum):
    """A worker's view of its current fit round."""

    NOT_ANNOUNCED = "not announced"  # the fit began; the first push announces it (ROUND)
    RUNNING = "running"
    STOPPED = "stopped"  # seen stopped: the fit ends after the current batch


@dataclasses.dataclass(frozen=True)
class WorkerRound:
    """Fit round `number` of one worker, and where it is in it. Transitions return new values."""

    number: int = 1
    state: RoundState = RoundState.NOT_ANNOUNCED

    def announced(self) -> "WorkerRound":
        return dataclasses.replace(self, state=RoundState.RUNNING)

    def stopped(self) -> "WorkerRound":
        return dataclasses.replace(self, state=RoundState.STOPPED)

    def next(self) -> "WorkerRound":
        """After `end_round`: the next fit is the next round."""
        return WorkerRound(self.number + 1)

    @property
    def is_stopped(self) -> bool:
        return self.state is RoundState.STOPPED


def resumed_round(ctl: ControlView, w: int) -> WorkerRound:
    """The round a worker (re)joining the job with control vector `ctl` is in.

    New to the job (never pushed, cancelled or ended a round): its k-th fit is
    round k, as every worker's; one that starts late, after the others' first
    fit ended, thus finds that round over and its first fit ends at once, in
    step with them after. Restarted: its predecessor's round being trained, or
    the next one between rounds.
    """
    new = not (ctl.block(Block.PUSHED)[w] or ctl.block(Block.CANCELLED)[w] or ctl.block(Block.ENDED)[w])
    return WorkerRound(1 if new else max(1, ctl.round, ctl.stop_round + 1))
