"""The worker's parts that need no cluster: its link to the chief, its step metrics, its waits and recovery."""

import numpy as np
import pytest

from tests.test_imports import MODULES
from tests.test_imports import PACKAGE
from tests.test_imports import _third_party_through
from tests.test_imports import _under
from tests.test_protocol import control
from tests.test_protocol import two_workers
from tf_backup import errors
from tf_backup.protocol import config as config_lib
from tf_backup.protocol import slots
from tf_backup.protocol import staleness
from tf_backup.protocol import wakeups
from tf_backup.ps import shared_state
from tf_backup.worker import chief_link
from tf_backup.worker import client as worker_lib
from tf_backup.worker import context as context_lib
from tf_backup.worker import metrics as metrics_lib
from tf_backup.worker import recovery as recovery_lib
from tf_backup.worker import wait as wait_lib


class FakeControl:
    def __init__(self):
        self.maxed = []

    def scatter_max(self, indices, values):
        self.maxed.append((list(indices), list(values)))


class FakeState:
    """A ps with one task: its wait returns nothing, its control vector is `now`."""

    prefix = "fake"
    on_one_task = True

    def __init__(self, now):
        self.ctl = slots.Control(2)
        self.control = FakeControl()
        self.now = now
        self.waits = 0

    def read_control(self):
        return self.now

    def wait(self, w, seconds, known_step=-1, waker=None):
        """Nothing comes: without a waker the run is cancelled (None); with one, its token ends it."""
        self.waits += 1
        return None if waker is None else shared_state.Wake(np.asarray([wakeups.POKE]), self.now, None)

    def poke(self, w):
        pass


def worker(state, task_id=1, monitor=None, chief=chief_link.NONE, ps_restart_timeout=0.0, own_slots=((), ())):
    """The context, recovery and waiter of worker `task_id` of two."""
    config = config_lib.ProtocolConfig(1, 2, ps_restart_timeout=ps_restart_timeout)
    ctx = context_lib.WorkerContext(state, config, two_workers(task_id), monitor, chief)
    recovery = recovery_lib.WorkerRecovery(ctx, own_slots=lambda: own_slots)
    return ctx, recovery, wait_lib.Waiter(ctx, recovery)


# -- the step metrics --------------------------------------------------------------------------------


def test_step_metrics_go_out_as_one_vector_in_field_order():
    got = metrics_lib.StepMetrics(7, 2, 3, 4, True).as_array()
    assert got.dtype == metrics_lib.DTYPE == np.int64
    np.testing.assert_array_equal(got, [7, 2, 3, 4, 1, 0, -1, 0, -1])  # no slow worker
    assert metrics_lib.SIZE == 9
    assert metrics_lib.StepMetrics.index("dropped_gradients") == 2
    slow = metrics_lib.StepMetrics(7, 2, 3, 4, False, 2, 5, 1340, 120).as_array()
    np.testing.assert_array_equal(slow[5:], [2, 5, 1340, 120])


def test_the_logged_metrics_are_every_field_but_stopped():
    assert metrics_lib.LOGGED == ("global_step", "fresh_gradients", "dropped_gradients", "replicas_to_aggregate",
                                  "slow_workers", "slow_worker", "slow_worker_factor", "slow_worker_since_step")
    assert metrics_lib.SCALES == {"slow_worker_factor": 1000}  # logged as 1.34 for a worker 1.34x slow


# -- the link to the chief ---------------------------------------------------------------------------


def test_a_worker_that_is_not_the_chief_reads_everything_from_the_ps():
    link = chief_link.NONE
    link.raise_if_failed()
    assert tuple(link.dead_workers()) == () and not link.reads_params_here


def test_the_chief_raises_workers_lost_as_its_aggregator_raised_it():
    lost = errors.WorkersLostError("2 workers left, 3 needed")
    with pytest.raises(errors.WorkersLostError) as caught:
        chief_link.ChiefLink(failure=lambda: lost).raise_if_failed()
    assert caught.value is lost


def test_the_chief_raises_any_other_failure_of_its_aggregator_as_the_cause_of_an_aggregator_error():
    down = errors.PsUnavailableError("ps 1 did not answer")
    with pytest.raises(errors.AggregatorError) as caught:
        chief_link.ChiefLink(failure=lambda: down).raise_if_failed()
    # Not a PsUnavailableError itself: the worker's waits would take it for their own run's.
    assert not isinstance(caught.value, errors.PsUnavailableError)
    assert caught.value.__cause__ is down and "PsUnavailableError: ps 1 did not answer" in caught.value.message


def test_the_workers_the_chief_declared_dead_are_not_waited_for_at_the_end_of_a_round():
    state = FakeState(control(ended=[2, 1]))  # worker 1 never ended round 2: it died
    monitor = type("Monitor", (), {"done": False, "left_workers": lambda self: []})()
    ctx, _, waiter = worker(state, 0, monitor, chief_link.ChiefLink(dead_workers=lambda: [1]))
    assert waiter.wait_for_round_end(2, 5.0) == []
    waiter.close()
    _, _, waiter = worker(state, 0, monitor)
    assert waiter.wait_for_round_end(2, 0.05) == [str(ctx.info.workers[1])]  # not declared dead: waited for, late
    waiter.close()


# -- the step's end: on_stop -----------------------------------------------------------------------


def test_a_restart_that_sees_the_round_stopped_stops_the_worker_once():
    stops = []
    ctl = control(step=4, version=4, stop_round=1)
    state = FakeState(ctl)
    monitor = type("Monitor", (), {"done": False})()
    client = worker_lib.WorkerClient(state, config_lib.ProtocolConfig(1, 2), two_workers(1), monitor=monitor,
                                     on_stop=lambda: stops.append(client.step))
    client.superseded = wait_lib.Seen(ctl, shared_state.Snapshot(ctl, [np.full(2, 4.0, np.float32)], ctl))
    try:
        flats = client.restart_superseded()
    finally:
        client.close()
    np.testing.assert_array_equal(flats[0], [4.0, 4.0])
    assert stops == [4] and client.round_stopped


# -- the wait --------------------------------------------------------------------------------------


def test_a_wait_whose_token_never_came_counts_a_missed_wakeup_and_returns_what_it_read():
    state = FakeState(control(step=4, version=4))
    _, _, waiter = worker(state)
    try:
        seen = waiter.wait(lambda ctl: staleness.step_passed(ctl, 3), "global step 4", 5.0, step=3, pushed=1)
    finally:
        waiter.close()
    assert seen == wait_lib.Seen(state.now, None)
    assert waiter.missed_wakeups == 1 and state.waits == 1


# -- recovery --------------------------------------------------------------------------------------


def test_without_ps_restart_timeout_a_failed_run_raises_its_error():
    state = FakeState(control())
    _, recovery, waiter = worker(state)
    waiter.close()
    down = errors.PsUnavailableError("ps 0 did not answer")
    runs = []

    def run():
        runs.append(1)
        raise down

    with pytest.raises(errors.PsUnavailableError) as caught:
        recovery.retrying(run)
    assert caught.value is down and len(runs) == 1 and state.control.maxed == []


def test_after_a_failed_run_a_worker_moves_to_the_state_written_again_and_runs_once_more(monkeypatch):
    written = control(generation=2, step=9, version=9)
    state = FakeState(written)
    waited = []

    def await_generation(state_, info, seen, timeout, error, between=None):
        waited.append((seen, timeout))
        return written

    monkeypatch.setattr(recovery_lib.ps_recovery, "await_generation", await_generation)
    _, recovery, waiter = worker(state, ps_restart_timeout=30.0, own_slots=([11, 12], [5, 6]))
    waiter.close()
    outcomes = [errors.PsRestartedError("ps 0 restarted"), "done"]

    def run():
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    assert recovery.retrying(run) == "done"
    assert waited == [(0, 30.0)]  # from the generation it was in, for ps_restart_timeout
    assert recovery.generation == 2 and state.control.maxed == [([11, 12], [5, 6])]


# -- import rules ----------------------------------------------------------------------------------


def test_the_worker_imports_no_keras():
    offenders = [way for m in sorted(MODULES) if _under(m, f"{PACKAGE}.worker")
                 for way in _third_party_through(m, {"keras", "tf_keras"})]
    assert offenders == [], "\n".join(offenders)
