"""The moves after a restart, pure: what the chief writes again, and where a waiting worker goes.

A ps task that came back empty, or a chief that restarted from its checkpoint,
has the chief write the control vector again in a new generation
(`control_to_restore`, `control_to_rejoin`). A worker that sees it chooses its
move (`next_move` -> `Move`), whether its last push counted (`push_kept`), and
whether the state it used is gone (`state_lost`). The waits and writes
themselves, which talk to the ps tasks, are `tf_backup.ps.recovery`.
"""

import enum
from typing import Optional, Sequence

import numpy as np

from tf_backup.protocol.slots import Block
from tf_backup.protocol.slots import Control
from tf_backup.protocol.slots import ControlView


def control_to_restore(last: Optional[ControlView], num_workers: int, taken: Sequence[int], replicas: int,
                       finished: bool) -> np.ndarray:
    """The control vector the chief writes again: its last read, with the chief's own slots as it knows them.

    The workers' slots are as last read; each worker writes its own again
    when it sees the new generation (`pushes.own_slots`). STEP, VERSION and
    GENERATION are set by `SharedState.repopulate`.
    """
    ctl = Control(num_workers)
    values = np.zeros([ctl.size], np.int64) if last is None else np.array(last.values, np.int64)
    values[[ctl.taken(w) for w in range(num_workers)]] = np.asarray(taken, np.int64)
    values[Control.REPLICAS] = replicas
    values[Control.FINISHED] = max(int(values[Control.FINISHED]), int(finished))
    return values


def control_to_rejoin(ctl: ControlView, replicas: int) -> np.ndarray:
    """The control vector a restarted chief writes when it rejoins its job at its checkpoint's step.

    The workers' slots stay (their counts and input positions go on: they
    carry on); FINISHED and TAKEN_FOR are cleared (the step went back), and
    REPLICAS is the first step's N again. STEP, VERSION and GENERATION are
    set by `SharedState.repopulate`.
    """
    values = np.array(ctl.values, np.int64)
    values[Control.FINISHED] = values[Control.TAKEN_FOR] = 0
    values[Control.REPLICAS] = replicas
    return values


class Move(enum.Enum):
    """What a worker waiting for a step does once it moved to a state the chief wrote again."""

    PULL = "pull"  # return and pull that state's step into the model
    PUSH_AGAIN = "push again"  # its gradient is for that state's step: push it into the new accumulators
    WAIT = "wait"  # nothing was pushed in this wait: go on waiting


def next_move(step: int, own_step: int, done: bool, pushed: bool) -> Move:
    """A worker's move into a new generation whose step is `step`; its parameters are of `own_step`.

    `done`: what the worker waits for already holds there. A step below its own
    is a restarted chief's checkpoint: the gradient it computed is for a lost
    step and must not be pushed (the new accumulators at `step` would take it,
    tagged `own_step` >= `step`, as fresh).
    """
    if step < own_step or done:
        return Move.PULL
    return Move.PUSH_AGAIN if pushed else Move.WAIT


def push_kept(ctl: ControlView, generation: int, w: int, pushed: int) -> bool:
    """Whether worker `w`'s push number `pushed`, into generation `generation`, is where `ctl`'s step is taken from.

    Never in a newer generation (its accumulators are new). In the same one
    if the control vector counted it: the push's run counts it right after the
    push, and a run that failed on its connection may or may not have reached
    the task. Read before the worker writes its own slots again.
    """
    return ctl.generation == generation and int(ctl.block(Block.PUSHED)[w]) >= pushed


def state_lost(ctl: Optional[ControlView], seen: int) -> bool:
    """Whether a control vector read shows a generation newer than `seen` (the chief wrote the state again)."""
    return ctl is not None and ctl.generation > seen
