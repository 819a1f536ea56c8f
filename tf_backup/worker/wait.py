"""`Waiter`: a worker's waits: for its step, a sleep a new step cuts short, the others' end of a round.

The chief feeds each worker's wake-up queue (`<p>/wake/<w>` on ps 0) after
each publish and when a fit round stops; a wait blocks on it for at most
`WAKE_WAIT`, ended early by the waker (`Waker`), and looks at the control
vector each time it wakes. With one ps task the push, the wait and the read of
the new step's parameters are one run (`SharedState.push_wait`).

A failed run sends the wait to `WorkerRecovery`, then on as `restart.next_move`
says: pull the new generation's step, push again, or wait on.
"""

import time
from typing import Callable, List, NamedTuple, Optional, Sequence

from absl import logging

from tf_backup import _checks
from tf_backup import errors
from tf_backup.protocol import pushes
from tf_backup.protocol import restart
from tf_backup.protocol import wakeups
from tf_backup.protocol.slots import Block
from tf_backup.protocol.slots import ControlView
from tf_backup.ps.shared_state import Snapshot
from tf_backup.ps.waker import Waker
from tf_backup.worker.context import WorkerContext
from tf_backup.worker.recovery import RECOVERABLE
from tf_backup.worker.recovery import WorkerRecovery


class Seen(NamedTuple):
    """What a wait read after its wake-up: the control vector and, maybe, the parameters with it."""

    control: Optional[ControlView]
    snapshot: Optional[Snapshot]


class Push(NamedTuple):
    """A push: `SharedState.push_wait`'s gradient, tag and the control slots it sets (`indices` = `values`)."""

    flats: Sequence
    tag: int
    indices: List[int]
    values: List[int]


class Waiter:
    """One worker's waits on its wake-up queue for one optimizer.

    Args:
      ctx: the worker's state, settings, cluster, membership (health checks) and chief.
      recovery: this worker's recovery after a failed run (and its generation).

    State: `missed_wakeups`, waits that ran to their deadline although their
    condition held (a wake-up token lost or never sent).
    """

    def __init__(self, ctx: WorkerContext, recovery: WorkerRecovery):
        self.ctx = ctx
        self.recovery = recovery
        self.missed_wakeups = 0
        self._waker = Waker(lambda: ctx.state.poke(ctx.w), f"tf_backup-waker-{ctx.state.prefix}")

    def close(self) -> None:
        """Ends the waker thread."""
        self._waker.close()

    def wait(self, done: Callable[[ControlView], bool], what: str, timeout: float, *, step: int, pushed: int,
             push: Optional[Push] = None) -> Seen:
        """Blocks on this worker's wake-up queue until `done(control)`.

        Args:
          done: whether what the wait is for has happened.
          what: that, in the `StepTimeoutError` past `timeout`.
          timeout: seconds.
          step: the step of the worker's parameters.
          pushed: the worker's count of pushes (with `push`'s).
          push: the arguments of a `SharedState.push_wait` whose run is the
            first wait.
        """
        state, w, monitor, chief = self.ctx.state, self.ctx.w, self.ctx.monitor, self.ctx.chief
        start = time.monotonic()
        pushing = push  # pushed again if the state is written again before its step passed
        while True:
            waited = time.monotonic() - start
            seconds = min(wakeups.WAKE_WAIT, max(0.001, timeout - waited))
            moved = None  # the control vector of a state the chief wrote again, once this worker moved to it
            kept = False  # (moved) the gradient pushed in this wait is where the step will be taken from
            try:
                if push is not None:
                    got = state.push_wait(w, *push, waker=self._waker, seconds=seconds,
                                          with_params=not chief.reads_params_here,
                                          generation=self.recovery.generation, known_step=step)
                    push = None
                    if got is None:  # delivered twice: it pushed, its result is lost
                        continue
                else:
                    # The chief's worker takes its parameters from its aggregator: none from the ps.
                    got = state.wait(w, seconds, waker=self._waker,
                                     known_step=pushes.INT64_MAX if chief.reads_params_here else step)
                ctl, snapshot = got.control, got.snapshot  # both runs end by a token, never at a deadline
                if restart.state_lost(ctl, self.recovery.generation):  # the chief wrote the state again
                    moved = self.recovery.adopt(ctl)
                else:
                    if done(ctl):
                        if (got.tokens == wakeups.POKE).all():  # only the waker ended it: a missed wake-up
                            self.missed_wakeups += 1
                        return Seen(ctl, snapshot)
                    chief.raise_if_failed()
                    monitor.check()
            except RECOVERABLE as e:  # a ps task is down, back empty, or the connection failed
                generation = self.recovery.generation
                found = self.recovery.await_state(e)
                kept = pushing is not None and restart.push_kept(found, generation, w, pushed)
                moved = self.recovery.adopt(found)
            if moved is not None:
                move = restart.next_move(moved.step, step, done(moved), pushing is not None and not kept)
                if move is restart.Move.PULL:
                    return Seen(moved, None)
                push = pushing if move is restart.Move.PUSH_AGAIN else None
                continue
            if monitor.done:
                return Seen(ctl, snapshot)
            waited = time.monotonic() - start
            if waited > timeout:
                raise errors.StepTimeoutError(
                    f"Worker {w} {self.ctx.info.task} waited {waited:.0f} s for {what}. {self._diagnose(ctl)}")

    def sleep(self, seconds: float, step: int, round_number: int) -> Optional[Seen]:
        """Sleeps `seconds`, or less if a token supersedes the batch of step `step` first.

        Returns what the wait that saw the token read (the same run read the
        parameters after it, with one ps task), or None once the time is up.
        """
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if remaining <= wakeups.SLEEP_MARGIN:
                # A wait on the ps that ends at its deadline returns ~2-3 ms late (the run
                # is cancelled there); the last few ms are slept here, not woken.
                time.sleep(remaining)
                return None
            try:
                got = self.ctx.state.wait(self.ctx.w, remaining - wakeups.SLEEP_MARGIN, known_step=step)
            except RECOVERABLE as e:  # sleep on in the state as it is then; `sync` sees a new generation
                self.recovery.recover(e)
                continue
            if got is None:
                continue
            if wakeups.superseded(got.tokens, got.control, step, round_number, self.ctx.monitor.done):
                return Seen(got.control, got.snapshot)

    def wait_for_round_end(self, round_: int, timeout: float, setting: str = "timeout") -> List[str]:
        """Waits until every worker has ended fit round `round_`; returns the tasks that did not in time.

        Workers that left the job or that the chief declared dead are not waited
        for, and nobody is once the chief has finished the job (DONE: a worker
        waits here after its last fit, `wait_for_fit_end`, but only the chief
        knows whom it declared dead, and the ps tasks exit soon after DONE).
        Past `timeout` seconds, or at DONE, a warning names the late workers.
        """
        ctx = self.ctx
        late: List[int] = []

        def all_ended() -> bool:
            ended = self.recovery.retrying(ctx.state.read_control).block(Block.ENDED)
            late[:] = [w for w in range(ctx.info.num_workers) if ended[w] < round_]
            if late:  # a worker that left the job (e.g. refused at build) or died never ends it
                gone = set(ctx.monitor.left_workers()) | set(ctx.chief.dead_workers())
                late[:] = [w for w in late if w not in gone]
            if late and not ctx.info.is_chief:
                ctx.monitor.check()
                return ctx.monitor.done
            return not late

        try:
            _checks.poll_until(all_ended, timeout=timeout, first=ctx.config.poll_min, longest=ctx.config.poll_max,
                               on_timeout=lambda waited: errors.StepTimeoutError(f"round {round_}"))
        except errors.StepTimeoutError:
            pass
        if not late:
            return []
        names = [str(ctx.info.workers[w]) for w in late]
        logging.warning(
            "tf_backup: workers %s did not end fit round %d (%s, %.0f s, or the job ended first); their counts "
            "may be incomplete.", ", ".join(names), round_, setting, timeout)
        return names

    def _diagnose(self, ctl: ControlView) -> str:
        info = self.ctx.info
        tags, pushed = ctl.block(Block.LAST_TAG), ctl.block(Block.PUSHED)
        fresh = pushes.fresh_workers(ctl)
        lagging = [
            f"worker {w} {info.workers[w]} (last pushed for step {tags[w] if pushed[w] else 'none'})"
            for w in range(info.num_workers) if w not in fresh
        ]
        return (
            f"Global step {ctl.step}; {ctl.replicas} fresh gradients are needed "
            f"for it and workers {fresh} pushed for this step. Not pushed: "
            f"{', '.join(lagging) or 'none'}. Chief: {info.chief}."
        )
