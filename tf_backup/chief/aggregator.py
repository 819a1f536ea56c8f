"""The chief's `Aggregator`: take N fresh gradients, apply them with the inner optimizer, publish.

The chief's aggregator thread, each step:
  1. waits until every shard's accumulator holds `replicas_to_aggregate` fresh
     gradients (blocked on the `arrivals` queue, which every push feeds, for
     as many tokens as gradients are still missing);
  2. takes them (which advances the accumulators' step, so any gradient still
     tagged `s` is dropped from that moment; with one shard, in the same run as
     the wait, which its own `Waker` ends), averages, and applies the average
     with the inner Keras optimizer to the chief's master copy; then runs the
     step hooks (the Embedding tables of `tf_backup.frontend.sparse` take, apply and
     publish their rows there);
  3. publishes: `version = s+1`, the new parameters, then `step = s+1` and
     the next step's N (`Control.REPLICAS`). A worker that reads `step`, the
     parameters, then `version` and finds `version == step` has read
     parameters of exactly that step.
With adaptive N (`ProtocolConfig.adaptive`) the N of each step is the rule's
(`tf_backup.protocol.adaptive.AdaptiveN`), fed with the pushes' compute times it sees in
the control vector and the norms each take holds, through its `ArrivalTracker`
(`tf_backup.chief.arrivals`, which names the slow workers too); otherwise it is fixed.
Between steps it closes stopped fit rounds (`rounds.round_closable`) and
reads the workers' heartbeats: with fewer live workers than a step needs, it
stops with a `WorkersLostError`, kept in `failure`.
"""

import collections
import dataclasses
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from tf_backup import cluster as cluster_lib
from tf_backup import errors
from tf_backup.chief import checkpoint as checkpoint_lib
from tf_backup.chief.arrivals import ArrivalTracker
from tf_backup.protocol import config as config_lib
from tf_backup.protocol import membership
from tf_backup.protocol import pushes
from tf_backup.protocol import restart
from tf_backup.protocol import rounds
from tf_backup.protocol import slots
from tf_backup.protocol import slow_workers as slow_workers_lib
from tf_backup.protocol import wakeups
from tf_backup.protocol.slots import Control
from tf_backup.ps import job as job_lib
from tf_backup.ps import recovery
from tf_backup.ps.shared_state import SharedState
from tf_backup.ps.waker import Waker

# The step records the chief keeps (`Aggregator.history`): 384-640 bytes each (with adaptive N),
# so 40-64 MB at most, where keeping every step would grow by 0.4-0.6 GB every million steps.
HISTORY_LIMIT = 100_000


@dataclasses.dataclass
class StepRecord:
    """What the chief did in one global step.

    Attributes:
      step: the global step the gradients were computed on (the new step is
        `step + 1`).
      taken: fresh gradients averaged into this step.
      contributions: per worker, how many of its gradients were averaged.
      replicas: N, the gradients the step waited for.
      noise_scale: (adaptive N) the rule's estimate of the simple noise scale after this step,
        in worker batches (`tf_backup.protocol.adaptive.NoiseScale`); None with a fixed N.
      wait_seconds: time from the previous step's publish to the take.
      apply_seconds: time to take, apply and publish.
      end_time: `time.time()` when the step was published.
      slow_workers: the persistently slow workers as of this step: which, how much slower than the
        typical worker, since which step (`tf_backup.protocol.slow_workers`).
      change_points: the workers in whose compute times a change point was found among the pushes
        this step saw (`adaptive.change_point`: their older samples were dropped), in order.
      expected_seconds: (adaptive N) what the rule's choice of the next N was made from: the step
        time E[T_(n)] it expected for each n from its lower bound up (`adaptive.Choice`, the step
        overhead included; inf: not known); () with a fixed N or while it warms up.
    """

    step: int
    taken: int
    contributions: List[int]
    replicas: int
    noise_scale: Optional[float]
    wait_seconds: float
    apply_seconds: float
    end_time: float
    slow_workers: Tuple[slow_workers_lib.SlowWorker, ...] = ()
    change_points: Tuple[int, ...] = ()
    expected_seconds: Tuple[float, ...] = ()


class Aggregator(threading.Thread):
    """The chief's loop: take N fresh gradients, apply with the inner optimizer, publish.

    Args:
      state: the optimizer's shared state.
      config: protocol settings.
      info: the cluster.
      apply_fn: a function from the averaged flat gradients (one per shard) to
        the new flat parameters (one per shard, in the state's wire dtype); it
        runs the inner optimizer on the chief's master copy.
      step: the global step to start from (a restored checkpoint's).
      max_steps: stop every round once the global step reaches this (None:
        the workers' fits decide).
      liveness: the workers' heartbeats; when fewer workers are alive than a
        step needs, the aggregator stops with `WorkersLostError` instead of
        waiting for gradients that cannot come.
      checkpoint: saved after each step it is `due` for, in this thread (the
        master copy does not change meanwhile), with the workers' input
        positions read just before that step's publish: every batch they count
        was pushed for an earlier step (taken or dropped), none for this one.
      master_flats: the master copy as flat parameters (one per shard): what
        the chief writes again when a ps task comes back empty
        (`tf_backup.ps.recovery`, with `config.ps_restart_timeout`). None: a lost
        ps task ends the loop.
      taken: per worker, its gradients already taken in this job (a chief
        that rejoined its job continues its predecessor's counts); default 0.
      on_ps: with the update applied on the ps tasks (`apply_on_ps`), the
        chief's side of it (`update_on_ps.ChiefSide`): the step's scalars, the
        inner optimizer's step count, and the master copy read back before a
        checkpoint. `apply_fn` is then unused.
      history_limit: the step records kept in `history`, the newest (None: every step's).
    """

    def __init__(self, state: SharedState, config: config_lib.ProtocolConfig, info: cluster_lib.ClusterInfo,
                 apply_fn: Callable, step: int = 0, max_steps: Optional[int] = None,
                 liveness: Optional[job_lib.Liveness] = None,
                 checkpoint: Optional[checkpoint_lib.Checkpoint] = None,
                 master_flats: Optional[Callable[[], List[np.ndarray]]] = None,
                 taken: Optional[Sequence[int]] = None, on_ps=None, history_limit: Optional[int] = HISTORY_LIMIT):
        super().__init__(name=f"tf_backup-aggregator-{state.prefix}", daemon=True)
        self.state = state
        self.config = config
        self.info = info
        self.apply_fn = apply_fn
        self.step = step
        # The step the master copy's values belong to: `step`, or `step + 1` once the apply for it
        # ran and its publish has not (yet) succeeded. The chief's checkpoint saves this step.
        self.master_step = step
        self.max_steps = max_steps
        self.liveness = liveness
        self.checkpoint = checkpoint
        self._master_flats = master_flats
        self.on_ps = on_ps
        self.recovery = recovery.ChiefRecovery(state, info, config.ps_restart_timeout, liveness)
        self._last_control: Optional[slots.ControlView] = None  # for a save off the step (`input_positions`)
        self.history: "collections.deque[StepRecord]" = collections.deque(maxlen=history_limit)
        self.failure: Optional[BaseException] = None  # why the loop stopped, if it failed
        # Per worker, its gradients taken in this job (a chief that rejoined it: its predecessor's too).
        self.taken = np.zeros([config.num_workers], np.int64) if taken is None else np.array(taken, np.int64)
        self.n = config.replicas_to_aggregate  # N of the step being gathered
        self.tracker = ArrivalTracker(config)  # compute times: adaptive N's choice, the slow workers
        self.lost_steps = 0  # steps published without an update (a take delivered twice)
        self.missed_wakeups = 0  # waits that ran to their deadline with enough gradients in
        self._step_hooks: List[Callable[[int], None]] = []
        self._stop_event = threading.Event()
        self._waker = Waker(state.poke_aggregator, f"tf_backup-aggregator-waker-{state.prefix}")
        self._published: "collections.OrderedDict[int, List[np.ndarray]]" = collections.OrderedDict()
        self._published_lock = threading.Lock()
        self._last_publish = time.monotonic()
        self._last_liveness = 0.0

    def add_step_hook(self, hook: Callable[[int, int], None]) -> None:
        """Runs `hook(new_step, taken)` in this thread after each dense apply, before the step is published.

        `taken`: the gradients the dense take averaged.

        Register before `start()`. The Embedding tables of `tf_backup.frontend.sparse`
        take, apply and publish their rows here, so a worker that sees the new
        step finds their rows too.
        """
        if self.is_alive():
            raise RuntimeError("Step hooks are added before the aggregator starts.")
        self._step_hooks.append(hook)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            try:
                self.state.poke_aggregator()
            except errors.PsUnavailableError:
                pass  # the ps is gone: the wait ends at its deadline
            self.join(timeout)

    def published(self, step: int) -> Optional[List[np.ndarray]]:
        """The flat parameters this aggregator published for `step`, if among its last `KEEP_PUBLISHED`."""
        with self._published_lock:
            return self._published.get(step)

    def run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # pylint: disable=broad-except
            self.failure = e
            logging.error("tf_backup aggregator failed at step %d: %s: %s", self.step, type(e).__name__, e)
        finally:
            self._waker.close()

    def _loop(self) -> None:
        # No deadline on the gradients themselves: the workers (the chief's own
        # training loop among them) wait for the step with theirs, and a worker
        # that died is noticed from its heartbeat (`_check_workers`). Between
        # checks, the loop blocks on the `arrivals` queue, which every push feeds.
        finished = False
        fused = self.state.takes_in_wait  # one shard: the wait takes too, in the same run
        count = 0  # fresh gradients seen in the accumulator: the wait asks for the rest
        while not self._stop_event.is_set():
            try:
                self._check_workers()
                if self.max_steps is not None and self.step >= self.max_steps:
                    if not finished:
                        self.state.control.scatter_update([Control.FINISHED], [1])
                        self.state.wake_all()
                        finished = True
                    self._stop_event.wait(max(self.config.poll_max, 0.05))
                    continue
                n = self.n
                need = max(1, n - count)
                seconds = wakeups.aggregator_wait(self._last_control, self.config.staleness_check)
                try:
                    got = self.state.wait_arrivals(
                        seconds, self._waker, need=need, required=n if fused else 0,
                        taken_for=self.step + 1, always=not self.config.staleness_check,
                        hyper=None if self.on_ps is None else self.on_ps.hyper())
                except errors.DuplicateDeliveryError as e:  # did its take run?
                    count = 0
                    if self.state.read_control().taken_for == self.step + 1:
                        self._lost_take(e)
                        self._apply_publish(None)
                    continue
                count, ctl = got.count, got.control
                self._last_control = ctl
                self.tracker.observe_pushes(ctl)
                # Ended by the waker with fewer pushes' tokens than asked for: if enough gradients
                # are in all the same, their tokens went missing.
                timed_out = wakeups.missed_wakeup(got.tokens, need)
                if got.sums is not None:  # taken (also when stopping: the accumulators have moved on)
                    self.missed_wakeups += int(timed_out)
                    self._apply_publish([got.sums], start=time.monotonic())
                    count = 0
                    continue
                if self._stop_event.is_set():
                    break
                gone = self.liveness.gone if self.liveness is not None else frozenset()
                if rounds.round_closable(ctl, staleness_check=self.config.staleness_check, pending=count, gone=gone):
                    self._close_round(ctl.stop_round)
                if not rounds.round_running(ctl) and self.config.staleness_check:
                    continue  # between fit rounds (asynchronous training applies every gradient)
                if count >= n and self._other_shards_hold(n):
                    self.missed_wakeups += int(timed_out)
                    self._take_apply_publish()
                    count = 0
            except recovery.RECOVERABLE as e:  # a ps task is down, or back empty
                self._recover(e)
                count, finished = 0, False

    def _other_shards_hold(self, n: int) -> bool:
        """Whether every shard but 0 holds `n` fresh gradients (read from every task at once)."""
        accs = self.state.accs
        return all(self.state.each_shard(lambda s: accs[s].num_accumulated() >= n, range(1, len(accs))))

    def _close_round(self, round_: int) -> None:
        """Marks the fit rounds up to `round_` closed and wakes the workers waiting in `end_round`."""
        self.state.control.scatter_max([Control.CLOSED], [round_])
        self.state.wake_all()

    def _check_workers(self) -> None:
        """Reads the heartbeats (once a second); raises WorkersLostError when too few workers are left.

        With `ps_restart_timeout`, also raises PsRestartedError when a ps task
        other than ps 0 lost its shards (the loop then writes the state again).
        """
        if self.liveness is None or time.monotonic() - self._last_liveness < 1.0:
            return
        self._last_liveness = time.monotonic()
        if self.config.ps_restart_timeout:
            lost = self.state.lost_elsewhere()
            if lost:
                raise errors.PsRestartedError(f"the ps tasks {', '.join(lost)} restarted and lost their shards")
        events = self.liveness.update(self.step, self.state.read_control().last_steps())
        for e in events:
            logging.warning("tf_backup: worker %s %s at global step %d (its last gradient was for step %d).",
                            e.task, e.event, e.step, e.last_step)
        ctl = self.state.read_control()  # after the job vector: a worker ends its round before it leaves
        if not rounds.round_running(ctl) or ctl.finished:
            return  # no round is being trained: nothing waits for gradients
        needed = self.config.min_replicas
        if not membership.lost_workers(self.config.num_workers, needed, self.liveness.gone, self.liveness.dead):
            return
        alive = self.config.num_workers - len(self.liveness.gone)
        tags = ctl.last_steps()
        lost = "; ".join(
            f"{self.info.workers[w]}: last gradient for step {tags[w]}, silent for "
            f"{self.liveness.silent_seconds(w):.0f} s" for w in sorted(self.liveness.dead))
        raise errors.WorkersLostError((
            f"only {alive} of {self.config.num_workers} workers are alive at global "
            f"step {self.step} but each step needs {needed}. Missing: {lost}."))

    def _recover(self, error: BaseException) -> None:
        """A ps task failed: waits for it, then writes the whole state again at the master copy's step.

        Raises `error` when the state cannot be written again: no
        `ps_restart_timeout`, stopping, no master copy given, or Embedding
        tables (their rows live on the ps only).
        """
        if (self._stop_event.is_set() or self._master_flats is None or not self.config.ps_restart_timeout
                or self.on_ps is not None):
            raise error
        if self._step_hooks:
            raise errors.PsUnavailableError(f"{error} {recovery.SPARSE_NOT_RESTARTABLE}") from error
        flats = [np.asarray(f, self.state.wire.as_numpy_dtype) for f in self._master_flats()]
        finished = self.max_steps is not None and self.master_step >= self.max_steps
        control = restart.control_to_restore(self._last_control, self.config.num_workers, self.taken, self.n,
                                              finished)
        with self._published_lock:  # the chief's own worker reads this step here
            self._published[self.master_step] = flats
        self.recovery.recover(error, flats, self.master_step, control)
        self.step = self.master_step

    def _lost_take(self, e: errors.DuplicateDeliveryError) -> None:
        # A take delivered twice ran once and its gradients are lost (see
        # endpoint.Endpoint.run). Every accumulator has moved on, so the step
        # moves on without an update; its gradients count as dropped.
        logging.warning("tf_backup: step %d lost its gradients (%s); publishing it unchanged.",
                        self.step, e.message.splitlines()[0] if e.message else e)
        self.lost_steps += 1

    def _take_apply_publish(self) -> None:
        start = time.monotonic()
        try:
            if self.on_ps is not None:  # every shard takes and applies where it lives
                hyper = self.on_ps.hyper()
                self.state.mark_version(self.step + 1)
                sums = self.state.each_shard(lambda s: self.state.take_apply(s, self.n, hyper))
            else:
                accs = self.state.accs
                sums = self.state.each_shard(lambda s: accs[s].take_grad(self.n))
        except errors.DuplicateDeliveryError as e:
            self._lost_take(e)
            sums = None
        self._apply_publish(sums, start)

    def _apply_publish(self, sums: Optional[List[np.ndarray]], start: Optional[float] = None) -> None:
        """Applies the taken sums (one per shard; None: the take was lost) and publishes the next step."""
        start = time.monotonic() if start is None else start
        workers = self.config.num_workers
        new_step = self.step + 1
        replicas = self.n
        if sums is None:
            counts = np.zeros([workers], np.int64)
            new_flats = None if self.on_ps is not None else self.state.read_params()
            if self.on_ps is not None:  # a take delivered twice ran once: it applied, unseen
                self.on_ps.applied()
        else:
            if self.on_ps is not None:  # applied on the ps: (tail, squared norm of the sum) per shard
                takes = [pushes.split_take((None, tail), workers) for tail, _ in sums]
                sq_norm_of_sum = sum(float(sq) for _, sq in sums)
                new_flats = None
                self.on_ps.applied()
            else:
                takes = [pushes.split_take(s, workers) for s in sums]
                # (adaptive N's noise scale only: a read of the whole sum)
                sq_norm_of_sum = (sum(float(np.dot(t.gradient, t.gradient)) for t in takes)
                                  if self.tracker.adaptive else 0.0)
                new_flats = self.apply_fn([t.mean for t in takes])
            counts = takes[0].counts
            for hook in self._step_hooks:
                hook(new_step, int(counts.sum()))
            gone = frozenset() if self.liveness is None else self.liveness.gone
            n = self.tracker.after_take(self.step, takes, sq_norm_of_sum, period=time.monotonic() - self._last_publish,
                                        gone=gone, ctl=self._last_control)
            self.n = self.n if n is None else n
        self.master_step = new_step  # applied: a checkpoint from here on holds step `new_step`
        c = self.state.ctl
        save = self.checkpoint is not None and self.checkpoint.due(new_step)
        self.taken += counts
        if new_flats is not None:
            new_flats = [np.asarray(f, self.state.wire.as_numpy_dtype) for f in new_flats]
            with self._published_lock:  # before the ps says `new_step`: the chief's worker reads it here
                self._published[new_step] = new_flats
                while len(self._published) > config_lib.KEEP_PUBLISHED:
                    self._published.popitem(last=False)
        try:
            if save:  # before the publish: no push for `new_step` can be counted yet
                positions = pushes.input_positions(self.state.read_control(), new_step)
            self.state.publish(
                new_step, new_flats,
                [Control.STEP, Control.LAST_TAKEN, Control.REPLICAS] + [c.taken(w) for w in range(workers)]
                + list(range(Control.SLOW, Control.SLOW + Control.SLOW_SIZE)),
                [new_step, int(counts.sum()), self.n] + [int(t) for t in self.taken]
                + list(slow_workers_lib.Slowest.of(self.tracker.slow_workers.slow).as_slots()),
                dead=() if self.liveness is None else set(self.liveness.dead),
            )
        except recovery.RECOVERABLE as e:  # writing the state again at `master_step` publishes the step
            self._recover(e)
            positions = self.input_positions(new_step) if save else None
        end = time.monotonic()
        self.history.append(
            StepRecord(step=new_step - 1, taken=int(counts.sum()), contributions=[int(x) for x in counts],
                       replicas=replicas, noise_scale=self.tracker.noise_scale,
                       wait_seconds=start - self._last_publish, apply_seconds=end - start, end_time=time.time(),
                       slow_workers=self.tracker.slow_workers.slow, change_points=self.tracker.drain_changes(),
                       expected_seconds=self.tracker.expected_seconds if sums is not None else ()))
        self._last_publish = end
        self.tracker.published(new_step, end)
        self.step = new_step
        if save:
            if self.on_ps is not None:
                self.on_ps.refresh()  # the master copy and the slots, from the ps tasks
            self.checkpoint.save(new_step, why="periodic", input_positions=positions)

    def input_positions(self, step: int) -> Optional[List[int]]:
        """The workers' input positions for a checkpoint of `step`, from the last control vector read (None: none)."""
        return None if self._last_control is None else pushes.input_positions(self._last_control, step)
