"""Wake-up tokens (`tf_backup.protocol.wakeups`): what supersedes a batch, a wait the waker ended."""

import numpy as np

from tf_backup.protocol import wakeups

from tests.controls import control


def test_tokens_supersede_a_batch_only_for_a_later_step_or_a_stopped_round():
    running = control(round=1, stop_round=0)
    assert wakeups.superseded(np.array([4]), running, step=3, round_=1, job_done=False)
    assert not wakeups.superseded(np.array([3]), running, step=3, round_=1, job_done=False)
    assert not wakeups.superseded(np.array([wakeups.WAKE]), running, step=3, round_=1, job_done=False)
    assert wakeups.superseded(np.array([wakeups.WAKE]), control(round=1, stop_round=1), 3, 1, False)
    assert not wakeups.superseded(np.array([wakeups.POKE]), control(round=1, stop_round=1), 3, 1, False)
    assert wakeups.missed_wakeup(np.array([wakeups.POKE]), need=1)
    assert not wakeups.missed_wakeup(np.array([0, wakeups.POKE]), need=1)


def test_the_aggregator_waits_long_only_between_rounds_with_nothing_to_close():
    wait = wakeups.aggregator_wait
    assert wait(None, staleness_check=True) == wakeups.AGGREGATOR_WAIT  # nothing read yet
    assert wait(control(round=1, stop_round=0), True) == wakeups.AGGREGATOR_WAIT  # a round runs
    assert wait(control(round=1, stop_round=1, closed=0), True) == wakeups.AGGREGATOR_WAIT  # to be closed
    assert wait(control(round=1, stop_round=1, closed=1), True) == wakeups.IDLE_WAIT
    assert wait(control(round=0, stop_round=0), True) == wakeups.IDLE_WAIT  # no fit yet
    assert wait(control(round=1, stop_round=1, closed=1), False) == wakeups.AGGREGATOR_WAIT  # asynchronous
