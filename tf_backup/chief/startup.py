"""How the chief starts an optimizer's shared state, pure: `decide` -> `Startup`.

The chief reads three things before it writes anything: the global step of its
restored checkpoint (0: none), whether its job monitor rejoined a running job
(`JobMonitor.rejoined`, with `chief_rejoins=True`), and, if it did, the
control vector that job left on the ps (`RunningJob`; None: the job never
created this optimizer's state). `decide` turns them into one of four starts;
`tf_backup.chief.chief.ChiefState` carries it out.
"""

import enum
from typing import NamedTuple, Optional


class Start(enum.Enum):
    """What the chief does with the shared state at its start."""

    NEW_JOB = "new job"  # create the state at step 0
    RESUME = "resume"  # create the state at the checkpoint's step (and its input positions)
    REJOIN = "rejoin"  # rewrite the running job's state at the checkpoint's step; the workers carry on
    FINISH = "finish"  # the job had reached its last step: take its last parameters, write nothing

    @property
    def creates_state(self) -> bool:
        """Whether the chief creates the state (no job of its runs on the ps)."""
        return self in (Start.NEW_JOB, Start.RESUME)


class RunningJob(NamedTuple):
    """What a rejoining chief read of its job's control vector (`ControlView.step`, `.finished`)."""

    step: int
    finished: bool


class Startup(NamedTuple):
    """The chief's start: what it does, and the global step its aggregator starts from."""

    start: Start
    step: int


def decide(checkpoint_step: int, rejoined: bool, running: Optional[RunningJob]) -> Startup:
    """The chief's start from what it read; pure.

    Args:
      checkpoint_step: the restored checkpoint's global step (0: no checkpoint,
        or one of step 0, which starts the same way).
      rejoined: the chief joined the job that was running on the ps instead of
        starting a new one.
      running: (`rejoined` only) that job's state of this optimizer on the ps;
        None: there is none (the job's previous chief died before creating it).

    Raises:
      ValueError: `running` without `rejoined` (a new job's state cannot exist yet).
    """
    if running is not None and not rejoined:
        raise ValueError(f"A chief that started a new job found its state running: {running}.")
    if running is None:
        return Startup(Start.RESUME if checkpoint_step else Start.NEW_JOB, checkpoint_step)
    if running.finished:
        # Nothing is redone: the job's last parameters are the result (the optimizer's state stays
        # the checkpoint's).
        return Startup(Start.FINISH, running.step)
    # The same job, rewound to the checkpoint (the workers' gradients for later steps are dropped).
    return Startup(Start.REJOIN, checkpoint_step)
