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
  accumulators, writes its own counters again (`pushes.own_slots`), and
  pushes its gradient again if it was for the current step.

Each generation has accumulators of its own names (`<prefix>/g<k>/acc/<s>`): a
worker that has not seen the new generation yet pushes into the old ones,
which nobody takes. A restarted task's accumulator of the old name would start
at step 0 and accept any tag. The old generation's accumulators on the tasks
that did not restart stay until the job ends (one gradient's size each).

With `ps_restart_timeout` = 0 (the default) a lost ps ends the job as before:
the chief fails, saves its checkpoint, and the job can be resumed from it.
"""

from typing import Callable, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from tf_backup import _checks
from tf_backup import cluster as cluster_lib
from tf_backup import errors
from tf_backup.protocol.slots import ControlView
from tf_backup.ps import job as job_lib

# What a run on a ps task that is down, or back without its resources, fails with (a read of a
# resource a restarted task no longer has: FailedPrecondition).
RECOVERABLE = (errors.PsUnavailableError, tf.errors.FailedPreconditionError)

# Why a ps restart ends a job with Embedding tables even under `ps_restart_timeout`: their rows live
# on the ps only. Said by whichever part of the chief meets the restart first (its aggregator, or its
# own worker's push or pull of rows), so the chief fails saying so either way.
SPARSE_NOT_RESTARTABLE = ("The shared state cannot be written again after a ps restart: the Embedding tables "
                          "of `sparse_variables` are not supported by ps_restart_timeout yet.")


def reachable(tasks: Sequence[cluster_lib.Task]) -> bool:
    """Whether every task accepts connections now (a TCP connect, no run)."""
    try:
        cluster_lib.wait_for_tasks(tasks, timeout=0.0)
        return True
    except TimeoutError:
        return False


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
