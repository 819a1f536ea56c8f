"""Pushes: what one holds, how a take splits, and how a worker counts its own; no I/O.

A worker pushes, per shard, the flat gradient of the shard's variables, its
squared norm and a one-hot of its worker index (`push_tail`, `push_vector`),
tagged with the global step it computed on (`INT64_MAX`: asynchronous, never
stale). A take of the accumulator is the sum of what it accepted (`split_take`
-> `Take`). The control vector counts each worker's pushes; the chief reads the
new ones (`new_pushes`), a worker settles its own (`PushCounts`) and writes them
again after a ps restart (`own_slots`), and a checkpoint saves the input
positions they give (`input_positions`).
"""

import dataclasses
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from tf_backup.protocol.rounds import RoundState
from tf_backup.protocol.rounds import WorkerRound
from tf_backup.protocol.slots import Block
from tf_backup.protocol.slots import Control
from tf_backup.protocol.slots import ControlView

INT64_MAX = np.iinfo(np.int64).max  # an asynchronous push's tag: never stale


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
    pushed, tags, micros = ctl.block(Block.PUSHED), ctl.block(Block.LAST_TAG), ctl.block(Block.COMPUTE_US)
    return [PushSample(w, int(tags[w]), int(micros[w]) / 1e6) for w in range(ctl.num_workers) if pushed[w] > seen[w]]


def fresh_workers(ctl: ControlView) -> list:
    """The workers that pushed a gradient for the current step."""
    tags, pushed = ctl.block(Block.LAST_TAG), ctl.block(Block.PUSHED)
    return [w for w in range(ctl.num_workers) if pushed[w] and tags[w] >= ctl.step]


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
        pushed, dropped = int(ctl.block(Block.PUSHED)[w]), int(ctl.block(Block.DROPPED)[w])
        taken = int(ctl.block(Block.TAKEN)[w])
        return cls(pushed=pushed, dropped=dropped, cancelled=int(ctl.block(Block.CANCELLED)[w]), taken_seen=taken,
                   unresolved=max(0, pushed - dropped - taken),
                   last_tag=int(ctl.block(Block.LAST_TAG)[w]) if pushed else -1,
                   batches=int(ctl.block(Block.BATCHES)[w]))

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
    later = (ctl.block(Block.PUSHED) > 0) & (ctl.block(Block.LAST_TAG) >= step)
    return [int(b) - int(x) for b, x in zip(ctl.block(Block.BATCHES), later)]
