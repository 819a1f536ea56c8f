"""An `Endpoint`'s connection to its task going silent or being reset, through a TCP relay on localhost."""

import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from tf_backup import errors
from tf_backup.ps import accumulators
from tf_backup.ps import endpoint

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
