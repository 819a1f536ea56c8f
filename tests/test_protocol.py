"""Pieces of the step protocol that need no cluster: layout, signature, control slots, sleeps."""

import time

import numpy as np
import pytest
import tensorflow as tf

from tf_backup import cluster as cluster_lib
from tf_backup import protocol


def variables(*shapes, dtype=tf.float32):
    return [tf.Variable(tf.zeros(shape, dtype), name=f"v{i}") for i, shape in enumerate(shapes)]


def test_pack_unpack_round_trip_over_two_shards():
    vs = variables((3, 4), (5,), (), (2, 2, 2))
    layout = protocol.Layout(vs, num_shards=2)
    assert sorted(sum(layout.shards, [])) == [0, 1, 2, 3]
    assert sum(layout.shard_sizes) == 12 + 5 + 1 + 8
    values = [tf.reshape(tf.range(v.shape.num_elements(), dtype=tf.float32) + 10 * i, v.shape)
              for i, v in enumerate(vs)]
    flats = layout.pack(values)
    assert [int(f.shape[0]) for f in flats] == layout.shard_sizes
    for got, want in zip(layout.unpack(flats), values):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_largest_variables_are_spread_over_shards():
    layout = protocol.Layout(variables((100,), (90,), (10,), (5,)), num_shards=2)
    assert layout.shard_sizes == [105, 100]  # 100+5 and 90+10


def test_float64_variables_accumulate_in_float64():
    layout = protocol.Layout(variables((2,)) + variables((3,), dtype=tf.float64), num_shards=1)
    assert layout.dtype == tf.float64
    out = layout.unpack(layout.pack([tf.ones([2]), tf.ones([3], tf.float64)]))
    assert [t.dtype for t in out] == [tf.float32, tf.float64]


def test_integer_variables_are_refused_by_name():
    with pytest.raises(TypeError, match="variable `v0:0` with dtype=int32|dtype=int32"):
        protocol.Layout([tf.Variable(tf.zeros([2], tf.int32), name="v0")], num_shards=1)


def test_signature_check_names_the_first_differing_variable():
    chief = protocol.Layout(variables((3, 1), (1,)), num_shards=1)
    worker = protocol.Layout(variables((3, 2), (2,)), num_shards=1)
    with pytest.raises(ValueError, match=r"variable 0 \(`v0:0`\) is \(3, 2\) float32 on this worker "
                                         r"but \(3, 1\) float32 on the chief"):
        worker.check_signature(chief.signature())
    protocol.Layout(variables((3, 1), (1,)), num_shards=1).check_signature(chief.signature())


def test_signature_check_counts_variables():
    chief = protocol.Layout(variables((3, 1), (1,)), num_shards=1)
    worker = protocol.Layout(variables((3, 1)), num_shards=1)
    with pytest.raises(ValueError, match="has 1 trainable variables but the chief's has 2"):
        worker.check_signature(chief.signature())


def test_control_slots_do_not_overlap():
    c = protocol.Control(num_workers=3)
    slots = [protocol.Control.STEP, protocol.Control.VERSION, protocol.Control.ROUND,
             protocol.Control.STOP_ROUND, protocol.Control.LAST_TAKEN, protocol.Control.FINISHED]
    for block in (c.taken, c.pushed, c.dropped, c.last_tag, c.ended, c.cancelled):
        slots += [block(w) for w in range(3)]
    assert len(set(slots)) == len(slots) and max(slots) < c.size
    job = [protocol.Job.JOB_ID, protocol.Job.DONE, protocol.Job.ABORT, protocol.Job.HEARTBEAT]
    job += [f(w) for f in (protocol.Job.joined, protocol.Job.left, protocol.Job.beat) for w in range(3)]
    assert len(set(job)) == len(job) and max(job) < protocol.Job.size(3)


class FakeState:
    prefix = "fake"

    def __init__(self, num_workers):
        self.ctl = protocol.Control(num_workers)


@pytest.mark.parametrize("pushed,ended,round_,stop_round,expected", [
    (0, 0, 3, 2, 1),  # new, the others in their 3rd fit: its first fit is round 1 (over: it ends at once)
    (0, 0, 0, 0, 1),  # new, nobody started
    (5, 2, 3, 2, 3),  # restarted during round 3: it trains round 3
    (5, 3, 3, 3, 4),  # restarted between rounds: the next one
])
def test_a_worker_joining_a_running_job_picks_its_fit_round(pushed, ended, round_, stop_round, expected):
    spec = tf.train.ClusterSpec({"worker": ["h:1", "h:2"], "ps": ["h:9"]})
    info = cluster_lib.cluster_info_from_resolver(
        tf.distribute.cluster_resolver.SimpleClusterResolver(spec, task_type="worker", task_id=1))
    state = FakeState(2)
    client = protocol.WorkerClient(state, protocol.ProtocolConfig(1, 2), info, monitor=None)
    c = state.ctl
    ctl = np.zeros([c.size], np.int64)
    ctl[protocol.Control.ROUND], ctl[protocol.Control.STOP_ROUND] = round_, stop_round
    ctl[c.pushed(1)], ctl[c.taken(1)], ctl[c.ended(1)] = pushed, pushed, ended
    client._resume(ctl)  # pylint: disable=protected-access
    assert client.round == expected and client.pushed == pushed


def test_the_chief_pulls_what_its_aggregator_published_even_given_a_snapshot_from_the_ps():
    spec = tf.train.ClusterSpec({"worker": ["h:1", "h:2"], "ps": ["h:9"]})
    info = cluster_lib.cluster_info_from_resolver(
        tf.distribute.cluster_resolver.SimpleClusterResolver(spec, task_type="worker", task_id=0))
    state = FakeState(2)
    state.on_one_task = True
    published = {3: [np.full(2, 3.0, np.float32)]}
    client = protocol.WorkerClient(state, protocol.ProtocolConfig(1, 2), info, monitor=None,
                                   local_params=published.get)
    ctl = np.zeros([state.ctl.size], np.int64)
    ctl[protocol.Control.STEP] = ctl[protocol.Control.VERSION] = 3
    snapshot = (ctl, [np.full(2, -1.0, np.float32)], ctl)  # a wait past WAKE_WAIT read them from the ps too
    flats, got = client.pull(ctl, snapshot)
    np.testing.assert_array_equal(flats[0], [3.0, 3.0])
    assert got[protocol.Control.STEP] == 3 and client.step == 3 and client.local_pulls == 1
    flats, _ = client.pull(ctl)  # no snapshot: the same
    np.testing.assert_array_equal(flats[0], [3.0, 3.0])
    ctl[protocol.Control.STEP] = ctl[protocol.Control.VERSION] = 4  # not kept here: the ps's copy
    flats, _ = client.pull(ctl, (ctl, [np.full(2, 4.0, np.float32)], ctl))
    np.testing.assert_array_equal(flats[0], [4.0, 4.0])
    assert client.step == 4 and client.local_pulls == 2


class WakingState(FakeState):
    """A ps whose wake-up queue of worker 1 holds the tokens given, read with step `step`'s parameters."""

    on_one_task = True

    def __init__(self, tokens, step):
        super().__init__(2)
        self.tokens, self.waits = tokens, []
        self.ctl_now = np.zeros([self.ctl.size], np.int64)
        self.ctl_now[protocol.Control.STEP] = self.ctl_now[protocol.Control.VERSION] = step
        self.params = [np.full(2, float(step), np.float32)]

    def wait(self, w, seconds, tokens_only=False):
        assert w == 1 and not tokens_only
        self.waits.append(seconds)
        if not self.tokens:
            time.sleep(seconds)
            return None
        tokens, self.tokens = np.asarray(self.tokens, np.int64), []
        return tokens, self.ctl_now, (self.ctl_now, self.params, self.ctl_now)


def worker_1(state):
    spec = tf.train.ClusterSpec({"worker": ["h:1", "h:2"], "ps": ["h:9"]})
    info = cluster_lib.cluster_info_from_resolver(
        tf.distribute.cluster_resolver.SimpleClusterResolver(spec, task_type="worker", task_id=1))
    monitor = type("Monitor", (), {"done": False})()
    return protocol.WorkerClient(state, protocol.ProtocolConfig(1, 2), info, monitor=monitor)


def test_a_superseded_sleep_restarts_on_the_parameters_read_with_the_token():
    state = WakingState(tokens=[4], step=4)
    client = worker_1(state)
    client.step = 3
    assert client.sleep_unless_superseded(60.0)
    flats = client.restart_superseded()  # no further read: `WakingState` has none
    np.testing.assert_array_equal(flats[0], [4.0, 4.0])
    assert client.step == 4 and client.cancelled == 1
    assert client.restart_superseded() is None  # nothing left to restart
    assert len(state.waits) == 1


def test_a_token_of_the_step_already_pulled_does_not_cut_the_sleep_short():
    state = WakingState(tokens=[3], step=3)
    client = worker_1(state)
    client.step = 3
    assert not client.sleep_unless_superseded(0.05)
    assert client.restart_superseded() is None and client.cancelled == 0


def test_the_sleep_waits_on_the_ps_until_its_last_milliseconds_then_sleeps_them_here():
    state = WakingState(tokens=[], step=3)
    client = worker_1(state)
    client.step = 3
    start = time.monotonic()
    assert not client.sleep_unless_superseded(0.05)
    assert time.monotonic() - start >= 0.05
    assert len(state.waits) == 1 and state.waits[0] <= 0.05 - protocol.SLEEP_MARGIN
    state.waits.clear()
    assert not client.sleep_unless_superseded(protocol.SLEEP_MARGIN / 2)  # all of it here
    assert state.waits == []


class FakeJobVariable:
    """The job vector in memory, for `Liveness`."""

    def __init__(self, num_workers):
        self.values = np.zeros([protocol.Job.size(num_workers)], np.int64)

    def read(self):
        return self.values.copy()


def test_liveness_declares_silent_workers_dead_and_sees_them_come_back():
    spec = tf.train.ClusterSpec({"worker": [f"h:{i + 1}" for i in range(3)], "ps": ["h:9"]})
    info = cluster_lib.cluster_info_from_resolver(
        tf.distribute.cluster_resolver.SimpleClusterResolver(spec, task_type="worker", task_id=0))
    job, now = FakeJobVariable(3), [100.0]
    liveness = protocol.Liveness(job, info, worker_timeout=5.0, startup_timeout=20.0, clock=lambda: now[0])
    job.values[protocol.Job.joined(1)] = 1
    job.values[protocol.Job.beat(1)] = 7
    assert liveness.update(step=0, last_steps=[0, -1, -1]) == []
    now[0] += 5.5  # worker 1 silent for 5.5 s; worker 2 never joined (its limit is startup_timeout)
    events = liveness.update(step=4, last_steps=[3, 3, -1])
    assert [(e.worker, e.event, e.step, e.last_step, e.task) for e in events] == [
        (1, "died", 4, 3, "/job:worker/task:1 (h:2)")]
    assert liveness.dead == {1} and liveness.silent_seconds(1) == pytest.approx(5.5)
    now[0] += 15.0
    assert [(e.worker, e.event) for e in liveness.update(9, [8, 3, -1])] == [(2, "died")]
    job.values[protocol.Job.beat(1)] = 8  # restarted: its heartbeat moves again
    job.values[protocol.Job.left(2)] = 1  # worker 2 left the job cleanly: not dead
    assert [(e.worker, e.event) for e in liveness.update(12, [11, 3, -1])] == [(1, "rejoined")]
    assert liveness.dead == {2} and liveness.left == {2}
    assert [e.event for e in liveness.events] == ["died", "died", "rejoined"]
