"""A ps task that restarted empty: the chief writes the shared state again; nobody else restarts.

Everything on a ps task lives in its process: a ps that is killed and started
again (by a cluster manager, or `LocalCluster`'s supervisor) comes back empty.
The chief still holds all the state that matters: the master copy of the
parameters and the inner optimizer's state are its own, and the control and
job vectors are what it last read, which every worker brings up to date with
its own slots. So with `ps_restart_timeout` > 0:

* the chief's aggregator, on a run that fails (`PsUnavailableError`; a
  restarted task answers a session it does not know with `PsRestartedError`),
  waits up to `ps_restart_timeout` for every ps task to answer, then writes the
  job vector again if it is gone, and the optimizer's state in a new
  *generation* (`SharedState.repopulate`) at the master copy's step: no step
  is redone;
* every worker, on a failed run or on seeing a newer generation in the control
  vector, waits (up to the same timeout) for that generation, moves to its
  accumulators, writes its own counters again (`protocol.own_slots`), and
  pushes its gradient again if it was for the current step.

Each generation has accumulators of its own names (`<prefix>/g<k>/acc/<s>`): a
worker that has not seen the new generation yet pushes into the old ones,
which nobody takes. A restarted task's accumulator of the old name would start
at step 0 and accept any tag. The old generation's accumulators on the tasks
that did not restart stay until the job ends (one gradient's size each).

With `ps_restart_timeout` = 0 (the default) a lost ps ends the job as before:
the chief fails, saves its checkpoint, and the job can be resumed from it.
"""

import enum
from typing import Callable, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from tf_backup import _checks
from tf_backup import cluster as cluster_lib
from tf_backup import errors
from tf_backup.protocol.protocol import Control
from tf_backup.protocol.protocol import ControlView
from tf_backup.ps import job as job_lib

# What a run on a ps task that is down, or back without its resources, fails with (a read of a
# resource a restarted task no longer has: FailedPrecondition).
RECOVERABLE = (errors.PsUnavailableError, tf.errors.FailedPreconditionError)


def reachable(tasks: Sequence[cluster_lib.Task]) -> bool:
    """Whether every task accepts connections now (a TCP connect, no run)."""
    try:
        cluster_lib.wait_for_tasks(tasks, timeout=0.0)
        return True
    except TimeoutError:
        return False


def control_to_restore(last: Optional[ControlView], num_workers: int, taken: Sequence[int], replicas: int,
                       finished: bool) -> np.ndarray:
    """The control vector the chief writes again: its last read, with the chief's own slots as it knows them.

    The workers' slots are as last read; each worker writes its own again
    when it sees the new generation (`protocol.own_slots`). STEP, VERSION and
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


def _wait_for(condition: Callable, timeout: float, what: str, error: BaseException,
              between: Optional[Callable[[], None]] = None):
    """Polls `condition` (None until ready; a recoverable error counts as not ready) for `timeout` seconds."""

    def attempt():
        try:
            return condition()
        except RECOVERABLE:
            return None

    return _checks.poll_until(
        attempt, timeout=timeout, first=0.2, longest=1.0, between=between,
        on_timeout=lambda waited: errors.PsUnavailableError(
            f"{what} for {waited:.0f} s (ps_restart_timeout={timeout:.0f} s), after: {error}"))


class ChiefRecovery:
    """(Chief.) Writes one optimizer's state again after a ps task came back empty.

    Args:
      state: the optimizer's `SharedState`.
      info: the cluster.
      timeout: `ps_restart_timeout`, seconds (0: never; the error is raised).
      liveness: the chief's watch of the workers; it holds the job vector as
        last read, which is written again if ps task 0 lost it.
    """

    def __init__(self, state, info: cluster_lib.ClusterInfo, timeout: float, liveness: Optional[job_lib.Liveness]):
        self.state = state
        self.info = info
        self.timeout = timeout
        self.liveness = liveness
        self.recoveries = 0

    def recover(self, error: BaseException, flats: Sequence[np.ndarray], step: int, control: np.ndarray) -> int:
        """Waits for every ps task, then writes the state at `step` (`flats`, `control`); returns the generation.

        Raises:
          `error`: no `ps_restart_timeout`, or the job vector was lost before
            the chief ever read it.
          errors.PsUnavailableError: a ps task did not answer within the timeout.
        """
        if not self.timeout:
            raise error
        ps = ", ".join(str(t) for t in self.info.ps)
        logging.warning("tf_backup: a ps task failed (%s); waiting up to %.0f s for %s to answer "
                        "(ps_restart_timeout).", error, self.timeout, ps)

        def answering() -> bool:  # a run on every task (whether it still holds the state does not matter)
            if not reachable(self.info.ps):
                return False
            self.state.intact()
            return True

        _wait_for(answering, self.timeout, f"The chief waited for the ps tasks {ps}", error)
        job_var = None if self.liveness is None else self.liveness.job_var
        if job_var is not None and not job_var.is_initialized():
            if self.liveness.values is None:
                raise error  # never read: nothing to write again (the job had just started)
            job_lib.restore(job_var, self.liveness.values)
        generation = self.state.repopulate(flats, step, control)
        if self.liveness is not None:
            self.liveness.reset()  # nobody could beat during the outage
        self.recoveries += 1
        logging.warning("tf_backup: the shared state `%s` is written again at global step %d (generation %d); "
                        "training goes on.", self.state.prefix, step, generation)
        return generation


def await_generation(state, info: cluster_lib.ClusterInfo, seen: int, timeout: float, error: BaseException,
                     between: Optional[Callable[[], None]] = None) -> ControlView:
    """(Worker.) Waits until the state can be used again after a failed run; returns its control vector.

    That is a generation after `seen` (the chief wrote the state again), or
    generation `seen` on tasks that all still hold it: the run failed on its
    connection (it went silent past the deadline; the endpoint connects
    again), not on a task that restarted. (A task that restarted and was
    written before the control vector says so costs a push that nobody
    takes: the new generation follows, and the wait that sees it pushes again.)
    `between` runs after each poll that finds none (a health check that raises
    when waiting is pointless). Raises `error` without `timeout`, and
    `errors.PsUnavailableError` past it.
    """
    if not timeout:
        raise error
    logging.warning("tf_backup: worker %s: a run on the ps failed (%s); waiting up to %.0f s for the ps tasks to "
                    "answer with the shared state, or for the chief %s to write it again (ps_restart_timeout).",
                    info.task, error, timeout, info.chief)

    def written() -> Optional[ControlView]:
        if not reachable(info.ps) or not state.control.is_initialized():
            return None
        ctl = state.read_control()
        return ctl if ctl.generation > seen or (ctl.generation == seen and state.intact()) else None

    return _wait_for(written, timeout, f"Worker {info.task} waited for the ps tasks to answer with the shared "
                     f"state `{state.prefix}`, or for the chief {info.chief} to write it again", error, between)


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
    return ctl.generation == generation and int(ctl.block("pushed")[w]) >= pushed


def state_lost(ctl: Optional[ControlView], seen: int) -> bool:
    """Whether a control vector read shows a generation newer than `seen` (the chief wrote the state again)."""
    return ctl is not None and ctl.generation > seen

