"""Fit rounds (`tf_backup.protocol.rounds`): running, stopped, closed, closable; a worker's round."""

import pytest

from tf_backup.protocol import pushes
from tf_backup.protocol import rounds

from tests.controls import control


def test_a_round_runs_from_its_announcement_to_its_stop():
    assert not rounds.round_running(control(round=0, stop_round=0))
    assert rounds.round_running(control(round=2, stop_round=1))
    assert not rounds.round_running(control(round=2, stop_round=2))
    assert rounds.round_stopped(control(stop_round=2), 2) and not rounds.round_stopped(control(stop_round=1), 2)
    assert rounds.round_stopped(control(finished=1), 5) and rounds.round_stopped(control(), 1, job_done=True)
    assert rounds.round_closed(control(closed=2), 2) and not rounds.round_closed(control(closed=1), 2)
    assert rounds.round_closed(control(finished=1), 9)


@pytest.mark.parametrize("named, staleness_check, pending, gone, closable", [
    (dict(round=2, stop_round=2, closed=1), True, 3, frozenset(), True),  # sync: nothing starts after a stop
    (dict(round=2, stop_round=1, closed=1), True, 0, frozenset(), False),  # round 2 runs
    (dict(round=2, stop_round=2, closed=2), True, 0, frozenset(), False),  # closed already
    (dict(round=1, stop_round=1, ended=[1, 0]), False, 0, frozenset(), False),  # async: worker 1 still in it
    (dict(round=1, stop_round=1, ended=[1, 0]), False, 0, frozenset({1}), True),  # ... unless it is gone
    (dict(round=1, stop_round=1, ended=[1, 1]), False, 1, frozenset(), False),  # a gradient to apply
    (dict(round=1, stop_round=1, ended=[1, 1]), False, 0, frozenset(), True),
])
def test_a_stopped_round_closes_once_nothing_more_is_applied_for_it(named, staleness_check, pending, gone, closable):
    ctl = control(**named)
    assert rounds.round_closable(ctl, staleness_check=staleness_check, pending=pending, gone=gone) == closable


def test_a_worker_round_moves_through_its_named_states():
    r = rounds.WorkerRound()
    assert (r.number, r.state) == (1, rounds.RoundState.NOT_ANNOUNCED)
    r = r.announced()
    assert r.state is rounds.RoundState.RUNNING and not r.is_stopped
    r = r.stopped()
    assert r.is_stopped and r.number == 1
    assert r.next() == rounds.WorkerRound(2, rounds.RoundState.NOT_ANNOUNCED)


@pytest.mark.parametrize("pushed,ended,round_,stop_round,expected", [
    (0, 0, 3, 2, 1),  # new, the others in their 3rd fit: its first fit is round 1 (over: it ends at once)
    (0, 0, 0, 0, 1),  # new, nobody started
    (5, 2, 3, 2, 3),  # restarted during round 3: it trains round 3
    (5, 3, 3, 3, 4),  # restarted between rounds: the next one
])
def test_a_worker_joining_a_running_job_picks_its_fit_round(pushed, ended, round_, stop_round, expected):
    ctl = control(round=round_, stop_round=stop_round, pushed=[0, pushed], taken=[0, pushed], ended=[0, ended])
    assert rounds.resumed_round(ctl, 1) == rounds.WorkerRound(expected)
    assert pushes.PushCounts.resumed(ctl, 1).pushed == pushed
