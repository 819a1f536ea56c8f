"""An `Endpoint`'s connection to its task going silent or being reset, through a TCP relay on localhost."""

import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from tf_backup import errors
from tf_backup.ps import accumulators
from tf_backup.ps import endpoint
from tf_backup.ps import run_watch

from tests.relay import Relay

DEVICE = "/job:localhost/replica:0/task:0/device:CPU:0"


@pytest.fixture
def relay(server):
    r = Relay(int(server.target.rsplit(":", 1)[1]))
    yield r
    r.close()


def test_a_silent_connection_costs_one_deadline_then_the_next_run_reconnects(relay):
    where = endpoint.Endpoint(relay.target, DEVICE, timeout=2.0)
    other = endpoint.Endpoint(relay.target, DEVICE, timeout=2.0)  # another session of this process
    v = accumulators.SharedVariable("e/silent", tf.int64, [1], where)
    v.assign([5])
    np.testing.assert_array_equal(accumulators.SharedVariable("e/silent", tf.int64, [1], other).read(), [5])
    assert relay.connections == 2  # one connection per session, not one per process
    relay.silence(0)
    start = time.monotonic()
    with pytest.raises(errors.PsUnavailableError, match=r"read of `e/silent` .*did not complete within 2 s"):
        v.read()
    assert 1.9 < time.monotonic() - start < 10.0
    np.testing.assert_array_equal(accumulators.SharedVariable("e/silent", tf.int64, [1], other).read(), [5])
    np.testing.assert_array_equal(v.read(), [5])  # a new session, on a new connection
    assert relay.connections == 3
    v.assign([6])
    np.testing.assert_array_equal(v.read(), [6])


def test_a_connection_reset_under_a_blocking_run_is_a_delivery_twice_that_ran_once(relay, server):
    # A worker's push-and-wait is one run: its push, then a dequeue that blocks until the chief wakes
    # it. gRPC fails the run when the connection resets; TensorFlow's client sends it again, and the
    # task refuses the copy ("received twice"). This is how a benchmark run met one.
    where = endpoint.Endpoint(relay.target, DEVICE, timeout=20.0)
    pushed = accumulators.SharedVariable("e/pushed", tf.int64, [1], where)
    pushed.assign([0])

    def build():
        queue = tf.queue.FIFOQueue(4, [tf.int64], shared_name="e/wake")
        push = tf.raw_ops.AssignAddVariableOp(resource=pushed.ops["handle"], value=tf.constant([1], tf.int64))
        wake = queue.enqueue(tf.constant(7, tf.int64))
        with tf.control_dependencies([push]):
            return queue.dequeue(), wake

    wait, wake = where.build(build)
    got = {}

    def push_and_wait():
        start = time.monotonic()
        got["value"] = where.run(wait, what="push and wait", on_duplicate=endpoint.OnDuplicate.DONE)
        got["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=push_and_wait)
    thread.start()
    # The reset must come while the run blocks in its dequeue: once its push shows, read by a
    # session that does not go through the relay, the run is on the task and the dequeue follows.
    direct_endpoint = endpoint.Endpoint(server.target, DEVICE, timeout=20.0)
    direct = accumulators.SharedVariable("e/pushed", tf.int64, [1], direct_endpoint)
    deadline = time.monotonic() + 30.0
    while int(direct.read()[0]) == 0:
        assert time.monotonic() < deadline, "the push never reached the task"
        time.sleep(0.01)
    direct_endpoint.close()
    relay.reset_all()
    thread.join(15.0)
    assert not thread.is_alive()
    assert got["value"] is None and got["seconds"] < 10.0  # DONE: it ran once, its answer is lost
    np.testing.assert_array_equal(pushed.read(), [1])  # pushed once, not twice
    where.run(wake)
    assert int(where.run(wait)) == 7
    np.testing.assert_array_equal(pushed.read(), [2])


def test_overdue_runs_are_those_past_their_own_wait_plus_after_at_most_half_their_deadline():
    runs = {0: run_watch.InFlight("a read", "t", started=100.0, wait=0.0, deadline=60.0, answered_before=0),
            1: run_watch.InFlight("a wait", "t", started=100.0, wait=5.0, deadline=60.0, answered_before=0),
            2: run_watch.InFlight("a short read", "t", started=100.0, wait=0.0, deadline=4.0, answered_before=0),
            3: run_watch.InFlight("reported", "t", started=0.0, wait=0.0, deadline=60.0, answered_before=0,
                                  reported=True)}
    assert run_watch.overdue(runs, now=101.9, after=10.0) == []
    assert run_watch.overdue(runs, now=102.0, after=10.0) == [2]  # half of its 4 s deadline
    assert run_watch.overdue(runs, now=110.0, after=10.0) == [0, 2]
    assert run_watch.overdue(runs, now=115.0, after=10.0) == [0, 1, 2]  # 5 s of its own wait, then 10


def test_the_report_says_whether_the_task_answered_this_processs_other_runs_meanwhile():
    run = run_watch.InFlight("read of `x`", "grpc://ps0:2222", started=10.0, wait=0.0, deadline=60.0,
                             answered_before=3)
    silent = run_watch.message(run, now=22.0, answered=7, last_answer=21.5)
    assert silent == ("tf_backup: read of `x` on grpc://ps0:2222 has had no answer for 12 s (it fails at 60 s); "
                      "this process's other runs on that task were answered meanwhile (4, the last 0.5 s ago): "
                      "the task is up, and this run's connection is silent or the run is blocked there.")
    assert run_watch.message(run, now=22.0, answered=3, last_answer=9.0).endswith(
        "no other run of this process on that task was answered meanwhile.")


def test_a_run_on_a_silent_connection_is_reported_before_its_deadline_beside_the_answers_of_another(relay, caplog):
    watch = run_watch.RunWatch(after=1.0)
    where = endpoint.Endpoint(relay.target, DEVICE, timeout=6.0, watch=watch)
    other = endpoint.Endpoint(relay.target, DEVICE, timeout=6.0, watch=watch)  # its own session and connection
    v = accumulators.SharedVariable("e/watched", tf.int64, [1], where)
    v.assign([5])
    w = accumulators.SharedVariable("e/watched", tf.int64, [1], other)
    np.testing.assert_array_equal(w.read(), [5])
    relay.silence(0)
    failed = []
    thread = threading.Thread(target=lambda: failed.append(pytest.raises(errors.PsUnavailableError, v.read)))
    with caplog.at_level("WARNING"):
        thread.start()
        deadline = time.monotonic() + 5.0  # the report is due at 1 s (its thread looks every second)
        while watch.reports == 0 and time.monotonic() < deadline:
            np.testing.assert_array_equal(w.read(), [5])  # the task answers the other session
            time.sleep(0.1)
        assert watch.reports == 1 and thread.is_alive()  # reported while it still waits
        thread.join(15.0)
    assert failed and not thread.is_alive()
    reports = [r.getMessage() for r in caplog.records if "read of `e/watched`" in r.getMessage()]
    assert len(reports) == 2, reports
    assert "has had no answer for" in reports[0] and "(it fails at 6 s)" in reports[0]
    assert "other runs on that task were answered meanwhile" in reports[0]
    assert "ended without an answer after" in reports[1]
    watch.look()
    assert watch.reports == 1  # once per run
    watch.close()


def test_the_watchs_thread_ends_when_no_run_is_in_flight_and_a_later_run_starts_it_again():
    watch = run_watch.RunWatch(after=0.2)

    def reported_after_start(n):
        key = watch.started("a run", "grpc://t", wait=None, deadline=60.0)
        deadline = time.monotonic() + 5.0
        while watch.reports < n and time.monotonic() < deadline:
            time.sleep(0.05)
        watch.ended(key, answered=True)
        assert watch.reports == n

    reported_after_start(1)
    deadline = time.monotonic() + 5.0
    while watch._thread is not None and time.monotonic() < deadline:  # pylint: disable=protected-access
        time.sleep(0.05)
    assert watch._thread is None  # pylint: disable=protected-access  # idle: no thread
    reported_after_start(2)  # the next run is watched again
    watch.close()
