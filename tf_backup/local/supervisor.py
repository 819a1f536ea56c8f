"""The supervisor of a local cluster's run: a state machine over what it sees of the tasks.

`LocalCluster.wait` looks at its tasks every 0.1 s and hands `advance` what it saw: each task's
exit code, how often it was restarted, and the time. `advance` is pure: it returns the next
`Supervision` and the `Action`s to carry out, in order. It starts no process and reads no
clock, so a test drives it with made-up exit codes.

The run's phases (`Phase`):

    WORKERS --every worker returned or was lost--> PS_EXIT --every ps task exited 0--> DONE
       |                                              |
       +--> FAILED: a task failed, not restarted      +--> FAILED: a task failed; the ps tasks
            nor lost; or the timeout passed                did not exit within ps_exit_grace;
                                                           or the timeout passed

A task that exits non-zero while the chief has not returned is started again, up to
`max_restarts` times and each time after a back-off (`restart_delay`), as a cluster manager
with `restartPolicy: OnFailure` does. Past its restarts, a worker other than the chief is lost
(up to `max_failed_workers` of them: training goes on without it); any other failure fails
the run.
"""

import dataclasses
import enum
from typing import FrozenSet, List, Mapping, NamedTuple, Optional, Tuple, Union

from tf_backup.local.spec import CHIEF

RESTART_DELAY_MAX = 30.0


def restart_delay(restarts_done: int, first: float, longest: float = RESTART_DELAY_MAX) -> float:
    """Seconds before a task's next restart: `first`, doubled for each earlier restart, at most `longest`.

    As a cluster manager backs off (Kubernetes: 10 s, doubled, at most 5 min), so
    that a task that fails at start does not spend its restarts in seconds.
    """
    return min(first * 2.0 ** restarts_done, longest)


class Phase(enum.Enum):
    WORKERS = "waiting for the workers"
    PS_EXIT = "waiting for the ps tasks to exit"
    DONE = "done"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the supervisor allows (`LocalCluster.wait`'s arguments).

    Attributes:
      timeout: seconds for the whole run.
      ps_exit_grace: seconds the ps tasks get to exit after the last worker.
      max_failed_workers: workers other than the chief that may be lost.
      max_restarts: restarts per task; 0: none.
      restart_delay: seconds before a task's first restart (`restart_delay()`).
    """

    timeout: float
    ps_exit_grace: float = 60.0
    max_failed_workers: int = 0
    max_restarts: int = 0
    restart_delay: float = 1.0


class ScheduleRestart(NamedTuple):
    """Say that `task`, which exited with `exit_code`, starts again in `delay` s (restart `number`)."""
    task: str
    exit_code: int
    delay: float
    number: int


class Restart(NamedTuple):
    """Start `task` again now, with the same `TF_CONFIG`."""
    task: str


class LoseWorker(NamedTuple):
    """Say that worker `task` failed with `exit_code` and the run goes on without it (`lost` so far)."""
    task: str
    exit_code: int
    lost: int


Action = Union[ScheduleRestart, Restart, LoseWorker]


class TaskFailed(NamedTuple):
    """`task` failed past its restarts and the workers that may be lost."""
    task: str


class PsLingered(NamedTuple):
    """The workers finished, but these ps tasks still ran after `ps_exit_grace`."""
    tasks: Tuple[str, ...]


class TimedOut(NamedTuple):
    """The timeout passed with these tasks running."""
    running: Tuple[str, ...]


Failure = Union[TaskFailed, PsLingered, TimedOut]


@dataclasses.dataclass(frozen=True)
class Supervision:
    """The supervisor's state.

    Attributes:
      phase: where the run is.
      deadline: when the run times out (the clock the caller passes to `advance`).
      workers_done_at: when every worker had returned or was lost (PS_EXIT on).
      lost: the workers that failed and that the run goes on without.
      restart_due: task -> when it starts again (its restart is scheduled).
      failure: why the run failed (FAILED only).
    """

    phase: Phase
    deadline: float
    workers_done_at: Optional[float] = None
    lost: FrozenSet[str] = frozenset()
    restart_due: Mapping[str, float] = dataclasses.field(default_factory=dict)
    failure: Optional[Failure] = None

    @classmethod
    def start(cls, policy: Policy, now: float) -> "Supervision":
        return cls(Phase.WORKERS, deadline=now + policy.timeout)


def advance(state: Supervision, policy: Policy, codes: Mapping[str, Optional[int]],
            restarts: Mapping[str, int], now: float) -> Tuple[Supervision, List[Action]]:
    """One look at the tasks: the next state, and what to do, in order.

    Args:
      state: the state after the last look (`Supervision.start` before the first).
      policy: what the supervisor allows.
      codes: each started task's exit code (None: running), in the order the tasks started.
      restarts: how many times each task was started again so far.
      now: the time, on the clock of `state.deadline`.

    Raises:
      ValueError: `state` is DONE or FAILED: the run is over.
    """
    if state.phase in (Phase.DONE, Phase.FAILED):
        raise ValueError(f"The run is over ({state.phase.value}): there is nothing to supervise.")
    workers = [n for n in codes if n.startswith("worker")]
    ps = [n for n in codes if n.startswith("ps")]
    lost, due = set(state.lost), dict(state.restart_due)
    actions: List[Action] = []
    restarted = set()
    # Workers first: when the chief fails, its ps tasks fail after it (they end with the job).
    # One that exits before the chief is blamed on the chief all the same (`failures.blame`).
    for name in workers + ps:
        code = codes[name]
        if code in (None, 0) or name in lost:
            continue
        # While the chief runs there is a job to rejoin; once it has returned, there is none.
        if policy.max_restarts and codes.get(CHIEF) != 0:
            if name in due:
                if now >= due[name]:
                    del due[name]
                    restarted.add(name)
                    actions.append(Restart(name))
                continue
            if restarts[name] < policy.max_restarts:
                delay = restart_delay(restarts[name], policy.restart_delay)
                due[name] = now + delay
                actions.append(ScheduleRestart(name, code, delay, restarts[name] + 1))
                continue
        due.pop(name, None)
        if name in workers and name != CHIEF and len(lost) < policy.max_failed_workers:
            lost.add(name)
            actions.append(LoseWorker(name, code, len(lost)))
            continue
        return _failed(state, lost, due, TaskFailed(name)), actions
    state = dataclasses.replace(state, lost=frozenset(lost), restart_due=due)
    if all(codes[n] == 0 or n in lost for n in workers):
        done_at = now if state.workers_done_at is None else state.workers_done_at
        state = dataclasses.replace(state, phase=Phase.PS_EXIT, workers_done_at=done_at)
        if all(codes[n] == 0 for n in ps):
            return dataclasses.replace(state, phase=Phase.DONE), actions
        if now - done_at > policy.ps_exit_grace:
            return _failed(state, lost, due, PsLingered(tuple(n for n in ps if codes[n] is None))), actions
    if now > state.deadline:
        running = tuple(n for n in codes if codes[n] is None or n in restarted)
        return _failed(state, lost, due, TimedOut(running)), actions
    return state, actions


def _failed(state: Supervision, lost, due, failure: Failure) -> Supervision:
    return dataclasses.replace(state, phase=Phase.FAILED, lost=frozenset(lost), restart_due=due, failure=failure)
