"""Pushes (`tf_backup.protocol.pushes`): a worker's counts, input positions, a take, the chief's new pushes."""

import numpy as np
import pytest

from tf_backup.protocol import pushes
from tf_backup.protocol import slots

from tests.controls import control


def test_pushes_settle_as_taken_or_dropped_once_the_step_passes_their_tag():
    counts = pushes.PushCounts().push(0).push(1)  # two pushes, tagged 0 and 1
    assert (counts.pushed, counts.unresolved, counts.last_tag) == (2, 2, 1)
    assert counts.settle(step=1, taken=1, staleness_check=True) == counts  # the push for step 1 is pending
    settled = counts.settle(step=2, taken=1, staleness_check=True)  # one taken: the other was stale
    assert (settled.dropped, settled.unresolved, settled.taken_seen) == (1, 0, 1)
    assert settled.pushed == settled.dropped + settled.taken_seen
    # Asynchronous: every push is applied in the end; nothing is dropped.
    counts = pushes.PushCounts().push(0).push(0)
    assert counts.settle(step=5, taken=1, staleness_check=False).unresolved == 2
    assert counts.settle(step=6, taken=2, staleness_check=False) == pushes.PushCounts(
        pushed=2, taken_seen=2, last_tag=0, batches=2)


def test_the_input_position_counts_each_batch_once_whatever_becomes_of_it():
    counts = pushes.PushCounts().push(0)  # pushed
    counts = counts.cancel()  # cancelled: dropped with its batch
    counts = counts.cancel(batch_done=False).push(2)  # cancelled, computed again on the new step, pushed
    assert (counts.batches, counts.pushed, counts.cancelled) == (3, 2, 2)
    assert counts.settle(step=3, taken=1, staleness_check=True).batches == 3  # settling reads no batch
    # A worker that rejoins (or a resumed job's, from the checkpoint) continues the position in the control.
    ctl = control(batches=[7, 11], pushed=[5, 9])
    assert [pushes.PushCounts.resumed(ctl, w).batches for w in (0, 1)] == [7, 11]


def test_a_checkpoint_counts_no_batch_pushed_for_its_own_step_or_later():
    # Read after the publish of step 5: worker 1 already pushed for it, worker 0 not; worker 2 never pushed.
    ctl = control(num_workers=3, batches=[5, 6, 2], pushed=[5, 6, 0], last_tag=[4, 5, 0])
    assert pushes.input_positions(ctl, step=5) == [5, 5, 2]
    assert pushes.input_positions(ctl, step=6) == [5, 6, 2]  # read before the publish of 6: all count


def test_a_take_of_summed_pushes_splits_into_gradient_norms_and_counts():
    grads = [np.array([1.0, 2.0], np.float32), np.array([3.0, -1.0], np.float32)]
    total = pushes.push_vector(grads[0], 2, 3) + pushes.push_vector(grads[1], 0, 3)
    assert len(total) == 2 + pushes.push_tail(3)
    take = pushes.split_take(total, 3)
    np.testing.assert_allclose(take.gradient, [4.0, 1.0])
    assert take.sum_sq_norms == pytest.approx(5.0 + 10.0)
    assert take.counts.tolist() == [1, 0, 1]
    np.testing.assert_allclose(take.mean, [2.0, 0.5])


def test_new_pushes_are_those_whose_count_moved_with_their_step_and_compute_time():
    c = slots.Control(3)
    values = np.zeros([c.size], np.int64)
    for w, (pushed, tag, micros) in enumerate([(2, 7, 40_000), (1, 5, 250_000), (0, 0, 0)]):
        values[[c.pushed(w), c.last_tag(w), c.compute_us(w)]] = [pushed, tag, micros]
    ctl = c.view(values)
    assert pushes.new_pushes(np.array([1, 1, 0]), ctl) == [pushes.PushSample(0, 7, 0.04)]
    assert pushes.new_pushes(np.zeros(3), ctl) == [pushes.PushSample(0, 7, 0.04), pushes.PushSample(1, 5, 0.25)]
