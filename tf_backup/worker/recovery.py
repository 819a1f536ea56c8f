"""`WorkerRecovery`: a worker's way back after a failed run on the ps tasks.

A run fails (`tf_backup.ps.recovery.RECOVERABLE`) when a ps task is down, back
empty, or its connection was cut. The worker then waits until the state can be
used again (`await_generation`: the chief wrote it again, or the tasks still
hold it), moves to that generation by writing its own slots of the control
vector again, and goes on. What it does next with the step it was in (pull,
push again, wait) is `tf_backup.worker.wait`'s (`restart.next_move`).
"""

from typing import Any, Callable, List, Tuple

from absl import logging

from tf_backup.protocol.slots import ControlView
from tf_backup.ps import recovery as ps_recovery
from tf_backup.worker.context import WorkerContext

RECOVERABLE = ps_recovery.RECOVERABLE


class WorkerRecovery:
    """One worker's recovery after failed runs against one optimizer's shared state.

    Args:
      ctx: the worker's state, settings (`ps_restart_timeout`: how long to wait
        for the state; 0: not at all), cluster, membership and chief.
      own_slots: this worker's slots of the control vector and their values now
        (`protocol.own_slots`), written again in a new generation.

    State: `generation`, of the shared state this worker pushes to.
    """

    def __init__(self, ctx: WorkerContext, own_slots: Callable[[], Tuple[List[int], List[int]]]):
        self.ctx = ctx
        self._own_slots = own_slots
        self.generation = 0

    def resume(self, ctl: ControlView) -> None:
        """Joins the generation of `ctl` (read at join): a state the chief wrote again gets pushes to its accumulators."""
        self.generation = ctl.generation
        self.ctx.state.set_generation(ctl.generation)

    def retrying(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` (runs that may be done twice); after a failed run, waits for the state (`recover`), runs it again."""
        try:
            return fn()
        except RECOVERABLE as e:  # a ps task is down, back empty, or the connection failed
            self.recover(e)
            return fn()

    def recover(self, error: BaseException) -> ControlView:
        """After a failed run: waits for the state (`await_state`), moves to it; returns the control vector then."""
        return self.adopt(self.await_state(error))

    def await_state(self, error: BaseException) -> ControlView:
        """Waits (`ps_restart_timeout`) until the state can be used again after a failed run (`await_generation`).

        Raises `error` without `ps_restart_timeout`, PsUnavailableError past it,
        AggregatorError if this chief's aggregator failed meanwhile.
        """
        def still_worth_it():  # the chief's aggregator failed, or a new chief started another job: stop waiting
            self.ctx.chief.raise_if_failed()
            try:
                self.ctx.monitor.check()
            except RECOVERABLE:
                pass  # the job vector is on ps 0: down, or not written again yet

        return ps_recovery.await_generation(self.ctx.state, self.ctx.info, self.generation,
                                            self.ctx.config.ps_restart_timeout, error, between=still_worth_it)

    def adopt(self, ctl: ControlView) -> ControlView:
        """Moves to the generation of `ctl`: writes this worker's own slots again; returns the control vector then."""
        self.generation = ctl.generation
        state = self.ctx.state
        indices, values = self._own_slots()
        state.control.scatter_max(indices, values)
        logging.info("tf_backup: worker %d goes on at global step %d in generation %d of `%s`.",
                     self.ctx.w, ctl.step, ctl.generation, state.prefix)
        return state.read_control()
