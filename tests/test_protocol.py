"""Pieces of the step that need TensorFlow but no cluster: layout, signature, a worker's pulls and sleeps, liveness.

The protocol's pure rules are tested next to their modules: `test_slots`, `test_rounds`, `test_pushes`,
`test_staleness`, `test_wakeups`, `test_membership`.
"""

import dataclasses
import json
import re
import time

import numpy as np
import pytest
import tensorflow as tf

from tf_backup import cluster as cluster_lib
from tf_backup.protocol import config as config_lib
from tf_backup.protocol import slots
from tf_backup.protocol import wakeups
from tf_backup.protocol.membership import WorkerEventKind
from tf_backup.ps import job as job_lib
from tf_backup.ps import shared_state
from tf_backup.ps import signature
from tf_backup.ps.layout import Layout
from tf_backup.ps.layout import largest_first
from tf_backup.worker import chief_link
from tf_backup.worker import client as worker_lib

from tests.controls import control


def variables(*shapes, dtype=tf.float32):
    return [tf.Variable(tf.zeros(shape, dtype), name=f"v{i}") for i, shape in enumerate(shapes)]


def test_pack_unpack_round_trip_over_two_shards():
    vs = variables((3, 4), (5,), (), (2, 2, 2))
    layout = Layout(vs, num_shards=2)
    assert sorted(set(sum(layout.shards, []))) == [0, 1, 2, 3]
    assert sum(layout.shard_sizes) == 12 + 5 + 1 + 8
    values = [tf.reshape(tf.range(v.shape.num_elements(), dtype=tf.float32) + 10 * i, v.shape)
              for i, v in enumerate(vs)]
    flats = layout.pack(values)
    assert [int(f.shape[0]) for f in flats] == layout.shard_sizes
    for got, want in zip(layout.unpack(flats), values):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    # In numpy (a step's pull): views of the shards, but where a variable spans two (a copy there).
    arrays = [f.numpy() for f in flats]
    got = layout.unpack_arrays(arrays)
    for g, want in zip(got, values):
        assert g.shape == tuple(want.shape) and g.dtype == np.float32
        np.testing.assert_array_equal(g, want.numpy())
    spans = [i for i in range(4) if sum(i in shard for shard in layout.shards) > 1]
    assert spans and all(np.shares_memory(g, arrays[0]) or np.shares_memory(g, arrays[1])
                         for i, g in enumerate(got) if i not in spans)
    assert not any(np.shares_memory(got[i], a) for i in spans for a in arrays)
    # In the wire dtype, unchanged.
    assert layout.unpack_arrays([a.astype(tf.bfloat16.as_numpy_dtype) for a in arrays])[0].dtype == tf.bfloat16.as_numpy_dtype


def test_pack_puts_each_shards_tail_in_its_one_concatenation():
    # The push's tail (a squared norm and a one-hot) is made from the shard's own pieces and goes at
    # its end: a variable cut by a shard boundary counts in each shard for its own elements only.
    vs = variables((3, 4), (5,), (2,))
    layout = Layout(vs, num_shards=3)  # 19 elements: shards of 7, 6, 6; the 3x4 matrix spans two
    values = [tf.reshape(tf.range(v.shape.num_elements(), dtype=tf.float32) + 10 * i, v.shape)
              for i, v in enumerate(vs)]
    whole = np.concatenate([v.numpy().ravel() for v in values])
    tail = lambda parts: tf.stack([tf.add_n([tf.reduce_sum(tf.square(p)) for p in parts]), 7.0])  # noqa: E731
    packed = layout.pack(values, tail=tail)
    start = 0
    for flat, size in zip(packed, layout.shard_sizes):
        body = whole[start:start + size]
        np.testing.assert_array_equal(flat.numpy(), np.concatenate([body, [np.dot(body, body), 7.0]]))
        start += size
    assert start == whole.size and layout.shard_sizes == [7, 6, 6]


def test_shards_are_equal_whatever_the_variables():
    layout = Layout(variables((100,), (90,), (10,), (5,)), num_shards=2)
    assert layout.shard_sizes == [103, 102]  # 205 elements cut at 103: the 90 spans both


def test_float64_variables_accumulate_in_float64():
    layout = Layout(variables((2,)) + variables((3,), dtype=tf.float64), num_shards=1)
    assert layout.dtype == tf.float64
    out = layout.unpack(layout.pack([tf.ones([2]), tf.ones([3], tf.float64)]))
    assert [t.dtype for t in out] == [tf.float32, tf.float64]


def test_integer_variables_are_refused_by_name():
    with pytest.raises(TypeError, match="variable `v0:0` with dtype=int32|dtype=int32"):
        Layout([tf.Variable(tf.zeros([2], tf.int32), name="v0")], num_shards=1)


def test_signature_check_names_the_first_differing_variable():
    chief = signature.values(Layout(variables((3, 1), (1,)), num_shards=1), tf.float32)
    worker = Layout(variables((3, 2), (2,)), num_shards=1)
    with pytest.raises(ValueError, match=r"variable 0 \(`v0:0`\) is \(3, 2\) float32 on this worker "
                                         r"but \(3, 1\) float32 on the chief"):
        signature.check(worker, tf.float32, chief)
    signature.check(Layout(variables((3, 1), (1,)), num_shards=1), tf.float32, chief)


def test_signature_check_counts_variables():
    chief = signature.values(Layout(variables((3, 1), (1,)), num_shards=1), tf.float32)
    worker = Layout(variables((3, 1)), num_shards=1)
    with pytest.raises(ValueError, match="has 1 trainable variables but the chief's has 2"):
        signature.check(worker, tf.float32, chief)


def test_signature_ends_with_the_wire_dtype_and_a_task_with_another_is_refused_naming_it():
    layout = Layout(variables((3, 1), (1,)), num_shards=1)
    chief = signature.values(layout, tf.float32)
    # 2 variables: rank 2, (3, 1), float32; rank 1, (1,), float32; then the wire dtype.
    assert chief.tolist() == [2, 2, 3, 1, tf.float32.as_datatype_enum, 1, 1, tf.float32.as_datatype_enum,
                              tf.float32.as_datatype_enum]
    with pytest.raises(ValueError, match=re.escape(
            "This task sends bfloat16 over the wire but the chief sends float32: give every task the same "
            "`wire_dtype`")):
        signature.check(layout, tf.bfloat16, chief)


def test_largest_first_placement_fills_the_least_loaded_bin():
    assert largest_first([100, 90, 10, 5], [0, 0]) == [0, 1, 1, 0]
    assert largest_first([3], [10, 2]) == [1]


def two_workers(task_id):
    spec = tf.train.ClusterSpec({"worker": ["h:1", "h:2"], "ps": ["h:9"]})
    return cluster_lib.cluster_info_from_resolver(
        tf.distribute.cluster_resolver.SimpleClusterResolver(spec, task_type="worker", task_id=task_id))


class FakeState:
    prefix = "fake"
    on_one_task = True

    def __init__(self, num_workers):
        self.ctl = slots.Control(num_workers)


def test_the_chief_pulls_what_its_aggregator_published_even_given_a_snapshot_from_the_ps():
    state = FakeState(2)
    published = {3: [np.full(2, 3.0, np.float32)]}
    client = worker_lib.WorkerClient(state, config_lib.ProtocolConfig(1, 2), two_workers(0), monitor=None,
                                     chief=chief_link.ChiefLink(published=published.get))
    ctl = control(step=3, version=3)
    # A wait past WAKE_WAIT read them from the ps too.
    snapshot = shared_state.Snapshot(ctl, [np.full(2, -1.0, np.float32)], ctl)
    flats, got = client.pull(worker_lib.Seen(ctl, snapshot))
    np.testing.assert_array_equal(flats[0], [3.0, 3.0])
    assert got.step == 3 and client.step == 3 and client.local_pulls == 1
    flats, _ = client.pull(worker_lib.Seen(ctl, None))  # no snapshot: the same
    np.testing.assert_array_equal(flats[0], [3.0, 3.0])
    ctl = control(step=4, version=4)  # not kept here: the ps's copy
    flats, _ = client.pull(worker_lib.Seen(ctl, shared_state.Snapshot(ctl, [np.full(2, 4.0, np.float32)], ctl)))
    np.testing.assert_array_equal(flats[0], [4.0, 4.0])
    assert client.step == 4 and client.local_pulls == 2


class WakingState(FakeState):
    """A ps whose wake-up queue of worker 1 holds the tokens given, read with step `step`'s parameters."""

    def __init__(self, tokens, step):
        super().__init__(2)
        self.tokens, self.waits = tokens, []
        self.ctl_now = control(step=step, version=step)
        self.params = [np.full(2, float(step), np.float32)]

    def wait(self, w, seconds, known_step=-1, waker=None):
        assert w == 1 and waker is None  # a sleep's wait ends at its deadline
        self.waits.append(seconds)
        if not self.tokens:
            time.sleep(seconds)
            return None
        tokens, self.tokens = np.asarray(self.tokens, np.int64), []
        return shared_state.Wake(tokens, self.ctl_now, shared_state.Snapshot(self.ctl_now, self.params, self.ctl_now))


def worker_1(state):
    monitor = type("Monitor", (), {"done": False})()
    return worker_lib.WorkerClient(state, config_lib.ProtocolConfig(1, 2), two_workers(1), monitor=monitor)


def test_a_superseded_sleep_restarts_on_the_parameters_read_with_the_token():
    state = WakingState(tokens=[4], step=4)
    client = worker_1(state)
    client.step = 3
    assert client.sleep_unless_superseded(60.0)
    flats = client.restart_superseded()  # no further read: `WakingState` has none
    np.testing.assert_array_equal(flats[0], [4.0, 4.0])
    assert client.step == 4 and client.counts.cancelled == 1
    assert client.restart_superseded() is None  # nothing left to restart
    assert len(state.waits) == 1


def test_a_token_of_the_step_already_pulled_does_not_cut_the_sleep_short():
    state = WakingState(tokens=[3], step=3)
    client = worker_1(state)
    client.step = 3
    assert not client.sleep_unless_superseded(0.05)
    assert client.restart_superseded() is None and client.counts.cancelled == 0


def test_the_sleep_waits_on_the_ps_until_its_last_milliseconds_then_sleeps_them_here():
    state = WakingState(tokens=[], step=3)
    client = worker_1(state)
    client.step = 3
    start = time.monotonic()
    assert not client.sleep_unless_superseded(0.05)
    assert time.monotonic() - start >= 0.05
    assert len(state.waits) == 1 and state.waits[0] <= 0.05 - wakeups.SLEEP_MARGIN
    state.waits.clear()
    assert not client.sleep_unless_superseded(wakeups.SLEEP_MARGIN / 2)  # all of it here
    assert state.waits == []


class FakeJobVariable:
    """The job vector in memory, for `Liveness`."""

    def __init__(self, num_workers):
        self.values = np.zeros([slots.Job(num_workers).size], np.int64)

    def read(self):
        return self.values.copy()


def test_liveness_declares_silent_workers_dead_and_sees_them_come_back():
    spec = tf.train.ClusterSpec({"worker": [f"h:{i + 1}" for i in range(3)], "ps": ["h:9"]})
    info = cluster_lib.cluster_info_from_resolver(
        tf.distribute.cluster_resolver.SimpleClusterResolver(spec, task_type="worker", task_id=0))
    job, now = FakeJobVariable(3), [100.0]
    liveness = job_lib.Liveness(job, info, worker_timeout=5.0, startup_timeout=20.0, clock=lambda: now[0])
    job_slots = slots.Job(3)
    job.values[job_slots.joined(1)] = 1
    job.values[job_slots.beat(1)] = 7
    assert liveness.update(step=0, last_steps=[0, -1, -1]) == []
    now[0] += 5.5  # worker 1 silent for 5.5 s; worker 2 never joined (its limit is startup_timeout)
    events = liveness.update(step=4, last_steps=[3, 3, -1])
    assert [(e.worker, e.event, e.step, e.last_step, e.task) for e in events] == [
        (1, "died", 4, 3, "/job:worker/task:1 (h:2)")]
    assert liveness.dead == {1} and liveness.silent_seconds(1) == pytest.approx(5.5)
    now[0] += 15.0
    assert [(e.worker, e.event) for e in liveness.update(9, [8, 3, -1])] == [(2, "died")]
    job.values[job_slots.beat(1)] = 8  # restarted: its heartbeat moves again
    job.values[job_slots.left(2)] = 1  # worker 2 left the job cleanly: not dead
    assert [(e.worker, e.event) for e in liveness.update(12, [11, 3, -1])] == [(1, "rejoined")]
    assert liveness.dead == {2} and liveness.left == {2}
    assert [e.event for e in liveness.events] == ["died", "died", "rejoined"]
    assert [e.event for e in liveness.events] == [WorkerEventKind.DIED, WorkerEventKind.DIED, WorkerEventKind.REJOINED]
    # The trainer's summary (`dataclasses.asdict`, then JSON) reads as before.
    assert json.loads(json.dumps(dataclasses.asdict(events[0])))["event"] == "died"


def test_a_beat_watch_counts_a_first_zero_as_never_beaten():
    now = [10.0]
    watch = job_lib.BeatWatch([0, 1], clock=lambda: now[0])
    now[0] = 12.0
    assert watch.observe(np.array([0, 5])) == [0, 1]
    assert watch.silent_seconds(0) == pytest.approx(2.0)  # 0: silent since the watch was made
    assert watch.silent_seconds(1) == 0.0
    now[0] = 15.0
    assert watch.observe(np.array([0, 5])) == [] and watch.silent_seconds(1) == pytest.approx(3.0)
