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
"""

import time
from typing import Any, Callable, List, NamedTuple, Optional, Sequence

from absl import logging
import numpy as np

from tf_backup import _checks
from tf_backup import cluster as cluster_lib
from tf_backup import errors
from tf_backup.protocol import config as config_lib
from tf_backup.protocol import pushes
from tf_backup.protocol import restart
from tf_backup.protocol import rounds
from tf_backup.protocol import staleness
from tf_backup.protocol import wakeups
from tf_backup.protocol.slots import Block
from tf_backup.protocol.slots import Control
from tf_backup.protocol.slots import ControlView
from tf_backup.ps import job as job_lib
from tf_backup.ps import recovery
from tf_backup.ps.shared_state import SharedState
from tf_backup.ps.shared_state import Snapshot
from tf_backup.ps.waker import Waker


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


class StepMetrics(NamedTuple):
    """What one step reports to Keras's logs."""

    global_step: int
    fresh_gradients: int  # averaged into the latest step
    dropped_gradients: int  # stale gradients dropped so far, all workers
    replicas_to_aggregate: int  # N of the step being gathered (adaptive N: the chief's latest choice)
    stopped: bool  # the fit round stopped: the fit ends after this batch

    def as_array(self) -> np.ndarray:
        return np.asarray([self.global_step, self.fresh_gradients, self.dropped_gradients,
                           self.replicas_to_aggregate, int(self.stopped)], np.int64)


class WorkerClient:
    """One worker's side of the protocol for one optimizer (eager Python).

    Args:
      state: the optimizer's shared state.
      config: protocol settings.
      info: the cluster.
      monitor: this worker's membership of the job (health checks).
      chief_failure: the chief's aggregator's failure, if any (the chief only).
      dead_workers: the workers the chief declared dead (the chief only).
      local_params: (the chief's: `Aggregator.published`) the flat parameters
        this process published for a step, or None: the chief's steps then read
        only the control vector from the ps, not the parameters it sent there.

    State: `step` (of the parameters in the model), `round` (a
    `rounds.WorkerRound`), `counts` (a `pushes.PushCounts`) and
    `superseded` (what the wait that superseded the current batch read; None:
    not superseded).
    """

    def __init__(self, state: SharedState, config: config_lib.ProtocolConfig, info: cluster_lib.ClusterInfo,
                 monitor: Optional[job_lib.JobMonitor],
                 chief_failure: Optional[Callable[[], Optional[BaseException]]] = None,
                 dead_workers: Optional[Callable[[], Sequence[int]]] = None,
                 local_params: Optional[Callable[[int], Optional[List[np.ndarray]]]] = None):
        self.state = state
        self.config = config
        self.info = info
        self.w = info.worker_index
        self.monitor = monitor
        self._chief_failure = chief_failure
        self._dead_workers = dead_workers or (lambda: ())
        self._local_params = local_params
        self.step = 0
        self.round = rounds.WorkerRound()
        self.counts = pushes.PushCounts()
        self.superseded: Optional[Seen] = None
        self._last_control: Optional[ControlView] = None
        # When the parameters of `step` were read (None: not in this fit round yet, whose first
        # batch also traces): the push reports the time since as its compute time.
        self._pulled_at: Optional[float] = None
        self.generation = 0  # of the shared state this worker pushes to (`tf_backup.ps.recovery`)
        self.missed_wakeups = 0  # waits that ran to their deadline although their condition held
        self.local_pulls = 0  # steps whose parameters came from `local_params`, not the ps
        self.unsent = 0  # gradients found late before their push: counted as pushed and dropped, never sent
        self._waker = Waker(lambda: state.poke(self.w), f"tf_backup-waker-{state.prefix}")
        self.on_stop: List[Callable[[], None]] = []

    @property
    def round_stopped(self) -> bool:
        """Whether this worker has seen its fit round stop (its fit ends after the current batch)."""
        return self.round.is_stopped

    def close(self) -> None:
        """Ends the waker thread."""
        self._waker.close()

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
            self.state.layout.check_signature(self.state.signature.read())
        self.resume()

    def resume(self) -> None:
        """Continues this worker's counts, fit round and input position from the shared state.

        A restarted worker continues its predecessor's; in a job resumed from a
        checkpoint, the input position is the one saved with it.
        """
        ctl = self.state.read_control()
        self.counts = pushes.PushCounts.resumed(ctl, self.w)
        self.round = rounds.resumed_round(ctl, self.w)
        self.generation = ctl.generation  # a state the chief wrote again: push to its accumulators
        self.state.set_generation(ctl.generation)

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
                    self._retrying(lambda: self.state.control.scatter_update(push.indices, push.values))
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
        ctl = self._retrying(self.state.read_control)
        return staleness.already_taken(ctl, tag)

    def metrics(self) -> StepMetrics:
        ctl = self._last_control
        if ctl is None:
            return StepMetrics(self.step, 0, self.counts.dropped, self.config.replicas_to_aggregate,
                               self.round.is_stopped)
        others = ctl.block(Block.DROPPED).copy()
        others[self.w] = self.counts.dropped
        return StepMetrics(self.step, ctl.last_taken, int(others.sum()), ctl.replicas, self.round.is_stopped)

    def _stopped(self, ctl: ControlView) -> bool:
        return rounds.round_stopped(ctl, self.round.number, self.monitor.done)

    def _stop(self) -> None:
        self.round = self.round.stopped()
        for callback in self.on_stop:
            callback()

    # -- waiting -------------------------------------------------------------------

    def _check_health(self) -> None:
        self._check_aggregator()
        self.monitor.check()

    def _check_aggregator(self) -> None:
        """(The chief.) Raises the failure of this process's aggregator, once it failed.

        A `WorkersLostError` is raised as the aggregator raised it, so that
        `fit` raises that type; any other error as the cause of an
        `AggregatorError` (a `PsUnavailableError` too: raised as it is, the
        waits here would take it for their own run's and wait for the ps).
        """
        failure = self._chief_failure() if self._chief_failure is not None else None
        if isinstance(failure, errors.AggregatorError):
            raise failure
        if failure is not None:
            raise errors.AggregatorError(
                f"The aggregator on this chief failed: {type(failure).__name__}: {failure}") from failure

    def _wait(self, done: Callable[[ControlView], bool], what: str, timeout: float, push=None) -> Seen:
        """Blocks on this worker's wake-up queue until `done(control)`.

        `push`: the arguments of a `SharedState.push_wait` whose run is the
        first wait.
        """
        start = time.monotonic()
        pushing = push  # pushed again if the state is written again before its step passed
        while True:
            waited = time.monotonic() - start
            seconds = min(wakeups.WAKE_WAIT, max(0.001, timeout - waited))
            moved = None  # the control vector of a state the chief wrote again, once this worker moved to it
            kept = False  # (moved) the gradient pushed in this wait is where the step will be taken from
            try:
                if push is not None:
                    got = self.state.push_wait(self.w, *push, waker=self._waker, seconds=seconds,
                                               with_params=self._local_params is None, generation=self.generation,
                                               known_step=self.step)
                    push = None
                    if got is None:  # delivered twice: it pushed, its result is lost
                        continue
                    if (got.tokens == wakeups.POKE).all() and done(got.control):  # ended by the waker, yet done
                        self.missed_wakeups += 1
                        return Seen(got.control, got.snapshot)
                else:
                    got = self.state.wait(self.w, seconds, known_step=self.step)
                if got is None:  # nothing happened: look anyway (a token may have been lost)
                    ctl, snapshot = self.state.read_control(), None
                    if done(ctl) and not restart.state_lost(ctl, self.generation):
                        self.missed_wakeups += 1
                        return Seen(ctl, snapshot)
                else:
                    ctl, snapshot = got.control, got.snapshot
                if restart.state_lost(ctl, self.generation):  # the chief wrote the state again
                    moved = self._adopt_generation(ctl)
                else:
                    if done(ctl):
                        return Seen(ctl, snapshot)
                    self._check_health()
            except recovery.RECOVERABLE as e:  # a ps task is down, back empty, or the connection failed
                generation = self.generation
                found = self._await_state(e)
                kept = pushing is not None and restart.push_kept(found, generation, self.w, self.counts.pushed)
                moved = self._adopt_generation(found)
            if moved is not None:
                move = restart.next_move(moved.step, self.step, done(moved), pushing is not None and not kept)
                if move is restart.Move.PULL:
                    return Seen(moved, None)
                push = pushing if move is restart.Move.PUSH_AGAIN else None
                continue
            if self.monitor.done:
                return Seen(ctl, snapshot)
            waited = time.monotonic() - start
            if waited > timeout:
                raise errors.StepTimeoutError(
                    f"Worker {self.w} {self.info.task} waited {waited:.0f} s for {what}. {self._diagnose(ctl)}")

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` (runs that may be done twice); after a failed run, waits for the state (`_recover`), runs it again."""
        try:
            return fn()
        except recovery.RECOVERABLE as e:  # a ps task is down, back empty, or the connection failed
            self._recover(e)
            return fn()

    def _recover(self, error: BaseException) -> ControlView:
        """After a failed run: waits for the state (`_await_state`), moves to it; returns the control vector then."""
        return self._adopt_generation(self._await_state(error))

    def _await_state(self, error: BaseException) -> ControlView:
        """Waits (`ps_restart_timeout`) until the state can be used again after a failed run (`await_generation`).

        Raises `error` without `ps_restart_timeout`, PsUnavailableError past it,
        AggregatorError if this chief's aggregator failed meanwhile.
        """
        def still_worth_it():  # the chief's aggregator failed, or a new chief started another job: stop waiting
            self._check_aggregator()
            try:
                self.monitor.check()
            except recovery.RECOVERABLE:
                pass  # the job vector is on ps 0: down, or not written again yet

        return recovery.await_generation(self.state, self.info, self.generation, self.config.ps_restart_timeout,
                                         error, between=still_worth_it)

    def _adopt_generation(self, ctl: ControlView) -> ControlView:
        """Moves to the generation of `ctl`: writes this worker's own slots again; returns the control vector then."""
        self.generation = ctl.generation
        indices, values = pushes.own_slots(self.state.ctl, self.w, self.counts, self.round)
        self.state.control.scatter_max(indices, values)
        logging.info("tf_backup: worker %d goes on at global step %d in generation %d of `%s`.",
                     self.w, ctl.step, ctl.generation, self.state.prefix)
        return self.state.read_control()

    def _diagnose(self, ctl: ControlView) -> str:
        tags, pushed = ctl.block(Block.LAST_TAG), ctl.block(Block.PUSHED)
        fresh = pushes.fresh_workers(ctl)
        lagging = [
            f"worker {w} {self.info.workers[w]} (last pushed for step {tags[w] if pushed[w] else 'none'})"
            for w in range(self.info.num_workers) if w not in fresh
        ]
        return (
            f"Global step {ctl.step}; {ctl.replicas} fresh gradients are needed "
            f"for it and workers {fresh} pushed for this step. Not pushed: "
            f"{', '.join(lagging) or 'none'}. Chief: {self.info.chief}."
        )

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
        deadline = time.monotonic() + seconds
        if not self.config.staleness_check or self.round.is_stopped:
            time.sleep(max(0.0, seconds))
            return False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if remaining <= wakeups.SLEEP_MARGIN:
                # A wait on the ps that ends at its deadline returns ~2-3 ms late (the run
                # is cancelled there); the last few ms are slept here, not woken.
                time.sleep(remaining)
                return False
            try:
                got = self.state.wait(self.w, remaining - wakeups.SLEEP_MARGIN, known_step=self.step)
            except recovery.RECOVERABLE as e:  # sleep on in the state as it is then; `sync` sees a new generation
                self._recover(e)
                continue
            if got is None:
                continue
            if wakeups.superseded(got.tokens, got.control, self.step, self.round.number, self.monitor.done):
                # The same run read the parameters after the token (one ps task): the
                # batch's `sync` or `restart_superseded` uses them instead of a pull.
                self.superseded = Seen(got.control, got.snapshot)
                return True

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
        if latest is not None and self._local_params is not None:
            # The chief: published here before STEP said so (also when a wait that ran past
            # WAKE_WAIT read the parameters from the ps all the same).
            flats = self._local_params(latest.step)
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
            except recovery.RECOVERABLE as e:  # a ps task is down, or back empty: read the state written again
                last_read[0] = self._recover(e)
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

        self._retrying(stop)
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
        """Waits until every worker has ended fit round `round_`; returns the tasks that did not in time.

        Workers that left the job or that the chief declared dead are not waited
        for, and nobody is once the chief has finished the job (DONE: a worker
        waits here after its last fit, `wait_for_fit_end`, but only the chief
        knows whom it declared dead, and the ps tasks exit soon after DONE).
        Past `timeout` seconds, or at DONE, a warning names the late workers.
        """
        late: List[int] = []

        def all_ended() -> bool:
            ended = self._retrying(self.state.read_control).block(Block.ENDED)
            late[:] = [w for w in range(self.info.num_workers) if ended[w] < round_]
            if late:  # a worker that left the job (e.g. refused at build) or died never ends it
                gone = set(self.monitor.left_workers()) | set(self._dead_workers())
                late[:] = [w for w in late if w not in gone]
            if late and not self.info.is_chief:
                self.monitor.check()
                return self.monitor.done
            return not late

        try:
            _checks.poll_until(all_ended, timeout=timeout, first=self.config.poll_min, longest=self.config.poll_max,
                               on_timeout=lambda waited: errors.StepTimeoutError(f"round {round_}"))
        except errors.StepTimeoutError:
            pass
        if not late:
            return []
        names = [str(self.info.workers[w]) for w in late]
        logging.warning(
            "tf_backup: workers %s did not end fit round %d (%s, %.0f s, or the job ended first); their counts "
            "may be incomplete.", ", ".join(names), round_, setting, timeout)
        return names
