"""Pieces of the step protocol that need no cluster: layout, signature, slots, transitions, sleeps."""

import dataclasses
import json
import pickle
import time

import numpy as np
import pytest
import tensorflow as tf

from tf_backup import cluster as cluster_lib
from tf_backup.protocol import config as config_lib
from tf_backup.protocol import membership
from tf_backup.protocol import pushes
from tf_backup.protocol import rounds
from tf_backup.protocol import slots
from tf_backup.protocol import staleness
from tf_backup.protocol import wakeups
from tf_backup.protocol.membership import WorkerEventKind
from tf_backup.protocol.slots import Block
from tf_backup.ps import job as job_lib
from tf_backup.ps import shared_state
from tf_backup.ps.layout import Layout
from tf_backup.ps.layout import largest_first
from tf_backup.worker import client as worker_lib


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
    chief = Layout(variables((3, 1), (1,)), num_shards=1)
    worker = Layout(variables((3, 2), (2,)), num_shards=1)
    with pytest.raises(ValueError, match=r"variable 0 \(`v0:0`\) is \(3, 2\) float32 on this worker "
                                         r"but \(3, 1\) float32 on the chief"):
        worker.check_signature(chief.signature())
    Layout(variables((3, 1), (1,)), num_shards=1).check_signature(chief.signature())


def test_signature_check_counts_variables():
    chief = Layout(variables((3, 1), (1,)), num_shards=1)
    worker = Layout(variables((3, 1)), num_shards=1)
    with pytest.raises(ValueError, match="has 1 trainable variables but the chief's has 2"):
        worker.check_signature(chief.signature())


def test_control_slots_do_not_overlap():
    c = slots.Control(num_workers=3)
    used = [slots.Control.STEP, slots.Control.VERSION, slots.Control.ROUND,
            slots.Control.STOP_ROUND, slots.Control.LAST_TAKEN, slots.Control.FINISHED]
    for block in (c.taken, c.pushed, c.dropped, c.last_tag, c.ended, c.cancelled):
        used += [block(w) for w in range(3)]
    assert len(set(used)) == len(used) and max(used) < c.size
    job_slots = slots.Job(3)
    job = [slots.Job.JOB_ID, slots.Job.DONE, slots.Job.ABORT, slots.Job.HEARTBEAT]
    job += [f(w) for f in (job_slots.joined, job_slots.left, job_slots.beat) for w in range(3)]
    assert len(set(job)) == len(job) and max(job) < job_slots.size


def test_the_control_view_reads_slots_by_name():
    c = slots.Control(num_workers=3)
    values = np.zeros([c.size], np.int64)
    values[slots.Control.STEP], values[slots.Control.VERSION], values[slots.Control.CLOSED] = 5, 6, 2
    values[c.pushed(1)], values[c.last_tag(1)], values[c.dropped(2)] = 4, 5, 7
    ctl = c.view(values)
    assert (ctl.step, ctl.version, ctl.closed, ctl.finished) == (5, 6, 2, False)
    assert ctl.block(Block.PUSHED).tolist() == [0, 4, 0] and ctl.block(Block.DROPPED).tolist() == [0, 0, 7]
    assert ctl.last_steps() == [-1, 5, -1] and pushes.fresh_workers(ctl) == [1]


# The blocks' order on the ps before they were an enum (`Control.BLOCKS`, names as strings).
BLOCKS_BY_NAME = ("taken", "pushed", "dropped", "last_tag", "ended", "cancelled", "compute_us", "batches")


def test_every_block_maps_to_the_slots_it_had_by_name():
    c = slots.Control(num_workers=3)
    assert [b.name.lower() for b in Block] == list(BLOCKS_BY_NAME)
    assert sorted(b.value for b in Block) == list(range(len(BLOCKS_BY_NAME))) and c.size == 10 + 8 * 3
    ctl = c.view(np.arange(c.size, dtype=np.int64) * 10)
    for place, name in enumerate(BLOCKS_BY_NAME):
        block = Block[name.upper()]
        expected = [slots.Control.HEADER + place * 3 + w for w in range(3)]
        assert [c.slot(block, w) for w in range(3)] == expected
        assert [getattr(c, name)(w) for w in range(3)] == expected  # the named accessor agrees
        assert ctl.block(block).tolist() == [10 * slot for slot in expected]


def control(num_workers=2, **named):
    """A control view with the named header slots set (`step=3, round=2, ...`)."""
    c = slots.Control(num_workers)
    values = np.zeros([c.size], np.int64)
    for name, value in named.items():
        if name.upper() in Block.__members__:
            for w, v in enumerate(value):
                values[getattr(c, name)(w)] = v
        else:
            values[getattr(slots.Control, name.upper())] = value
    return c.view(values)


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


def test_the_seqlock_accepts_only_an_unchanged_version():
    assert staleness.consistent(control(step=3, version=3), control(step=3, version=3))
    assert not staleness.consistent(control(step=3, version=4), control(step=4, version=4))  # a publish ran
    assert not staleness.consistent(control(step=3, version=3), control(step=3, version=4))  # one began after


def test_pushes_settle_as_taken_or_dropped_once_the_step_passes_their_tag():
    counts = pushes.PushCounts().push(0).push(1)  # two pushes, tagged 0 and 1
    assert (counts.pushed, counts.unresolved, counts.last_tag) == (2, 2, 1)
    assert counts.settle(step=1, taken=1, staleness_check=True) == counts  # the push for step 1 is pending
    settled = counts.settle(step=2, taken=1, staleness_check=True)  # one taken: the other was stale
    assert (settled.dropped, settled.unresolved, settled.taken_seen) == (1, 0, 1)
    assert settled.pushed == settled.dropped + settled.taken_seen
    # Asynchronous: every push is applied in the end; nothing is dropped.
    counts = pushes.PushCounts().push(0).push(0)
    assert counts.settle(step=5, taken=1, staleness_check=False).unresolved == 2
    assert counts.settle(step=6, taken=2, staleness_check=False) == pushes.PushCounts(
        pushed=2, taken_seen=2, last_tag=0, batches=2)


def test_the_input_position_counts_each_batch_once_whatever_becomes_of_it():
    counts = pushes.PushCounts().push(0)  # pushed
    counts = counts.cancel()  # cancelled: dropped with its batch
    counts = counts.cancel(batch_done=False).push(2)  # cancelled, computed again on the new step, pushed
    assert (counts.batches, counts.pushed, counts.cancelled) == (3, 2, 2)
    assert counts.settle(step=3, taken=1, staleness_check=True).batches == 3  # settling reads no batch
    # A worker that rejoins (or a resumed job's, from the checkpoint) continues the position in the control.
    ctl = control(batches=[7, 11], pushed=[5, 9])
    assert [pushes.PushCounts.resumed(ctl, w).batches for w in (0, 1)] == [7, 11]


def test_a_checkpoint_counts_no_batch_pushed_for_its_own_step_or_later():
    # Read after the publish of step 5: worker 1 already pushed for it, worker 0 not; worker 2 never pushed.
    ctl = control(num_workers=3, batches=[5, 6, 2], pushed=[5, 6, 0], last_tag=[4, 5, 0])
    assert pushes.input_positions(ctl, step=5) == [5, 5, 2]
    assert pushes.input_positions(ctl, step=6) == [5, 6, 2]  # read before the publish of 6: all count


def test_tokens_supersede_a_batch_only_for_a_later_step_or_a_stopped_round():
    running = control(round=1, stop_round=0)
    assert wakeups.superseded(np.array([4]), running, step=3, round_=1, job_done=False)
    assert not wakeups.superseded(np.array([3]), running, step=3, round_=1, job_done=False)
    assert not wakeups.superseded(np.array([wakeups.WAKE]), running, step=3, round_=1, job_done=False)
    assert wakeups.superseded(np.array([wakeups.WAKE]), control(round=1, stop_round=1), 3, 1, False)
    assert not wakeups.superseded(np.array([wakeups.POKE]), control(round=1, stop_round=1), 3, 1, False)
    assert wakeups.missed_wakeup(np.array([wakeups.POKE]), need=1)
    assert not wakeups.missed_wakeup(np.array([0, wakeups.POKE]), need=1)


def test_too_few_workers_needs_a_dead_one_not_only_workers_that_left():
    assert membership.lost_workers(num_workers=3, needed=2, gone={1, 2}, dead={2})  # 1 of 3 left, 2 needed
    assert not membership.lost_workers(num_workers=3, needed=2, gone={2}, dead={2})  # 2 alive: enough
    assert not membership.lost_workers(num_workers=3, needed=2, gone={1, 2}, dead=set())  # they left: the fit ended


def test_largest_first_placement_fills_the_least_loaded_bin():
    assert largest_first([100, 90, 10, 5], [0, 0]) == [0, 1, 1, 0]
    assert largest_first([3], [10, 2]) == [1]


def two_workers(task_id):
    spec = tf.train.ClusterSpec({"worker": ["h:1", "h:2"], "ps": ["h:9"]})
    return cluster_lib.cluster_info_from_resolver(
        tf.distribute.cluster_resolver.SimpleClusterResolver(spec, task_type="worker", task_id=task_id))


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


class FakeState:
    prefix = "fake"
    on_one_task = True

    def __init__(self, num_workers):
        self.ctl = slots.Control(num_workers)


def test_the_chief_pulls_what_its_aggregator_published_even_given_a_snapshot_from_the_ps():
    state = FakeState(2)
    published = {3: [np.full(2, 3.0, np.float32)]}
    client = worker_lib.WorkerClient(state, config_lib.ProtocolConfig(1, 2), two_workers(0), monitor=None,
                                     local_params=published.get)
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

    def wait(self, w, seconds, known_step=-1):
        assert w == 1
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


def test_a_worker_event_kind_reads_prints_and_serialises_as_the_string_it_was():
    died = WorkerEventKind.DIED
    assert died == "died" and WorkerEventKind.REJOINED == "rejoined" and WorkerEventKind("died") is died
    assert str(died) == f"{died}" == "%s" % died == "died"  # logs and user f-strings print the word
    assert json.dumps({"event": died}) == '{"event": "died"}'
    assert pickle.loads(pickle.dumps(died)) is died  # a local cluster's results come back pickled


def test_a_beat_watch_counts_a_first_zero_as_never_beaten():
    now = [10.0]
    watch = job_lib.BeatWatch([0, 1], clock=lambda: now[0])
    now[0] = 12.0
    assert watch.observe(np.array([0, 5])) == [0, 1]
    assert watch.silent_seconds(0) == pytest.approx(2.0)  # 0: silent since the watch was made
    assert watch.silent_seconds(1) == 0.0
    now[0] = 15.0
    assert watch.observe(np.array([0, 5])) == [] and watch.silent_seconds(1) == pytest.approx(3.0)


def test_a_take_of_summed_pushes_splits_into_gradient_norms_and_counts():
    grads = [np.array([1.0, 2.0], np.float32), np.array([3.0, -1.0], np.float32)]
    total = pushes.push_vector(grads[0], 2, 3) + pushes.push_vector(grads[1], 0, 3)
    assert len(total) == 2 + pushes.push_tail(3)
    take = pushes.split_take(total, 3)
    np.testing.assert_allclose(take.gradient, [4.0, 1.0])
    assert take.sum_sq_norms == pytest.approx(5.0 + 10.0)
    assert take.counts.tolist() == [1, 0, 1]
    np.testing.assert_allclose(take.mean, [2.0, 0.5])


def test_new_pushes_are_those_whose_count_moved_with_their_step_and_compute_time():
    c = slots.Control(3)
    values = np.zeros([c.size], np.int64)
    for w, (pushed, tag, micros) in enumerate([(2, 7, 40_000), (1, 5, 250_000), (0, 0, 0)]):
        values[[c.pushed(w), c.last_tag(w), c.compute_us(w)]] = [pushed, tag, micros]
    ctl = c.view(values)
    assert pushes.new_pushes(np.array([1, 1, 0]), ctl) == [pushes.PushSample(0, 7, 0.04)]
    assert pushes.new_pushes(np.zeros(3), ctl) == [pushes.PushSample(0, 7, 0.04), pushes.PushSample(1, 5, 0.25)]


def test_a_gradient_is_already_taken_once_its_step_is_taken_or_published():
    assert not staleness.already_taken(control(step=3), 3)  # step 3 is being gathered
    assert staleness.already_taken(control(step=3, taken_for=4), 3)  # taken, not yet published
    assert staleness.already_taken(control(step=4, taken_for=4), 3)  # published
    assert not staleness.already_taken(control(step=4, taken_for=4), 4)
    # A TAKEN_FOR that is not the step being published (left by an earlier state, or cleared) says nothing.
    assert not staleness.already_taken(control(step=2, taken_for=7), 3)


def test_only_clusters_that_take_steps_without_every_worker_read_before_a_push():
    sync = config_lib.ProtocolConfig(replicas_to_aggregate=4, num_workers=4)
    assert not staleness.checks_before_push(sync)  # b = 0: never late, the read would only cost
    assert staleness.checks_before_push(dataclasses.replace(sync, replicas_to_aggregate=3))
    assert staleness.checks_before_push(
        dataclasses.replace(sync, adaptive=config_lib.AdaptiveSettings(n_min=2, n_max=4)))
    assert not staleness.checks_before_push(dataclasses.replace(sync, replicas_to_aggregate=1, staleness_check=False))
