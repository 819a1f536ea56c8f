"""One optimizer's shared state on an in-process tf.distribute.Server: the fused runs of a step.

A worker's push and its wait are one run, ended by its `Waker` when nothing
comes; the aggregator's wait asks for the gradients still missing and takes
them in the same run.
"""

import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from tf_backup import cluster as cluster_lib
from tf_backup.protocol import pushes
from tf_backup.protocol import slots
from tf_backup.protocol import wakeups
from tf_backup.ps import endpoint
from tf_backup.ps.layout import Layout
from tf_backup.ps.shared_state import SharedState
from tf_backup.ps.waker import Waker

WORKERS = 3


_count = iter(range(1000))


@pytest.fixture
def state(server):
    """A fresh shared state (one shard of 4 floats, 3 workers) on the local server, at step 0."""
    ps = cluster_lib.Task("localhost", 0, server.target[len("grpc://"):])
    layout = Layout([tf.Variable(tf.zeros([4]), name="v")], num_shards=1)
    st = SharedState(f"t/state{next(_count)}", layout, [ps], WORKERS, endpoint.Endpoints())
    st.create([np.arange(4, dtype=np.float32)], step=0)
    return st


def push_args(state, w, tag, pushed=1):
    c = state.ctl
    grad = pushes.push_vector(np.full(4, w + 1.0, np.float32), w, WORKERS)
    return [grad], tag, [c.pushed(w), c.last_tag(w)], [pushed, tag]


def push(state, w, tag=0, pushed=1):
    """Worker `w` pushes; its wait ends at once (its waker pokes after 10 ms)."""
    waker = Waker(Pokes(state, w), "test-waker")
    try:
        return state.push_wait(w, *push_args(state, w, tag, pushed), waker=waker, seconds=0.01)
    finally:
        waker.close()


class Pokes:
    def __init__(self, state, w):
        self.state, self.w, self.count = state, w, 0

    def __call__(self):
        self.count += 1
        self.state.poke(self.w)


def test_waker_pokes_once_after_its_deadline_and_never_when_disarmed():
    pokes = []
    waker = Waker(lambda: pokes.append(time.monotonic()), "test-waker")
    start = time.monotonic()
    waker.arm(0.2)
    deadline = time.monotonic() + 10
    while not pokes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(pokes) == 1 and pokes[0] - start >= 0.2
    waker.arm(0.3)
    waker.disarm()  # the run returned in time
    time.sleep(0.6)
    assert len(pokes) == 1 and waker.pokes == 1
    waker.close()
    waker.join(5)
    assert not waker.is_alive()


def test_push_wait_pushes_once_and_is_ended_by_the_waker(state):
    pokes = Pokes(state, 1)
    waker = Waker(pokes, "test-waker")
    start = time.monotonic()
    tokens, ctl, snapshot = state.push_wait(1, *push_args(state, 1, tag=0), waker=waker, seconds=0.3)
    assert time.monotonic() - start >= 0.3 and pokes.count == 1
    np.testing.assert_array_equal(tokens, [wakeups.POKE])  # the waker's token, nothing published
    assert ctl[state.ctl.pushed(1)] == 1 and ctl[slots.Control.STEP] == 0
    before, flats, after = snapshot  # one ps task: the parameters come with the wake-up
    np.testing.assert_array_equal(flats[0], np.arange(4))
    assert state.accs[0].num_accumulated() == 1  # pushed once
    # A worker that holds step 0 already reads no parameters when the step has not moved past it.
    state.poke(1)
    _, ctl, snapshot = state.wait(1, 1.0, known_step=0)
    assert ctl[slots.Control.STEP] == 0 and snapshot is None
    state.poke(1)
    _, _, snapshot = state.wait(1, 1.0, known_step=-1)
    np.testing.assert_array_equal(snapshot.flats[0], np.arange(4))
    # With a waker, a wait has no deadline of its own: nothing came, so the waker's token ends it
    # (not a cancelled run, None), and what the run read after it comes back, the parameters too.
    start = time.monotonic()
    tokens, ctl, snapshot = state.wait(1, 0.3, known_step=-1, waker=waker)
    assert time.monotonic() - start >= 0.3 and pokes.count == 2
    np.testing.assert_array_equal(tokens, [wakeups.POKE])
    np.testing.assert_array_equal(snapshot.flats[0], np.arange(4))
    assert state.wait(1, 0.3, known_step=-1) is None  # without one, the run is cancelled at its deadline
    aggregator = Waker(state.poke_aggregator, "test-aggregator-waker")
    count, _, sums, tokens = state.wait_arrivals(5.0, aggregator)  # the push's token (tag 0) is in the queue
    assert count == 1 and sums is None and aggregator.pokes == 0
    np.testing.assert_array_equal(tokens, [0])
    waker.close()
    aggregator.close()
    with pytest.raises(RuntimeError, match="closed"):
        waker.arm(1.0)


def test_push_wait_returns_at_the_publish_with_its_parameters(state):
    waker = Waker(Pokes(state, 0), "test-waker")
    got = []
    t = threading.Thread(target=lambda: got.append(
        state.push_wait(0, *push_args(state, 0, tag=0), waker=waker, seconds=30.0)))
    t.start()
    while state.accs[0].num_accumulated() < 1:
        time.sleep(0.01)
    new = np.full(4, 7.0, np.float32)
    state.publish(1, [new], [slots.Control.STEP], [1])
    t.join(30)
    tokens, ctl, (before, flats, after) = got[0]
    np.testing.assert_array_equal(tokens, [1])
    assert ctl[slots.Control.STEP] == 1 and waker.pokes == 0
    np.testing.assert_array_equal(flats[0], new)
    waker.close()


def test_push_wait_without_parameters_returns_the_control_vector_only(state):
    # The chief's worker: it takes the parameters from its own aggregator.
    waker = Waker(Pokes(state, 1), "test-waker")
    got = []
    t = threading.Thread(target=lambda: got.append(
        state.push_wait(1, *push_args(state, 1, tag=0), waker=waker, seconds=30.0, with_params=False)))
    t.start()
    while state.accs[0].num_accumulated() < 1:
        time.sleep(0.01)
    state.publish(1, [np.full(4, 7.0, np.float32)], [slots.Control.STEP], [1])
    t.join(30)
    tokens, ctl, snapshot = got[0]
    np.testing.assert_array_equal(tokens, [1])
    assert ctl[slots.Control.STEP] == 1 and snapshot is None and waker.pokes == 0
    assert ctl[state.ctl.pushed(1)] == 1  # it pushed, in the same run
    waker.close()


def test_the_fused_push_has_its_own_apply_op_so_building_it_changes_no_op_a_session_ran(state):
    # A control dependency on an op marks it (`_has_manual_control_dependencies`); on one a session
    # already ran, TensorFlow warns that the change is lost and will become an error.
    acc = state.accs[0]
    acc.apply_grad(pushes.push_vector(np.ones(4, np.float32), 0, WORKERS), 0)  # the accumulator's own op runs
    push(state, 1)  # builds the fused runs, then pushes through them
    assert "_has_manual_control_dependencies" not in acc.ops["apply"].node_def.attr
    assert acc.num_accumulated() == 2


def test_aggregator_wait_takes_in_the_same_run_once_enough_fresh_gradients_are_in(state):
    c = slots.Control
    state.control.scatter_max([c.ROUND], [1])  # a fit round runs
    waker = Waker(state.poke_aggregator, "test-aggregator-waker")
    for w in range(2):  # two fresh pushes for step 0
        push(state, w)
    fetched = []  # what each run brought back from the ps
    run = state.control.endpoint.run
    state.control.endpoint.run = lambda *a, **k: fetched.append(run(*a, **k)) or fetched[-1]
    # Asks for one push more than came: the waker ends the wait (its tokens: one per worker); 2 < 3, no take.
    count, _, sums, tokens = state.wait_arrivals(0.3, waker, need=3, required=3, taken_for=1)
    assert count == 2 and sums is None and waker.pokes == 1
    assert fetched[-1]["took"].size == 0  # a wait that took nothing sends nothing model-sized back
    np.testing.assert_array_equal(tokens, [0, 0, wakeups.POKE])
    push(state, 2)
    count, ctl, sums, tokens = state.wait_arrivals(5.0, waker, need=1, required=3, taken_for=1)
    np.testing.assert_array_equal(tokens, [wakeups.POKE, wakeups.POKE, 0])  # the poke's spare tokens first
    assert count == 3 and sums is not None and waker.pokes == 1
    # (1 + 2 + 3) per element; the squared norms 4 * (1 + 4 + 9); one gradient per worker
    np.testing.assert_allclose(sums, [6, 6, 6, 6, 56, 1, 1, 1])
    assert state.read_control()[c.TAKEN_FOR] == 1
    assert state.accs[0].num_accumulated() == 0
    # The accumulator moved to step 1: a push still tagged 0 is dropped.
    push(state, 0, pushed=2)
    assert state.accs[0].num_accumulated() == 0
    waker.close()


def test_aggregator_wait_does_not_take_between_fit_rounds_unless_asynchronous(state):
    c = slots.Control
    state.control.scatter_max([c.ROUND, c.STOP_ROUND], [1, 1])  # round 1 ended, no other started
    waker = Waker(state.poke_aggregator, "test-aggregator-waker")
    for w in range(WORKERS):
        push(state, w)
    count, _, sums, _ = state.wait_arrivals(5.0, waker, need=3, required=2, taken_for=1)
    assert count == 3 and sums is None
    count, _, sums, _ = state.wait_arrivals(0.2, waker, need=1, required=2, taken_for=1, always=True)
    assert sums is not None and state.accs[0].num_accumulated() == 0 and waker.pokes == 1
    waker.close()


def test_aggregator_wait_refuses_to_take_with_several_shards(server):
    ps = cluster_lib.Task("localhost", 0, server.target[len("grpc://"):])
    layout = Layout([tf.Variable(tf.zeros([4]), name="a"), tf.Variable(tf.zeros([3]), name="b")], num_shards=2)
    st = SharedState(f"t/state{next(_count)}", layout, [ps, ps], WORKERS, endpoint.Endpoints())
    with pytest.raises(ValueError, match="one shard"):
        st.wait_arrivals(0.1, Waker(st.poke_aggregator, "test"), required=1, taken_for=1)


def test_a_publish_feeds_no_token_to_the_queues_of_dead_workers(state):
    # Nobody drains a dead worker's queue: a token per step would pile up for the rest of the job.
    for step in (1, 2, 3):
        state.publish(step, [np.full(4, float(step), np.float32)], [slots.Control.STEP], [step], dead={1})
    assert state.wake_queue_sizes() == [3, 0, 3]
    state.publish(4, [np.full(4, 4.0, np.float32)], [slots.Control.STEP], [4])  # it came back
    assert state.wake_queue_sizes() == [4, 1, 4]
    state.wake_all()  # stops and ends of rounds still reach everybody
    assert state.wake_queue_sizes() == [5, 2, 5]


def test_transfers_to_several_ps_tasks_run_at_once_and_every_one_ends_before_a_failure_is_raised(server):
    ps = cluster_lib.Task("localhost", 0, server.target[len("grpc://"):])
    layout = Layout([tf.Variable(tf.zeros([9]), name="v")], num_shards=3)
    state = SharedState(f"t/state{next(_count)}", layout, [ps, ps, ps], WORKERS, endpoint.Endpoints())
    # Each call waits for all three to have started: run one after another, the first would time out.
    started, ended = threading.Barrier(3, timeout=10), []

    def fn(s):
        started.wait()
        ended.append(s)
        return s * 10

    assert state.each_shard(fn) == [0, 10, 20]

    def failing(s):
        if s == 1:
            raise ValueError("shard 1")
        time.sleep(0.2)
        ended.append(s)

    ended.clear()
    with pytest.raises(ValueError, match="shard 1"):
        state.each_shard(failing)
    assert sorted(ended) == [0, 2]  # the others ran to their end first
    state.close()


class EndpointPerShard(endpoint.Endpoints):
    """A session of its own for each shard's task, on the one local server: shards 'on other tasks'."""

    def of(self, task, timeout=None):
        return endpoint.Endpoint(task.target, task.device, self.timeout)


def test_with_shards_on_other_tasks_shard_0s_bytes_go_beside_the_others_then_its_push_reads_them_on_ps_0(server):
    # Pushed after the other shards, shard 0's bytes kept ps 0's link idle while the others' were
    # busy, then crossed it alone: at 1 Gbit/s and 4 ps tasks a push took 2 M/B instead of M/B.
    ps = cluster_lib.Task("localhost", 0, server.target[len("grpc://"):])
    layout = Layout([tf.Variable(tf.zeros([8]), name="v")], num_shards=2)
    st = SharedState(f"t/state{next(_count)}", layout, [ps, ps], WORKERS, EndpointPerShard())
    assert len(st.stages) == WORKERS
    st.create([np.zeros(4, np.float32), np.zeros(4, np.float32)], step=0)
    shards_at_once = []
    each_shard = st.each_shard
    st.each_shard = lambda fn, shards=None: (shards_at_once.append(list(range(2)) if shards is None
                                                                   else list(shards)), each_shard(fn, shards))[1]
    w, c = 1, st.ctl
    grads = [pushes.push_vector(np.full(4, 2.0, np.float32), w, WORKERS),
             pushes.push_vector(np.full(4, 3.0, np.float32), w, WORKERS)]
    waker = Waker(Pokes(st, w), "test-waker")
    try:
        st.push_wait(w, grads, 0, [c.pushed(w), c.last_tag(w)], [1, 0], waker=waker, seconds=0.01)
    finally:
        waker.close()
    assert shards_at_once[0] == [0, 1]  # shard 0's bytes with shard 1's, at once
    np.testing.assert_array_equal(st.stages[w].read(), grads[0])
    # The push on ps 0 read them: each accumulator holds exactly its shard's gradient, counted once.
    assert [acc.num_accumulated() for acc in st.accs] == [1, 1]
    np.testing.assert_array_equal(st.accs[0].take_grad(1), grads[0])
    np.testing.assert_array_equal(st.accs[1].take_grad(1), grads[1])
    ctl = st.read_control()
    assert ctl.block(slots.Block.PUSHED)[w] == 1 and ctl.block(slots.Block.LAST_TAG)[w] == 0
    st.close()
