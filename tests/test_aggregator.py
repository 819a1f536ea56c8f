"""The chief's aggregator against a real ps server in this process."""

import inspect
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_backup import cluster as cluster_lib
from tf_backup import errors
from tf_backup.chief import aggregator as aggregator_lib
from tf_backup.local.spec import free_ports
from tf_backup.protocol import config as config_lib
from tf_backup.protocol import pushes
from tf_backup.protocol import slots
from tf_backup.protocol import wakeups
from tf_backup.ps import endpoint
from tf_backup.ps.layout import Layout
from tf_backup.ps.shared_state import SharedState
from tf_backup.ps.waker import Waker


@pytest.fixture(scope="module")
def ps_info():
    port = free_ports(1)[0]
    spec = {"ps": [f"localhost:{port}"], "worker": ["localhost:1", "localhost:2"]}
    server = tf.distribute.Server(tf.train.ClusterSpec({"ps": spec["ps"]}), job_name="ps", task_index=0)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(spec), task_type="worker", task_id=0)
    yield cluster_lib.cluster_info_from_resolver(resolver)
    del server


def wait_for(predicate, what, timeout=20.0):
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_take_delivered_twice_publishes_the_step_unchanged(ps_info, monkeypatch):
    var = keras.Variable(np.array([1.0, 2.0], np.float32))
    layout = Layout([var], 1)
    state = SharedState("test/lost", layout, ps_info.ps, num_workers=2, endpoints=endpoint.Endpoints())
    state.create(layout.pack([var]))
    state.control.scatter_max([slots.Control.ROUND], [1])  # a fit round is running
    config = config_lib.ProtocolConfig(replicas_to_aggregate=2, num_workers=2, poll_max=0.01, poll_min=0.001)
    applied = []

    def apply_fn(grads):
        applied.append([np.asarray(g) for g in grads])
        return [np.asarray(state.params[0].read()) - np.asarray(grads[0])]

    acc = state.accs[0]
    real_wait = SharedState.wait_arrivals
    lost = []

    def wait_lost_once(self, *args, **kwargs):
        got = real_wait(self, *args, **kwargs)  # the wait and its take ran on the ps ...
        if got.sums is not None and not lost:
            lost.append(got)  # ... but the answer never came back
            raise errors.DuplicateDeliveryError("The same RunGraph (Worker) request was received twice.")
        return got

    monkeypatch.setattr(SharedState, "wait_arrivals", wait_lost_once)
    aggregator = aggregator_lib.Aggregator(state, config, ps_info, apply_fn)
    aggregator.start()
    try:
        for w in range(2):  # step 0: both gradients are taken, then lost
            acc.apply_grad(pushes.push_vector(np.array([1.0, 1.0], np.float32), w, 2), 0)
        wait_for(lambda: state.read_control()[slots.Control.STEP] == 1, "step 1")
        assert aggregator.lost_steps == 1 and applied == [] and len(lost) == 1
        np.testing.assert_array_equal(state.params[0].read(), [1.0, 2.0])  # published unchanged
        acc.apply_grad(pushes.push_vector(np.array([9.0, 9.0], np.float32), 0, 2), 0)  # stale: step 0 is over
        for w in range(2):  # step 1 applies normally: the mean gradient is [0.5, 1.5]
            acc.apply_grad(pushes.push_vector(np.array([w, w + 1.0], np.float32), w, 2), 1)
        wait_for(lambda: state.read_control()[slots.Control.STEP] == 2, "step 2")
        np.testing.assert_allclose(applied[0][0], [0.5, 1.5])
        np.testing.assert_allclose(state.params[0].read(), [0.5, 0.5])
        assert [r.taken for r in aggregator.history] == [0, 2]
        # What it published, kept for the chief's own worker: the last KEEP_PUBLISHED steps.
        np.testing.assert_allclose(aggregator.published(2)[0], [0.5, 0.5])
        np.testing.assert_allclose(aggregator.published(1)[0], [1.0, 2.0])
        assert aggregator.published(0) is None and config_lib.KEEP_PUBLISHED == 2
    finally:
        aggregator.stop()


def test_a_publish_that_fails_after_the_apply_leaves_the_master_one_step_ahead(ps_info, monkeypatch):
    # The ps dies between the apply and the publish: the master copy (and the inner optimizer)
    # already hold step 1, so the chief's checkpoint on the way out must say step 1, not 0.
    var = keras.Variable(np.array([1.0, 2.0], np.float32))
    layout = Layout([var], 1)
    state = SharedState("test/unpublished", layout, ps_info.ps, num_workers=2, endpoints=endpoint.Endpoints())
    state.create(layout.pack([var]))
    state.control.scatter_max([slots.Control.ROUND], [1])  # a fit round is running
    config = config_lib.ProtocolConfig(replicas_to_aggregate=2, num_workers=2, poll_max=0.01, poll_min=0.001)
    applied = []

    def apply_fn(grads):
        applied.append([np.asarray(g) for g in grads])
        return [np.array([0.5, 0.5], np.float32)]

    def ps_gone(self, *args, **kwargs):
        raise errors.PsUnavailableError("the ps is gone")

    monkeypatch.setattr(SharedState, "publish", ps_gone)
    aggregator = aggregator_lib.Aggregator(state, config, ps_info, apply_fn)
    assert aggregator.master_step == aggregator.step == 0
    aggregator.start()  # the public path: the loop takes both gradients, applies, then fails to publish
    try:
        for w in range(2):
            state.accs[0].apply_grad(pushes.push_vector(np.array([1.0, 1.0], np.float32), w, 2), 0)
        aggregator.join(30)
        assert not aggregator.is_alive()  # the failed publish ended the loop
    finally:
        aggregator.stop()
    assert isinstance(aggregator.failure, errors.PsUnavailableError)
    assert len(applied) == 1  # step 0 was applied once
    np.testing.assert_allclose(applied[0][0], [1.0, 1.0])
    assert aggregator.step == 0 and aggregator.master_step == 1
    np.testing.assert_array_equal(state.params[0].read(), [1.0, 2.0])  # nothing published


def running_state(ps_info, prefix):
    """Shared state of 2 workers for parameters [1, 2], with fit round 1 running."""
    var = keras.Variable(np.array([1.0, 2.0], np.float32))
    layout = Layout([var], 1)
    state = SharedState(prefix, layout, ps_info.ps, num_workers=2, endpoints=endpoint.Endpoints())
    state.create(layout.pack([var]))
    state.control.scatter_max([slots.Control.ROUND], [1])
    return state


def test_a_round_closes_only_after_the_apply_in_flight_when_it_stopped(ps_info):
    # The last take of a round was made before a worker stopped the round: its apply and
    # publish are still on their way. A worker pulling its final parameters at once would
    # miss that step; the round is closed (Control.CLOSED) only once it is published.
    import threading  # pylint: disable=g-import-not-at-top

    state = running_state(ps_info, "test/close_sync")
    config = config_lib.ProtocolConfig(replicas_to_aggregate=2, num_workers=2, poll_max=0.01, poll_min=0.001)
    in_apply, release = threading.Event(), threading.Event()

    def apply_fn(grads):
        in_apply.set()
        assert release.wait(20.0), "the test never released the apply"
        return [np.asarray(state.params[0].read()) - np.asarray(grads[0])]

    aggregator = aggregator_lib.Aggregator(state, config, ps_info, apply_fn)
    aggregator.start()
    C = slots.Control
    try:
        for w in range(2):
            state.accs[0].apply_grad(pushes.push_vector(np.array([1.0, 1.0], np.float32), w, 2), 0)
        assert in_apply.wait(20.0), "the aggregator never took step 0"
        # A worker ends round 1 while step 0's apply is in flight.
        state.control.scatter_max([C.STOP_ROUND, state.ctl.ended(1)], [1, 1])
        state.poke_aggregator(wakeups.WAKE)
        time.sleep(0.3)
        ctl = state.read_control()
        assert ctl[C.STEP] == 0 and ctl[C.CLOSED] == 0
        release.set()
        wait_for(lambda: state.read_control()[C.CLOSED] == 1, "round 1 closed")
        assert state.read_control()[C.STEP] == 1
        np.testing.assert_allclose(state.params[0].read(), [0.0, 1.0])
    finally:
        release.set()
        aggregator.stop()


def test_an_asynchronous_round_closes_once_every_worker_ended_it(ps_info):
    # Asynchronous training applies every gradient, also after the round stopped: the round
    # closes when every worker has ended it (each waited for its last gradient to be applied).
    state = running_state(ps_info, "test/close_async")
    config = config_lib.ProtocolConfig(replicas_to_aggregate=1, num_workers=2, staleness_check=False,
                                       poll_max=0.01, poll_min=0.001)
    aggregator = aggregator_lib.Aggregator(state, config, ps_info, lambda grads: [np.asarray(state.params[0].read()) - grads[0]])
    aggregator.start()
    C, c = slots.Control, state.ctl
    try:
        state.control.scatter_max([C.STOP_ROUND, c.ended(0)], [1, 1])  # worker 0 ended round 1
        state.poke_aggregator(wakeups.WAKE)
        # Worker 1 had not: its gradient, pushed after the stop, is still applied.
        state.accs[0].apply_grad(pushes.push_vector(np.array([1.0, 1.0], np.float32), 1, 2), pushes.INT64_MAX)
        state.poke_aggregator(wakeups.WAKE)
        wait_for(lambda: state.read_control()[C.STEP] == 1, "step 1")
        time.sleep(0.3)
        assert state.read_control()[C.CLOSED] == 0
        state.control.scatter_max([c.ended(1)], [1])  # worker 1 ends the round
        state.poke_aggregator(wakeups.WAKE)
        wait_for(lambda: state.read_control()[C.CLOSED] == 1, "round 1 closed")
        np.testing.assert_allclose(state.params[0].read(), [0.0, 1.0])
    finally:
        aggregator.stop()


def test_the_step_record_keeps_the_newest_history_limit_steps(ps_info):
    # A long job's record must stay bounded: with history_limit=2, after steps 0, 1, 2 only the
    # records of steps 1 and 2 remain, each with its own step's counts.
    state = running_state(ps_info, "test/history")
    config = config_lib.ProtocolConfig(replicas_to_aggregate=2, num_workers=2, poll_max=0.01, poll_min=0.001)
    aggregator = aggregator_lib.Aggregator(
        state, config, ps_info, lambda grads: [np.asarray(state.params[0].read()) - grads[0]], history_limit=2)
    aggregator.start()
    try:
        for step in range(3):
            for w in range(2):
                state.accs[0].apply_grad(pushes.push_vector(np.array([1.0, 1.0], np.float32), w, 2), step)
            wait_for(lambda: state.read_control()[slots.Control.STEP] == step + 1, f"step {step + 1}")
        assert [(r.step, r.taken, r.contributions) for r in aggregator.history] == [(1, 2, [1, 1]), (2, 2, [1, 1])]
        np.testing.assert_allclose(state.params[0].read(), [-2.0, -1.0])  # every step applied: 3 x [1, 1]
        default = inspect.signature(aggregator_lib.Aggregator).parameters["history_limit"].default
        assert default == aggregator_lib.HISTORY_LIMIT and default is not None  # bounded unless asked
    finally:
        aggregator.stop()


def test_between_rounds_the_aggregator_blocks_until_a_push_instead_of_poking_itself_twice_a_second(ps_info):
    var = keras.Variable(np.array([1.0, 2.0], np.float32))
    layout = Layout([var], 1)
    state = SharedState("test/idle", layout, ps_info.ps, num_workers=2, endpoints=endpoint.Endpoints())
    state.create(layout.pack([var]))  # no fit round yet
    config = config_lib.ProtocolConfig(replicas_to_aggregate=2, num_workers=2, poll_max=0.01, poll_min=0.001)
    aggregator = aggregator_lib.Aggregator(
        state, config, ps_info, lambda grads: [np.asarray(state.params[0].read()) - np.asarray(grads[0])])
    aggregator.start()
    try:
        time.sleep(3.0)
        # Its first wait (nothing read yet) ends at AGGREGATOR_WAIT; the next blocks IDLE_WAIT.
        assert aggregator._waker.pokes == 1  # pylint: disable=protected-access
        state.control.scatter_max([slots.Control.ROUND], [1])  # a fit begins: its pushes' tokens wake the wait
        c = state.ctl
        for w in range(2):
            waker = Waker(lambda w=w: state.poke(w), "test-waker")  # ends the push's own wait at once
            state.push_wait(w, [pushes.push_vector(np.array([1.0, 1.0], np.float32), w, 2)], 0,
                            [c.pushed(w), c.last_tag(w)], [1, 0], waker=waker, seconds=0.01, with_params=False)
            waker.close()
        wait_for(lambda: state.read_control()[slots.Control.STEP] == 1, "step 0 taken")
        np.testing.assert_allclose(state.params[0].read(), [0.0, 1.0])
        assert aggregator._waker.pokes == 1  # pylint: disable=protected-access  # the pushes woke it, not a poke
    finally:
        aggregator.stop()
