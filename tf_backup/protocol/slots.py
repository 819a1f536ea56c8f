"""The slots of the two int64 vectors on the ps, and a typed view of the control vector: no I/O.

What lives on the ps tasks; the runs that read and write it are in
`tf_backup.ps.shared_state`, who runs them when in `tf_backup.worker.client`
(every worker) and `tf_backup.chief.aggregator` (the chief). `docs/design.md`
is the whole contract.

Shared state of one job (`tf_backup/job`, on ps task 0; slots in `Job`): the
job id, DONE and ABORT flags, the chief's heartbeat, and per worker joined,
left and a heartbeat. Shared state of one `SyncReplicasOptimizer`
(`tf_backup/<job id>/opt<k>/...`):

* `params/<s>`: the published parameters of shard `s`, flat (`tf_backup.ps.layout`).
* `acc/<s>`: a conditional accumulator per shard. A worker pushes the flat
  gradient of the shard's variables, its squared norm, and a one-hot of its
  worker index (`tf_backup.protocol.pushes`), tagged with the global step of
  the parameters it computed on. The accumulator sums what it accepts, so a
  take holds the sum of the gradients, the sum of their squared norms (the
  noise scale of `tf_backup.protocol.adaptive`) and each worker's
  contributions; a stale push is dropped whole.
* `control`: an int64 vector (slots in `Control`, typed view `ControlView`).
* `wake/<w>` and `arrivals`: int64 FIFO queues of wake-up tokens, so waits
  block on the ps instead of polling (`tf_backup.protocol.wakeups`).
* `signature`: the variables' shapes and dtypes.
* `stage/<w>` (shards on other tasks only): worker `w`'s shard-0 gradient,
  sent beside its other shards; its push on ps 0 reads it from there.
"""

import dataclasses
import enum

import numpy as np


class Block(enum.Enum):
    """The per-worker counters of the control vector: each a block of `num_workers` slots after the header.

    The value is the block's place after the header, so it is the layout on the
    ps: a new block goes last. What each counts: `Control`'s method of the same
    name (`Control.pushed` for `PUSHED`).
    """

    TAKEN = 0
    PUSHED = 1
    DROPPED = 2
    LAST_TAG = 3
    ENDED = 4
    CANCELLED = 5
    COMPUTE_US = 6
    BATCHES = 7


class Control:
    """Slots of the int64 control vector of one optimizer's shared state.

    A header of scalars, then one block of `num_workers` slots per counter (`Block`).
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
    # 4 slots from SLOW, written with each publish: the persistently slow workers as of that step, for
    # every worker's Keras logs (`slow_workers.Slowest.as_slots`: how many, the slowest's index, factor
    # in thousandths, first step).
    SLOW = 10
    SLOW_SIZE = 4
    HEADER = 14

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.size = self.HEADER + len(Block) * num_workers

    def slot(self, block: Block, w: int) -> int:
        """Worker `w`'s slot of counter `block`."""
        return self.HEADER + block.value * self.num_workers + w

    def taken(self, w: int) -> int:
        """Gradients of worker `w` averaged into a step (written by the chief)."""
        return self.slot(Block.TAKEN, w)

    def pushed(self, w: int) -> int:
        """Gradients worker `w` pushed."""
        return self.slot(Block.PUSHED, w)

    def dropped(self, w: int) -> int:
        """Pushes of worker `w` it knows were never applied (stale)."""
        return self.slot(Block.DROPPED, w)

    def last_tag(self, w: int) -> int:
        """The step worker `w`'s last push was tagged with."""
        return self.slot(Block.LAST_TAG, w)

    def ended(self, w: int) -> int:
        """The last fit round worker `w` has ended."""
        return self.slot(Block.ENDED, w)

    def cancelled(self, w: int) -> int:
        """Batches worker `w` cancelled (the step moved on while it computed; never pushed)."""
        return self.slot(Block.CANCELLED, w)

    def compute_us(self, w: int) -> int:
        """Microseconds worker `w` took from reading its last push's step to pushing (`PushSample`)."""
        return self.slot(Block.COMPUTE_US, w)

    def batches(self, w: int) -> int:
        """Batches of its input worker `w` has finished with, pushed or cancelled (its input position).

        Written with each push (a cancelled batch's count lands with the next
        push). A worker that rejoins the job resumes its input here; the chief
        saves the block with each checkpoint (`tf_backup.chief.checkpoint`).
        """
        return self.slot(Block.BATCHES, w)

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

    @property
    def slow(self) -> tuple:
        """The SLOW slots (`slow_workers.Slowest.from_slots` reads them)."""
        return tuple(int(v) for v in self.values[Control.SLOW:Control.SLOW + Control.SLOW_SIZE])

    def block(self, block: Block) -> np.ndarray:
        """One per-worker counter as an int64 array, worker `w`'s value at `w`."""
        start = Control.HEADER + block.value * self.num_workers
        return np.asarray(self.values[start:start + self.num_workers])

    def last_steps(self) -> list:
        """Per worker, the step of its last pushed gradient (-1: none)."""
        return [int(t) if p else -1 for t, p in zip(self.block(Block.LAST_TAG), self.block(Block.PUSHED))]
