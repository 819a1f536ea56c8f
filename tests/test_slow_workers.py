"""Persistent stragglers (tf_backup.protocol.slow_workers): who is slow, by how much, since when (no cluster)."""

import pytest

from tf_backup.protocol import adaptive
from tf_backup.protocol import slow_workers


def test_a_worker_slow_for_persist_checks_is_reported_with_its_factor_and_first_step():
    detector = slow_workers.SlowWorkerDetector(4, threshold=1.2, persist=3)
    fast = [0.1, 0.1, 0.1, 0.1]
    for step in range(10):
        assert detector.check(step, fast) == ()
    slow = [0.1, 0.1, 0.1, 0.15]
    assert detector.check(10, slow) == ()
    assert detector.check(11, slow) == ()
    assert detector.check(12, slow) == (slow_workers.SlowWorker(3, pytest.approx(1.5), 10),)
    assert detector.check(13, [0.1, 0.1, 0.1, 0.2])[0].factor == pytest.approx(2.0)  # the latest factor
    assert detector.check(14, fast) == ()  # fast again: no longer reported, and a new run starts over
    for step in (15, 16):
        assert detector.check(step, slow) == ()
    assert detector.check(17, slow)[0].since_step == 15


def test_a_stall_or_no_samples_is_not_a_slow_worker():
    detector = slow_workers.SlowWorkerDetector(3, persist=2)
    detector.check(0, [0.1, 0.1, 0.5])  # one check above: not yet
    assert detector.check(1, [0.1, 0.1, 0.1]) == ()
    assert detector.check(2, [0.1, None, None]) == ()
    with pytest.raises(ValueError, match="one value per worker"):
        detector.check(3, [0.1])
    with pytest.raises(ValueError, match="threshold"):
        slow_workers.SlowWorkerDetector(3, threshold=1.0)


def test_medians_come_from_the_arrival_window():
    window = adaptive.ArrivalWindow(3, 10)
    for step in range(10):
        window.add([0.1, 0.2, 0.4 if step % 2 else 0.3])
    assert slow_workers.medians([window.recent(w, step=9) for w in range(3)]) == pytest.approx([0.1, 0.2, 0.35])
    assert slow_workers.medians([[], [1.0]]) == [None, 1.0]


def test_spans_summarise_the_step_record():
    a = slow_workers.SlowWorker(3, 1.5, 10)
    record = [(9, ()), (12, (a,)), (13, (a._replace(factor=2.0),)), (14, ()),
              (30, (slow_workers.SlowWorker(3, 1.3, 25), slow_workers.SlowWorker(1, 1.4, 20)))]
    assert slow_workers.spans(record) == [slow_workers.SlowSpan(3, 10, 13, 2.0), slow_workers.SlowSpan(1, 20, 30, 1.4),
                                          slow_workers.SlowSpan(3, 25, 30, 1.3)]


def test_the_slowest_goes_through_the_control_slots_to_every_workers_logs():
    slow = (slow_workers.SlowWorker(1, 1.4, 20), slow_workers.SlowWorker(3, 1.3375, 25),
            slow_workers.SlowWorker(4, 1.4, 22))
    top = slow_workers.Slowest.of(slow)
    assert top == slow_workers.Slowest(3, 1, 1.4, 20)  # the largest factor; a tie: the lower index
    assert top.as_slots() == (3, 1, 1400, 20)
    assert slow_workers.Slowest.of(slow[1:2]).as_slots() == (1, 3, 1338, 25)  # thousandths, rounded
    assert slow_workers.Slowest.from_slots((1, 3, 1338, 25)) == slow_workers.Slowest(1, 3, 1.338, 25)
    assert slow_workers.Slowest.of(()) == slow_workers.NONE == slow_workers.Slowest(0, -1, 0.0, -1)
    assert slow_workers.Slowest.from_slots((0, 0, 0, 0)) == slow_workers.NONE  # a vector before any publish
