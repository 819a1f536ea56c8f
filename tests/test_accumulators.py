"""The conditional accumulator's staleness check, on an in-process tf.distribute.Server."""

import numpy as np
import pytest
import tensorflow as tf

from tf_backup.ps import accumulators
from tf_backup.ps import endpoint


@pytest.fixture
def where(server):
    return endpoint.Endpoint(server.target, "/job:localhost/replica:0/task:0/device:CPU:0", timeout=10.0)


def test_take_sums_fresh_gradients_and_advances_the_step(where):
    acc = accumulators.ConditionalAccumulator("t/acc1", tf.float32, [2], where)
    acc.apply_grad([1.0, 2.0], local_step=0)
    acc.apply_grad([3.0, 4.0], local_step=0)
    assert acc.num_accumulated() == 2
    np.testing.assert_array_equal(acc.take_grad(2), [4.0, 6.0])
    # The take advanced the accumulator to step 1: a gradient tagged 0 is stale.
    acc.apply_grad([100.0, 100.0], local_step=0)
    assert acc.num_accumulated() == 0
    acc.apply_grad([0.5, 0.5], local_step=1)
    np.testing.assert_array_equal(acc.take_grad(1), [0.5, 0.5])


def test_a_narrow_wire_dtype_carries_the_body_and_keeps_the_tail_and_the_sums_exact(where):
    acc = accumulators.ConditionalAccumulator("t/acc_wire", tf.float32, [4], where, tail=2,
                                              wire_dtype=tf.bfloat16)
    bf16 = tf.bfloat16.as_numpy_dtype
    # 1 + 2**-7 is exact in bfloat16 (8 significand bits); 123456.789 in the tail is not.
    acc.apply_grad((np.array([1 + 2**-7, 3.0], bf16), np.array([123456.789, 1.0], np.float32)), local_step=0)
    acc.apply_grad(np.array([1 + 2**-7, 5.0, 0.25, 1.0], np.float32), local_step=0)  # a whole vector, cut here
    body, tail = acc.take_grad(2)
    assert body.dtype == bf16 and tail.dtype == np.float32
    np.testing.assert_array_equal(body.astype(np.float32), [2 + 2**-6, 8.0])
    np.testing.assert_array_equal(tail, np.array([123456.789 + 0.25, 2.0], np.float32))  # summed in float32
    # The staleness check is the same.
    acc.apply_grad(np.zeros([4], np.float32), local_step=0)
    assert acc.num_accumulated() == 0


def test_set_global_step_makes_older_tags_stale(where):
    acc = accumulators.ConditionalAccumulator("t/acc2", tf.float64, [1], where, reduction_type="MEAN")
    acc.set_global_step(5)
    acc.apply_grad([1.0], local_step=4)
    assert acc.num_accumulated() == 0
    acc.apply_grad([1.0], local_step=5)
    acc.apply_grad([3.0], local_step=7)
    np.testing.assert_array_equal(acc.take_grad(2), [2.0])


def test_same_shared_name_reaches_the_same_resources(where):
    a = accumulators.ConditionalAccumulator("t/acc3", tf.float32, [1], where)
    b = accumulators.ConditionalAccumulator("t/acc3", tf.float32, [1], where)
    a.apply_grad([2.0], local_step=0)
    assert b.num_accumulated() == 1
    v = accumulators.SharedVariable("t/var", tf.int64, [3], where)
    assert not v.is_initialized()
    v.assign([1, 2, 3])
    w = accumulators.SharedVariable("t/var", tf.int64, [3], where)
    w.scatter_update([0], [7])
    w.scatter_max([1, 2], [1, 9])
    np.testing.assert_array_equal(v.read(), [7, 2, 9])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dtype=tf.int32), TypeError, "float16, float32 and float64. Received dtype=int32"),
    (dict(reduction_type="MAX"), ValueError, "reduction_type='MAX'"),
])
def test_bad_accumulator_arguments(kwargs, error, message, where):
    args = dict(shared_name="t/bad", dtype=tf.float32, shape=[1], where=where)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        accumulators.ConditionalAccumulator(**args)


def test_a_task_that_does_not_answer_fails_within_the_deadline_naming_it():
    import socket  # pylint: disable=g-import-not-at-top
    from tf_backup import errors  # pylint: disable=g-import-not-at-top
    with socket.socket() as s:
        s.bind(("localhost", 0))
        s.listen()  # accepts TCP but never speaks gRPC
        target = f"grpc://localhost:{s.getsockname()[1]}"
        where = endpoint.Endpoint(target, "/job:ps/replica:0/task:0/device:CPU:0", timeout=2.0)
        v = accumulators.SharedVariable("t/silent", tf.int64, [1], where)
        with pytest.raises(errors.PsUnavailableError, match=r"initialized of `t/silent` on .*did not complete within 2 s"):
            v.is_initialized()


def test_a_request_delivered_twice_is_retried_only_when_idempotent(where, monkeypatch):
    acc = accumulators.ConditionalAccumulator("t/dup", tf.float32, [1], where)
    v = accumulators.SharedVariable("t/dupvar", tf.int64, [1], where)
    v.assign([4])
    real = endpoint.Endpoint._run_once  # pylint: disable=protected-access
    calls = []

    def deliver_twice_once(self, fetches, feed_dict, what, wait=None):
        calls.append(what)
        if len(calls) == 1:
            real(self, fetches, feed_dict, what, wait)  # the first delivery runs ...
            raise tf.errors.AbortedError(None, None, "The same RunGraph (Worker) request was received twice.")
        return real(self, fetches, feed_dict, what, wait)

    monkeypatch.setattr(endpoint.Endpoint, "_run_once", deliver_twice_once)
    np.testing.assert_array_equal(v.read(), [4])  # a read is run again
    assert len(calls) == 2
    calls.clear()
    acc.apply_grad([1.0], local_step=0)  # a push ran once and is not repeated
    assert len(calls) == 1 and acc.num_accumulated() == 1
    calls.clear()
    with pytest.raises(tf.errors.AbortedError):  # a take's result is lost: it must not take again
        acc.take_grad(1)
    assert acc.num_accumulated() == 0


def _queue_ops(where, name):
    def ops():
        queue = accumulators.fifo_queue(name)
        block = tf.compat.v1.placeholder(tf.bool, [])
        token = tf.compat.v1.placeholder(tf.int64, [])
        return dict(drain=accumulators.drain(queue, block), block=block, token=token,
                    enqueue=tf.raw_ops.QueueEnqueueV2(handle=queue, components=[token]))
    return where.build(ops)


def test_a_drain_past_its_wait_returns_none_and_takes_nothing(where):
    q = _queue_ops(where, "t/queue1")
    for _ in range(2):  # the task cancels the timed-out dequeue: no later token is lost to it
        assert where.run(q["drain"], {q["block"]: True}, wait=0.2) is None
    np.testing.assert_array_equal(where.run(q["drain"], {q["block"]: False}, wait=1.0), [])  # no wait
    for token in (5, 6):
        where.run(q["enqueue"], {q["token"]: token})
    np.testing.assert_array_equal(where.run(q["drain"], {q["block"]: True}, wait=5.0), [5, 6])  # all at once
    assert where.run(q["drain"], {q["block"]: True}, wait=0.1) is None


def test_a_blocked_drain_does_not_hold_up_other_runs_of_the_same_endpoint(where):
    import threading  # pylint: disable=g-import-not-at-top
    q = _queue_ops(where, "t/queue2")
    v = accumulators.SharedVariable("t/var_beside_queue", tf.int64, [1], where)
    v.assign([0])
    got = []
    waiter = threading.Thread(target=lambda: got.append(where.run(q["drain"], {q["block"]: True}, wait=60.0)))
    waiter.start()
    for i in range(1, 21):  # a push, a read, a heartbeat of another thread meanwhile
        v.scatter_max([0], [i])
    assert v.read()[0] == 20 and waiter.is_alive() and not got
    where.run(q["enqueue"], {q["token"]: 7})
    waiter.join(30)
    assert not waiter.is_alive()
    np.testing.assert_array_equal(got[0], [7])


@pytest.mark.cluster
def test_closing_an_endpoint_of_a_task_that_is_gone_does_not_wait_for_it():
    # A session's close asks the task to end it: to a task that exited, it blocks until the deadline.
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    from tf_backup.local.spec import free_ports  # pylint: disable=g-import-not-at-top
    port = free_ports(1)[0]
    session_timeout, wait = 60.0, 0.5
    server = subprocess.Popen([sys.executable, "-c", (
        "import time, tensorflow as tf\n"
        f"s = tf.distribute.Server(tf.train.ClusterSpec({{'ps': ['localhost:{port}']}}), job_name='ps', task_index=0)\n"
        "print('up', flush=True)\ntime.sleep(300)\n")], stdout=subprocess.PIPE)
    try:
        assert server.stdout.readline().strip() == b"up"
        where = endpoint.Endpoint(f"grpc://localhost:{port}", "/job:ps/replica:0/task:0/device:CPU:0",
                                  timeout=session_timeout)
        v = accumulators.SharedVariable("t/gone", tf.int64, [1], where)
        v.assign([3])
        np.testing.assert_array_equal(v.read(), [3])
    finally:
        server.kill()
        server.wait(10)
    start = time.monotonic()
    where.close(wait=wait)
    # It returns after its `wait`, not at the session's deadline (its close would block 60 s): a
    # bound halfway between the two (a loaded machine adds seconds, not a minute).
    assert time.monotonic() - start < session_timeout / 2
