"""`WorkerClient`: one worker's side of the step protocol for one optimizer.

Every worker, each step (`sync`, run by the train step through a
`tf.py_function`, see `tf_backup.frontend.binding`):
  1. pushes its gradient tagged with step `s` of its parameters;
  2. waits until the global step passes `s` (blocked on its wake-up queue,
     which the chief feeds after each publish), or until the fit round is
     stopped;
  3. pulls the published parameters of the new step.
With one ps task the three are one round trip (`SharedState.push_wait`). The
chief's own worker reads only the control vector there: it takes the
parameters of step `s+1` from its aggregator, which kept what it published.

A batch whose step was superseded while the worker was still computing it can
be cancelled (`sleep_unless_superseded`, used by the straggler simulation): it
is not pushed and the worker moves to the new step at once; or restarted
(`restart_superseded`): the worker pulls the new step and computes the same
batch on it. The wait that sees the new step's token also reads its
parameters, so neither needs another round trip.

A fit on any worker that ends (`end_round`) stops the round for everybody: the
other workers' next wait returns at once and their fit stops.

The waits are `tf_backup.worker.wait`'s; what follows a failed run on the ps
tasks, `tf_backup.worker.recovery`'s.
"""

import time
from typing import Callable, List, Optional, Sequence

from absl import logging
import numpy as np

from tf_backup import _checks
from tf_backup import cluster as cluster_lib
from tf_backup import errors
from tf_backup.protocol import config as config_lib
from tf_backup.protocol import pushes
from tf_backup.protocol import rounds
from tf_backup.protocol import slow_workers
from tf_backup.protocol import staleness
from tf_backup.protocol import wakeups
from tf_backup.protocol.slots import Block
from tf_backup.protocol.slots import Control
from tf_backup.protocol.slots import ControlView
from tf_backup.ps import job as job_lib
from tf_backup.ps.shared_state import SharedState
from tf_backup.ps.shared_state import Snapshot
from tf_backup.worker import chief_link
from tf_backup.worker.context import WorkerContext
from tf_backup.worker.metrics import StepMetrics
from tf_backup.worker.recovery import RECOVERABLE
from tf_backup.worker.recovery import WorkerRecovery
from tf_backup.worker.wait import Push
from tf_backup.worker.wait import Seen
from tf_backup.worker.wait import Waiter


class WorkerClient:
    """One worker's side of the protocol for one optimizer (eager Python).

    Args:
      state, config, info, monitor, chief: what the client's parts share
        (`WorkerContext`): the shared state, the protocol settings, the
        cluster, this worker's membership of the job, the chief's aggregator
        in this process (`chief_link.NONE` but on the chief).
      on_stop: called when this worker sees its fit round stop (the front end
        stops its Keras models).

    State: `step` (of the parameters in the model), `round` (a
    `rounds.WorkerRound`), `counts` (a `pushes.PushCounts`) and
    `superseded` (what the wait that superseded the current batch read; None:
    not superseded).
    """

    def __init__(self, state: SharedState, config: config_lib.ProtocolConfig, info: cluster_lib.ClusterInfo,
                 monitor: Optional[job_lib.JobMonitor], *, chief: chief_link.ChiefLink = chief_link.NONE,
                 on_stop: Callable[[], None] = lambda: None):
        self.state = state
        self.config = config
        self.info = info
        self.w = info.worker_index
        self.monitor = monitor
        self.chief = chief
        self._on_stop = on_stop
        self.step = 0
        self.round = rounds.WorkerRound()
        self.counts = pushes.PushCounts()
        self.superseded: Optional[Seen] = None
        self._last_control: Optional[ControlView] = None
        # When the parameters of `step` were read (None: not in this fit round yet, whose first
        # batch also traces): the push reports the time since as its compute time.
        self._pulled_at: Optional[float] = None
        self.local_pulls = 0  # steps whose parameters came from `chief.published`, not the ps
        self.unsent = 0  # gradients found late before their push: counted as pushed and dropped, never sent
        ctx = WorkerContext(state, config, info, monitor, chief)
        self.recovery = WorkerRecovery(
            ctx, own_slots=lambda: pushes.own_slots(state.ctl, self.w, self.counts, self.round))
        self.waiter = Waiter(ctx, self.recovery)

    @property
    def generation(self) -> int:
        """The generation of the shared state this worker pushes to (`tf_backup.worker.recovery`)."""
        return self.recovery.generation

    @property
    def missed_wakeups(self) -> int:
        """Waits that ran to their deadline although their condition held."""
        return self.waiter.missed_wakeups

    @property
    def round_stopped(self) -> bool:
        """Whether this worker has seen its fit round stop (its fit ends after the current batch)."""
        return self.round.is_stopped

    def close(self) -> None:
        """Ends the waker thread."""
        self.waiter.close()

    # -- joining -------------------------------------------------------------------

    def wait_until_ready(self) -> None:
        """Waits for the chief to create the shared state (non-chief workers), checks the model, resumes."""
        _checks.poll_until(
            self.state.control.is_initialized, timeout=self.config.startup_timeout,
            first=self.config.poll_min, longest=0.1, between=self.monitor.check,
            on_timeout=lambda waited: errors.StepTimeoutError(
                f"Worker {self.w} {self.info.task} waited {self.config.startup_timeout:.0f} s "
                f"for the chief {self.info.chief} to create the shared state "
                f"`{self.state.prefix}` on {self.info.ps[0]}."))
        if self.state.signature.is_initialized():
            self.state.check_signature()
        self.resume()

    def resume(self) -> None:
        """Continues this worker's counts, fit round and input position from the shared state.

        A restarted worker continues its predecessor's; in a job resumed from a
        checkpoint, the input position is the one saved with it.
        """
        ctl = self.state.read_control()
        self.counts = pushes.PushCounts.resumed(ctl, self.w)
        self.round = rounds.resumed_round(ctl, self.w)
        self.recovery.resume(ctl)

    @property
    def input_position(self) -> int:
        """Batches of this worker's input finished with in this job (by it and its predecessors)."""
        return self.counts.batches

    # -- one step ------------------------------------------------------------------

    def sync(self, flats: Sequence):
        """Pushes one gradient, waits for the step, pulls. Returns (flats, StepMetrics).

        A batch superseded while it was computed (`sleep_unless_superseded`) is
        cancelled: nothing is pushed, the new step is pulled at once.
        """
        c = self.state.ctl
        if self.round.is_stopped:
            return self.state.read_params(), self.metrics()
        if self.round.state is rounds.RoundState.NOT_ANNOUNCED:
            self.state.control.scatter_max([Control.ROUND], [self.round.number])
            self.round = self.round.announced()
        if self.superseded is not None:
            seen, self.superseded = self.superseded, None
            self.counts = self.counts.cancel()
        else:
            tag = self.step if self.config.staleness_check else pushes.INT64_MAX
            self.counts = self.counts.push(self.step)
            k = self.counts
            micros = -1 if self._pulled_at is None else int(1e6 * (time.monotonic() - self._pulled_at))
            push = Push(flats, tag,
                        [c.pushed(self.w), c.last_tag(self.w), c.dropped(self.w), c.cancelled(self.w),
                         c.compute_us(self.w), c.batches(self.w)],
                        [k.pushed, k.last_tag, k.dropped, k.cancelled, micros, k.batches])
            if self.config.staleness_check:
                tag_step = self.step
                if self._late(tag_step):  # one small read spares the network a model-sized push
                    self.unsent += 1
                    self.recovery.retrying(lambda: self.state.control.scatter_update(push.indices, push.values))
                    push = None  # its counters written, it settles as dropped, as a push that came late
                seen = self._wait(lambda ctl: staleness.step_passed(ctl, tag_step) or self._stopped(ctl),
                                   f"global step {tag_step + 1}", self.config.step_timeout, push=push)
            else:
                # Asynchronous: wait for this worker's own gradients only, as TF1's
                # asynchronous training, whose pushes were the updates themselves.
                before, pending = k.taken_seen, k.unresolved
                seen = self._wait(
                    lambda ctl: ctl.block(Block.TAKEN)[self.w] - before >= pending or self.monitor.done,
                    "the chief to apply this worker's gradient", self.config.step_timeout, push=push)
        flats, ctl = self.pull(seen)
        if self._stopped(ctl):
            self._stop()
        return flats, self.metrics()

    def _late(self, tag: int) -> bool:
        """Whether the step `tag` was already taken (read just before a push that would only be dropped)."""
        if not staleness.checks_before_push(self.config):
            return False
        ctl = self.recovery.retrying(self.state.read_control)
        return staleness.already_taken(ctl, tag)

    def metrics(self) -> StepMetrics:
        ctl = self._last_control
        if ctl is None:
            return StepMetrics(self.step, 0, self.counts.dropped, self.config.replicas_to_aggregate,
                               self.round.is_stopped)
        others = ctl.block(Block.DROPPED).copy()
        others[self.w] = self.counts.dropped
        slow = slow_workers.Slowest.from_slots(ctl.slow).as_slots()
        return StepMetrics(self.step, ctl.last_taken, int(others.sum()), ctl.replicas, self.round.is_stopped, *slow)

    def _stopped(self, ctl: ControlView) -> bool:
        return rounds.round_stopped(ctl, self.round.number, self.monitor.done)

    def _stop(self) -> None:
        self.round = self.round.stopped()
        self._on_stop()

    def _wait(self, done: Callable[[ControlView], bool], what: str, timeout: float,
              push: Optional[Push] = None) -> Seen:
        """`Waiter.wait` from the step of this worker's parameters, with its count of pushes."""
        return self.waiter.wait(done, what, timeout, step=self.step, pushed=self.counts.pushed, push=push)

    # -- stragglers ------------------------------------------------------------------

    def sleep_unless_superseded(self, seconds: float) -> bool:
        """Sleeps `seconds`, or less if this worker's batch becomes useless first (then True).

        The batch is useless once the global step passes `self.step` (the step
        of its parameters) or the fit round stops. Both wake this worker at once
        (its wake-up queue). `sync` then skips that batch's push: it is
        cancelled. Asynchronous training never cancels.
        """
        if self.superseded is not None:
            return True  # already cancelled: nothing to wait for
        if not self.config.staleness_check or self.round.is_stopped:
            time.sleep(max(0.0, seconds))
            return False
        # The run that saw the token also read the parameters after it (one ps task): the
        # batch's `sync` or `restart_superseded` uses them instead of a pull.
        self.superseded = self.waiter.sleep(seconds, self.step, self.round.number)
        return self.superseded is not None

    def restart_superseded(self) -> Optional[List[np.ndarray]]:
        """After `sleep_unless_superseded` returned True: moves to the current step now.

        Pulls the parameters of the current global step, so the batch is
        computed on them and pushed for that step instead of being cancelled at
        `sync`. Counted as a cancelled batch all the same (its computation on
        the old step was abandoned). If the round stopped meanwhile, this
        worker stops as at the end of a step.

        Returns:
          The flat parameters pulled, or None if no sleep was superseded.
        """
        if self.superseded is None:
            return None
        seen, self.superseded = self.superseded, None
        flats, ctl = self.pull(seen)
        self.counts = self.counts.cancel(batch_done=False)  # the same batch is pushed for the new step
        if self._stopped(ctl):
            self._stop()
        return flats

    # -- pulling -------------------------------------------------------------------

    def pull(self, seen: Seen = Seen(None, None)):
        """Reads the published parameters of one consistent step.

        Args:
          seen: what a wait just read, if anything: a consistent snapshot is
            used as it is.

        Returns:
          (flats, control): the flat parameters per shard, and a control vector
          whose step is the step they belong to.
        """
        ctl, snapshot = seen
        latest = snapshot.before if snapshot is not None else ctl
        if latest is not None and self.chief.reads_params_here:
            # The chief: published here before STEP said so (also when a wait that ran past
            # WAKE_WAIT read the parameters from the ps all the same).
            flats = self.chief.published(latest.step)
            if flats is not None:
                self.local_pulls += 1
                self._observe(latest)
                return list(flats), latest
        if snapshot is not None and snapshot.consistent:
            self._observe(snapshot.before)
            return list(snapshot.flats), snapshot.before
        last_read = [ctl]  # the newest control vector read, for the next read and the timeout's message

        def read_once() -> Optional[Snapshot]:
            try:
                got = self._read_snapshot(last_read[0])
            except RECOVERABLE as e:  # a ps task is down, or back empty: read the state written again
                last_read[0] = self.recovery.recover(e)
                return None
            last_read[0] = got.after
            return got if got.consistent else None

        got = _checks.poll_until(
            read_once, timeout=self.config.step_timeout, first=self.config.poll_min, longest=self.config.poll_max,
            on_timeout=lambda waited: errors.StepTimeoutError(
                f"Worker {self.w} {self.info.task} could not read a consistent copy of the "
                f"parameters in {self.config.step_timeout:.0f} s (the chief {self.info.chief} "
                f"kept publishing step {last_read[0].version})."))
        self._observe(got.before)
        return list(got.flats), got.before

    def _read_snapshot(self, ctl: Optional[ControlView]) -> Snapshot:
        """One seqlock read of the parameters: in one run with one ps task, else control, params, control.

        With several tasks, `ctl` (a control vector just read) stands for the
        first read if it is not in the middle of a publish.
        """
        if self.state.on_one_task:
            return self.state.read_consistent()
        if ctl is None or ctl.step != ctl.version:
            ctl = self.state.read_control()
        if ctl.step != ctl.version:  # a publish is under way: not consistent, no parameters read
            return Snapshot(ctl, [], ctl)
        return Snapshot(ctl, self.state.read_params(), self.state.read_control())

    def _observe(self, ctl: ControlView) -> None:
        """Moves to the pulled step and settles the fate of earlier pushes."""
        self.step = ctl.step
        self._last_control = ctl
        self._pulled_at = time.monotonic()
        self.counts = self.counts.settle(ctl.step, int(ctl.block(Block.TAKEN)[self.w]), self.config.staleness_check)

    # -- the end of a fit round ----------------------------------------------------------

    def end_round(self, wait_for_others: bool = False) -> List[np.ndarray]:
        """Ends this worker's fit round: stops the others, returns final parameters.

        Args:
          wait_for_others: wait (up to `chief_timeout`) until every worker has
            ended the round too, so counts read afterwards are final. The chief
            does this; a worker that does not end in time is named in a warning.
        """
        c, number = self.state.ctl, self.round.number

        def stop():  # a max and wake-up tokens: the same again after a failed run does no harm
            self.state.control.scatter_max([Control.STOP_ROUND, c.ended(self.w), c.cancelled(self.w),
                                            c.batches(self.w)], [number, number, self.counts.cancelled,
                                                                 self.counts.batches])
            self.state.wake_all()
            self.state.poke_aggregator(wakeups.WAKE)  # it closes the round once it sees nothing more to apply

        self.recovery.retrying(stop)
        self.superseded = None
        if wait_for_others:
            self.wait_for_round_end(number, self.config.chief_timeout, "chief_timeout")
        self.wait_for_round_closed(number, self.config.chief_timeout)
        flats, _ = self.pull()
        self.round = self.round.next()
        self._pulled_at = None
        return flats

    def wait_for_round_closed(self, round_: int, timeout: float) -> bool:
        """Waits until the chief's aggregator has closed fit round `round_` (or the job finished).

        Only then are the published parameters the round's final ones: an
        apply of gradients taken before the round stopped may still be on its
        way, and asynchronous training applies every worker's last gradient.
        Past `timeout` seconds (`chief_timeout`), a warning names what it
        waited for and this returns False; also False if the job ended first.
        """
        what = f"the chief {self.info.chief} to close fit round {round_}"
        try:
            ctl, _ = self._wait(lambda ctl: rounds.round_closed(ctl, round_), what, timeout)
        except errors.StepTimeoutError as e:
            logging.warning("tf_backup: %s; this worker's final parameters may miss the round's last steps "
                            "(chief_timeout).", e)
            return False
        return rounds.round_closed(ctl, round_)

    def wait_for_round_end(self, round_: int, timeout: float, setting: str = "timeout") -> List[str]:
        """Waits until every worker has ended fit round `round_`; returns the tasks that did not in time (`Waiter`)."""
        return self.waiter.wait_for_round_end(round_, timeout, setting)
