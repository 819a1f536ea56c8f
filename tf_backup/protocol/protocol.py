"""The step protocol of synchronous SGD with backup workers: its specification, no I/O.

What lives on the ps tasks, the slots of its two int64 vectors, a typed view of
the control vector, and the decisions every participant makes on what it read:
pure functions, unit-tested without a cluster (`tests/test_protocol.py`). The
runs that read and write this state are in `tf_backup.ps.shared_state`; who runs
them when is in `tf_backup.worker.client` (every worker) and `tf_backup.chief.aggregator`
(the chief). `docs/design.md` is the whole contract.

Shared state of one job (`tf_backup/job`, on ps task 0; slots in `Job`): the
job id, DONE and ABORT flags, the chief's heartbeat, and per worker joined,
left and a heartbeat. Shared state of one `SyncReplicasOptimizer`
(`tf_backup/<job id>/opt<k>/...`):

* `params/<s>`: the published parameters of shard `s`, flat (`tf_backup.ps.layout`).
* `acc/<s>`: a conditional accumulator per shard. A worker pushes the flat
  gradient of the shard's variables, its squared norm, and a one-hot of its
  worker index (`push_tail`), tagged with the global step of the parameters it
  computed on. The accumulator sums what it accepts, so a take (`split_take`)
  holds the sum of the gradients, the sum of their squared norms (the noise
  scale of `tf_backup.protocol.adaptive`) and each worker's contributions; a stale push
  is dropped whole.
* `control`: an int64 vector (slots in `Control`, typed view `ControlView`).
* `wake/<w>` and `arrivals`: int64 FIFO queues of wake-up tokens, so waits
  block on the ps instead of polling. Tokens are steps, `WAKE` or `POKE`.
* `signature`: the variables' shapes and dtypes.

Fit rounds. Every worker's k-th `fit` is round k. A worker announces its round
(ROUND = max(ROUND, k)) with its first push; the round runs while ROUND >
STOP_ROUND. The first worker whose fit ends stops it (STOP_ROUND = k); the
others see the stop at their next wait. The aggregator closes a stopped round
(CLOSED = k) once nothing more will be applied for it; only then are the
published parameters the round's final ones. FINISHED (the chief reached
`max_steps`) stops every round.
"""

import dataclasses
import enum
from typing import FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

INT64_MAX = np.iinfo(np.int64).max
WAKE = -1  # a wake-up token that is not a step: "the control vector changed, look"
POKE = -2  # a `Waker`'s token: "your wait is past its deadline", nothing changed
WAKE_WAIT = 1.0  # the longest blocking wait on the ps before health checks run again
SLEEP_MARGIN = 0.003  # `sleep_unless_superseded` sleeps its last seconds locally (see there)
KEEP_PUBLISHED = 2  # the chief keeps its last published parameters for its own worker's pull


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """Settings of the step protocol, the same on every worker.

    Attributes:
      replicas_to_aggregate: N, the fresh gradients averaged into one step
        (with `adaptive`, the first step's; the chief picks every other).
      num_workers: N + b, every worker of the cluster.
      staleness_check: whether a gradient tagged with an old step is dropped.
        False gives asynchronous SGD (with `replicas_to_aggregate=1`).
      step_timeout: the longest a worker waits for the global step to advance,
        and the chief for enough gradients, in seconds.
      chief_timeout: how long a silent chief heartbeat is tolerated, seconds.
      startup_timeout: how long a worker waits for the chief to create the
        shared state, seconds.
      poll_min, poll_max: the first and the longest sleep between polls.
      ps_restart_timeout: how long the chief and the workers wait for a ps
        task that failed to answer again, seconds; the chief then writes the
        state again (`tf_backup.ps.recovery`). 0: a lost ps ends the job.
      adaptive: the bounds and window of adaptive N (`num_backup_workers="auto"`), or None: N is fixed.
      wire_dtype: what gradients and parameters cross the network in ("float32", "bfloat16" or
        "float16"); sums, the applied parameters and the optimizer's state stay in the
        variables' dtype, and a push's norm and one-hot are always exact.
      apply_on_ps: each ps task applies the inner optimizer to its shard (`tf_backup.ps.ps_update`);
        False: the chief applies it to its master copy.
    """

    replicas_to_aggregate: int
    num_workers: int
    staleness_check: bool = True
    adaptive: Optional["AdaptiveSettings"] = None
    step_timeout: float = 600.0
    chief_timeout: float = 120.0
    startup_timeout: float = 600.0
    poll_min: float = 0.0005
    poll_max: float = 0.01
    ps_restart_timeout: float = 0.0
    wire_dtype: str = "float32"
    apply_on_ps: bool = False

    @property
    def min_replicas(self) -> int:
        """The fewest gradients a step may be taken with (fewer live workers: the job is lost)."""
        return self.adaptive.n_min if self.adaptive is not None else self.replicas_to_aggregate


@dataclasses.dataclass(frozen=True)
class AdaptiveSettings:
    """Adaptive N (`tf_backup.protocol.adaptive`): the chief picks each step's N in `[n_min, n_max]`.

    Attributes:
      n_min, n_max: the bounds (`min_replicas_to_aggregate`, `max_replicas_to_aggregate`).
      window: steps over which arrival times and the noise scale are averaged.
      warmup: steps taken with `n_max` before the rule chooses.
    """

    n_min: int
    n_max: int
    window: int = 50
    warmup: int = 5  # enough for the compute times of every worker; the noise needs steps of 2+


class Control:
    """Slots of the int64 control vector of one optimizer's shared state.

    A header of scalars, then one block of `num_workers` slots per counter.
    """

    STEP = 0  # committed global step: params hold this step's values
    VERSION = 1  # the step whose params are being (or were last) written
    ROUND = 2  # the highest fit round any worker has started
    STOP_ROUND = 3  # the highest fit round that has ended
    LAST_TAKEN = 4  # gradients averaged into the last step
    FINISHED = 5  # 1 once the chief reached its max_steps: every round stops
    TAKEN_FOR = 6  # s + 1 once the gradients of step s were taken (the accumulator's new step)
    CLOSED = 7  # the highest fit round the aggregator closed: nothing more is applied for it
    REPLICAS = 8  # N of the step being gathered: gradients the chief waits for (adaptive N changes it)
    GENERATION = 9  # times the chief wrote the state again (a ps task restarted empty: `tf_backup.ps.recovery`)
    HEADER = 10
    # Per-worker blocks, in this order after the header.
    BLOCKS = ("taken", "pushed", "dropped", "last_tag", "ended", "cancelled", "compute_us", "batches")

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.size = self.HEADER + len(self.BLOCKS) * num_workers

    def _slot(self, block: str, w: int) -> int:
        return self.HEADER + self.BLOCKS.index(block) * self.num_workers + w

    def taken(self, w: int) -> int:
        """Gradients of worker `w` averaged into a step (written by the chief)."""
        return self._slot("taken", w)

    def pushed(self, w: int) -> int:
        """Gradients worker `w` pushed."""
        return self._slot("pushed", w)

    def dropped(self, w: int) -> int:
        """Pushes of worker `w` it knows were never applied (stale)."""
        return self._slot("dropped", w)

    def last_tag(self, w: int) -> int:
        """The step worker `w`'s last push was tagged with."""
        return self._slot("last_tag", w)

    def ended(self, w: int) -> int:
        """The last fit round worker `w` has ended."""
        return self._slot("ended", w)

    def cancelled(self, w: int) -> int:
        """Batches worker `w` cancelled (the step moved on while it computed; never pushed)."""
        return self._slot("cancelled", w)

    def compute_us(self, w: int) -> int:
        """Microseconds worker `w` took from reading its last push's step to pushing (`PushSample`)."""
        return self._slot("compute_us", w)

    def batches(self, w: int) -> int:
        """Batches of its input worker `w` has finished with, pushed or cancelled (its input position).

        Written with each push (a cancelled batch's count lands with the next
        push). A worker that rejoins the job resumes its input here; the chief
        saves the block with each checkpoint (`tf_backup.chief.checkpoint`).
        """
        return self._slot("batches", w)

    def view(self, values) -> "ControlView":
        return ControlView(np.asarray(values), self.num_workers)


class Job:
    """Slots of the job-wide int64 vector `tf_backup/job` on ps task 0.

    `joined(w)` is set when worker `w` joins the job and `left(w)` when it has
    finished with the shared state; a ps task serves until the chief set `DONE`
    and every worker that joined has left (or a grace period passed), so no
    worker's last op meets a vanished ps. `beat(w)` is worker `w`'s heartbeat
    (wall-clock milliseconds), bumped every second by a thread of its process:
    the chief declares a worker dead when it stops (`tf_backup.ps.job.Liveness`).
    """

    JOB_ID = 0
    DONE = 1
    ABORT = 2
    HEARTBEAT = 3  # the chief's
    HEADER = 4
    NAME = "tf_backup/job"

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.size = self.HEADER + 3 * num_workers

    def joined(self, w: int) -> int:
        return self.HEADER + 3 * w

    def left(self, w: int) -> int:
        return self.HEADER + 3 * w + 1

    def beat(self, w: int) -> int:
        return self.HEADER + 3 * w + 2


@dataclasses.dataclass(frozen=True)
class ControlView:
    """A control vector as read from the ps, by name (see `Control`)."""

    values: np.ndarray
    num_workers: int

    def __getitem__(self, slot: int) -> int:
        return int(self.values[slot])

    @property
    def step(self) -> int:
        return int(self.values[Control.STEP])

    @property
    def version(self) -> int:
        return int(self.values[Control.VERSION])

    @property
    def round(self) -> int:
        return int(self.values[Control.ROUND])

    @property
    def stop_round(self) -> int:
        return int(self.values[Control.STOP_ROUND])

    @property
    def closed(self) -> int:
        return int(self.values[Control.CLOSED])

    @property
    def finished(self) -> bool:
        return bool(self.values[Control.FINISHED])

    @property
    def last_taken(self) -> int:
        return int(self.values[Control.LAST_TAKEN])

    @property
    def taken_for(self) -> int:
        return int(self.values[Control.TAKEN_FOR])

    @property
    def replicas(self) -> int:
        return int(self.values[Control.REPLICAS])

    @property
    def generation(self) -> int:
        return int(self.values[Control.GENERATION])

    def block(self, name: str) -> np.ndarray:
        """One per-worker counter (`Control.BLOCKS`) as an int64 array."""
        start = Control.HEADER + Control.BLOCKS.index(name) * self.num_workers
        return np.asarray(self.values[start:start + self.num_workers])

    def last_steps(self) -> list:
        """Per worker, the step of its last pushed gradient (-1: none)."""
        return [int(t) if p else -1 for t, p in zip(self.block("last_tag"), self.block("pushed"))]


# -- what a push holds ----------------------------------------------------------------


WIRE_DTYPES = ("float32", "bfloat16", "float16")


def push_tail(num_workers: int) -> int:
    """Slots a push has after the gradient: its squared norm, then the one-hot of its worker."""
    return 1 + num_workers


def push_vector(gradient: np.ndarray, worker: int, num_workers: int) -> np.ndarray:
    """What worker `worker` pushes for one shard's `gradient` (numpy; the step builds the same in TF)."""
    gradient = np.asarray(gradient)
    tail = np.zeros([push_tail(num_workers)], gradient.dtype)
    tail[0], tail[1 + worker] = np.dot(gradient, gradient), 1
    return np.concatenate([gradient, tail])


class Take(NamedTuple):
    """One shard's take, split: what the accumulator summed over the pushes it accepted."""

    gradient: Optional[np.ndarray]  # the sum of the gradients (None: applied on the ps, not fetched)
    sum_sq_norms: float  # the sum of their squared norms (this shard's part of each)
    counts: np.ndarray  # per worker, its gradients in the sum (int64)

    @property
    def mean(self) -> np.ndarray:
        return self.gradient / max(int(self.counts.sum()), 1)


def split_take(total, num_workers: int) -> Take:
    """`total` (a take of one shard's accumulator: a whole vector, or a `(body, tail)` pair) as a `Take`.

    A body in a narrower wire dtype (`ProtocolConfig.wire_dtype`) is widened to float32 here.
    """
    if isinstance(total, (tuple, list)):
        body, tail_values = total  # body None: applied on the ps (`apply_on_ps`), only the tail came
        body = None if body is None else np.asarray(body)
        if body is not None and body.dtype.itemsize < 4:
            body = body.astype(np.float32)
    else:
        tail = push_tail(num_workers)
        body, tail_values = np.asarray(total[:-tail]), np.asarray(total[-tail:])
    return Take(body, float(tail_values[0]), np.rint(tail_values[-num_workers:]).astype(np.int64))


class PushSample(NamedTuple):
    """A push the chief saw in the control vector: the worker, the step it was for, and how long it took.

    `seconds`: measured on the worker, from the moment it read the step's parameters to its push
    (its compute time; the same whatever N the chief waits for, so it is an arrival time that
    does not depend on the rule's own choices, and no clocks are compared).
    """

    worker: int
    step: int
    seconds: float


def new_pushes(seen: np.ndarray, ctl: ControlView) -> List[PushSample]:
    """The pushes in `ctl` that are not in `seen` (each worker's push count when last looked).

    A worker that pushed twice between two looks shows its last push only.
    """
    pushed, tags, micros = ctl.block("pushed"), ctl.block("last_tag"), ctl.block("compute_us")
    return [PushSample(w, int(tags[w]), int(micros[w]) / 1e6) for w in range(ctl.num_workers) if pushed[w] > seen[w]]


# -- fit rounds ----------------------------------------------------------------------


def round_running(ctl: ControlView) -> bool:
    """Whether some fit round is being trained (started and not stopped)."""
    return ctl.round > ctl.stop_round


def round_stopped(ctl: ControlView, round_: int, job_done: bool = False) -> bool:
    """Whether fit round `round_` is over for a worker: stopped, finished, or the job is done."""
    return ctl.stop_round >= round_ or ctl.finished or job_done


def round_closed(ctl: ControlView, round_: int) -> bool:
    """Whether the aggregator closed `round_` (or the job finished): its final parameters are published."""
    return ctl.closed >= round_ or ctl.finished


def round_closable(ctl: ControlView, *, staleness_check: bool, pending: int, gone: FrozenSet[int]) -> bool:
    """Whether the aggregator may close the stopped rounds of `ctl`, read after its last take.

    With the staleness check no take starts once the round stopped, so nothing
    is left. Asynchronous training applies every gradient: it waits until every
    worker still in the job (not in `gone`) ended the round and no gradient is
    `pending` in the accumulator.
    """
    if round_running(ctl) or ctl.closed >= ctl.stop_round:
        return False
    if staleness_check:
        return True
    if pending:
        return False
    return all(e >= ctl.stop_round or w in gone for w, e in enumerate(ctl.block("ended")))


class RoundState(enum.Enum):
    """A worker's view of its current fit round."""

    NOT_ANNOUNCED = "not announced"  # the fit began; the first push announces it (ROUND)
    RUNNING = "running"
    STOPPED = "stopped"  # seen stopped: the fit ends after the current batch


@dataclasses.dataclass(frozen=True)
class WorkerRound:
    """Fit round `number` of one worker, and where it is in it. Transitions return new values."""

    number: int = 1
    state: RoundState = RoundState.NOT_ANNOUNCED

    def announced(self) -> "WorkerRound":
        return dataclasses.replace(self, state=RoundState.RUNNING)

    def stopped(self) -> "WorkerRound":
        return dataclasses.replace(self, state=RoundState.STOPPED)

    def next(self) -> "WorkerRound":
        """After `end_round`: the next fit is the next round."""
        return WorkerRound(self.number + 1)

    @property
    def is_stopped(self) -> bool:
        return self.state is RoundState.STOPPED


def resumed_round(ctl: ControlView, w: int) -> WorkerRound:
    """The round a worker (re)joining the job with control vector `ctl` is in.

    New to the job (never pushed, cancelled or ended a round): its k-th fit is
    round k, as every worker's; one that starts late, after the others' first
    fit ended, thus finds that round over and its first fit ends at once, in
    step with them after. Restarted: its predecessor's round being trained, or
    the next one between rounds.
    """
    new = not (ctl.block("pushed")[w] or ctl.block("cancelled")[w] or ctl.block("ended")[w])
    return WorkerRound(1 if new else max(1, ctl.round, ctl.stop_round + 1))


# -- steps -----------------------------------------------------------------------------


def consistent(before: ControlView, after: ControlView) -> bool:
    """The seqlock: parameters read between `before` and `after` belong to step `before.step`."""
    return before.step == before.version == after.version


def step_passed(ctl: ControlView, tag: int) -> bool:
    """Whether the global step moved past `tag` (a gradient tagged `tag` was taken or is stale)."""
    return ctl.step > tag


def already_taken(ctl: ControlView, tag: int) -> bool:
    """Whether a gradient tagged `tag` would be dropped: its step was taken (TAKEN_FOR) or published (STEP).

    TAKEN_FOR counts only while it is the step being published (`step + 1`): a
    state the chief wrote again (a rejoin) clears it, and older values are moot.
    """
    return ctl.step > tag or (ctl.taken_for == ctl.step + 1 and ctl.taken_for > tag)


def checks_before_push(config: "ProtocolConfig") -> bool:
    """Whether a worker reads the control vector before each push, so as not to send a gradient already late.

    Only where a step can be taken without this worker (b > 0, or an adaptive
    N): with b = 0 every step waits for every worker, and the read would only
    cost a round trip.
    """
    return config.staleness_check and (config.adaptive is not None
                                       or config.replicas_to_aggregate < config.num_workers)


@dataclasses.dataclass(frozen=True)
class PushCounts:
    """One worker's gradient counts, as it settles them.

    Attributes:
      pushed: gradients pushed (never reset).
      dropped: pushes known never applied (stale).
      cancelled: batches never pushed (superseded while computed).
      taken_seen: the chief's count of this worker's taken gradients when the
        pushes before `unresolved` were settled.
      unresolved: pushes whose fate (taken or dropped) is not known yet.
      last_tag: the step the last push was tagged with (-1: none).
      batches: batches of input finished with, pushed or cancelled (a batch
        cancelled and then computed again on the new step is one batch).
    """

    pushed: int = 0
    dropped: int = 0
    cancelled: int = 0
    taken_seen: int = 0
    unresolved: int = 0
    last_tag: int = -1
    batches: int = 0

    @classmethod
    def resumed(cls, ctl: ControlView, w: int) -> "PushCounts":
        """A worker's counts continued from the shared state (a restarted worker: its predecessor's).

        The predecessor's unsettled pushes are settled as usual, so `taken +
        dropped == pushed` stays true.
        """
        pushed, dropped = int(ctl.block("pushed")[w]), int(ctl.block("dropped")[w])
        taken = int(ctl.block("taken")[w])
        return cls(pushed=pushed, dropped=dropped, cancelled=int(ctl.block("cancelled")[w]), taken_seen=taken,
                   unresolved=max(0, pushed - dropped - taken),
                   last_tag=int(ctl.block("last_tag")[w]) if pushed else -1,
                   batches=int(ctl.block("batches")[w]))

    def push(self, step: int) -> "PushCounts":
        """A batch's gradient pushed for `step`: the batch is finished with."""
        return dataclasses.replace(self, pushed=self.pushed + 1, unresolved=self.unresolved + 1, last_tag=step,
                                   batches=self.batches + 1)

    def cancel(self, batch_done: bool = True) -> "PushCounts":
        """A batch's computation abandoned; `batch_done`: the batch is dropped too (not computed again)."""
        return dataclasses.replace(self, cancelled=self.cancelled + 1, batches=self.batches + int(batch_done))

    def settle(self, step: int, taken: int, staleness_check: bool) -> "PushCounts":
        """The counts once the worker read step `step` and the chief's count `taken` of its gradients.

        With the staleness check, every push tagged below `step` was either
        taken or dropped. Asynchronous: every push is applied in the end.
        """
        if not self.unresolved:
            return dataclasses.replace(self, taken_seen=taken)
        if staleness_check:
            if step > self.last_tag:
                dropped = self.dropped + max(0, self.unresolved - (taken - self.taken_seen))
                return dataclasses.replace(self, dropped=dropped, taken_seen=taken, unresolved=0)
            return self
        if taken - self.taken_seen >= self.unresolved:
            return dataclasses.replace(self, taken_seen=taken, unresolved=0)
        return self


def own_slots(ctl: Control, w: int, counts: PushCounts, round_: WorkerRound) -> Tuple[List[int], List[int]]:
    """What worker `w` writes again (a `scatter_max`) into a control vector the chief wrote again.

    Its counters, the round it announced or stopped, and the last round it ended:
    all only grow, so a slot the chief's copy already has is left as it is.
    """
    running = round_.state is not RoundState.NOT_ANNOUNCED
    indices = [ctl.pushed(w), ctl.last_tag(w), ctl.dropped(w), ctl.cancelled(w), ctl.batches(w), ctl.ended(w),
               Control.ROUND, Control.STOP_ROUND]
    values = [counts.pushed, counts.last_tag, counts.dropped, counts.cancelled, counts.batches, round_.number - 1,
              round_.number if running else 0, round_.number if round_.is_stopped else 0]
    return indices, values


def input_positions(ctl: ControlView, step: int) -> List[int]:
    """Per worker, the batches a checkpoint of `step` counts as trained on, from a control vector read at that step or before.

    `batches` counts every batch pushed, also one pushed for `step` itself (read
    after its publish): that batch's gradient is not in the checkpoint's
    parameters, so it is not counted and the resumed job reads it again. A
    worker pushes once per step and tags go no higher than the step read, so
    there is at most one such push per worker.
    """
    later = (ctl.block("pushed") > 0) & (ctl.block("last_tag") >= step)
    return [int(b) - int(x) for b, x in zip(ctl.block("batches"), later)]


def superseded(tokens: np.ndarray, ctl: ControlView, step: int, round_: int, job_done: bool) -> bool:
    """Whether wake-up `tokens` (and `ctl`, read after them) make a batch on step `step` useless.

    Every change a later wait looks for comes with a token after it; a token
    taken here is acted on now (or was about an older step or round).
    """
    return tokens.max(initial=WAKE) > step or bool((tokens == WAKE).any() and round_stopped(ctl, round_, job_done))


def fresh_workers(ctl: ControlView) -> list:
    """The workers that pushed a gradient for the current step."""
    tags, pushed = ctl.block("last_tag"), ctl.block("pushed")
    return [w for w in range(ctl.num_workers) if pushed[w] and tags[w] >= ctl.step]


def missed_wakeup(tokens: np.ndarray, need: int) -> bool:
    """Whether a wait ended by its waker alone (fewer real tokens than `need`)."""
    return bool((tokens == POKE).any() and (tokens != POKE).sum() < need)


def lost_workers(num_workers: int, needed: int, gone: Sequence[int], dead: Sequence[int]) -> bool:
    """Whether too few workers are left for a step (some dead, not only left)."""
    return num_workers - len(set(gone)) < needed and bool(dead)
