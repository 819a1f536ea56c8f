"""A ps task restarted empty (`tf_backup.ps.recovery`): the chief writes the state again in a new generation.

The pure parts (what the chief and a worker write again) are checked on their
own; the rest on a real ps server process, killed and started again on its port.
"""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_backup import cluster as cluster_lib
from tf_backup import errors
from tf_backup.local import launch
from tf_backup.local.spec import free_ports
from tf_backup.protocol import config as config_lib
from tf_backup.protocol import pushes
from tf_backup.protocol import restart
from tf_backup.protocol import rounds
from tf_backup.protocol.slots import Block
from tf_backup.protocol.slots import Control
from tf_backup.protocol.slots import Job
from tf_backup.ps import endpoint
from tf_backup.ps import job as job_lib
from tf_backup.ps import lifecycle
from tf_backup.ps import recovery
from tf_backup.ps import server as server_lib
from tf_backup.ps.layout import Layout
from tf_backup.ps.shared_state import SharedState
from tf_backup.worker import client as worker_lib

import programs.faults

WORKERS = 3

SERVER = """
import sys, time, tensorflow as tf
server = tf.distribute.Server(tf.train.ClusterSpec({"ps": [sys.argv[1]]}), job_name="ps", task_index=0,
                              protocol="grpc", start=True)
print("serving", flush=True)
time.sleep(600)
"""


def start_ps(address: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, address], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "serving"
    return proc


def test_the_chief_writes_back_its_own_slots_over_its_last_read():
    ctl = Control(WORKERS)
    last = np.arange(ctl.size, dtype=np.int64)
    values = restart.control_to_restore(ctl.view(last), WORKERS, taken=[5, 6, 7], replicas=2, finished=False)
    assert [values[ctl.taken(w)] for w in range(WORKERS)] == [5, 6, 7]
    assert values[Control.REPLICAS] == 2
    assert values[Control.FINISHED] == last[Control.FINISHED]  # a FINISHED already read stays
    others = [i for i in range(ctl.size)
              if i not in {Control.REPLICAS, *(ctl.taken(w) for w in range(WORKERS))}]
    np.testing.assert_array_equal(values[others], last[others])  # the workers' slots, as read

    fresh = restart.control_to_restore(None, WORKERS, taken=[0, 1, 0], replicas=3, finished=True)
    assert fresh[Control.FINISHED] == 1 and fresh[Control.REPLICAS] == 3 and fresh[ctl.taken(1)] == 1
    assert fresh.sum() == 1 + 3 + 1


def test_a_worker_writes_back_its_counts_and_its_round():
    ctl = Control(WORKERS)
    counts = pushes.PushCounts(pushed=9, dropped=2, cancelled=1, last_tag=8, batches=10)
    running = rounds.WorkerRound(2).announced()
    indices, values = pushes.own_slots(ctl, 1, counts, running)
    got = dict(zip(indices, values))
    assert got[ctl.pushed(1)] == 9 and got[ctl.dropped(1)] == 2 and got[ctl.cancelled(1)] == 1
    assert got[ctl.last_tag(1)] == 8 and got[ctl.batches(1)] == 10
    assert got[ctl.ended(1)] == 1  # round 1 is over
    assert got[Control.ROUND] == 2 and got[Control.STOP_ROUND] == 0  # scatter_max: 0 leaves it

    _, values = pushes.own_slots(ctl, 1, counts, running.stopped())
    assert dict(zip(indices, values))[Control.STOP_ROUND] == 2
    _, values = pushes.own_slots(ctl, 1, counts, rounds.WorkerRound(3))
    assert dict(zip(indices, values))[Control.ROUND] == 0  # not announced yet: nothing to say


def test_a_worker_pushes_again_only_a_gradient_of_the_new_states_step():
    move = restart.next_move
    assert move(step=12, own_step=12, done=False, pushed=True) is restart.Move.PUSH_AGAIN  # a ps restart
    assert move(step=12, own_step=12, done=False, pushed=False) is restart.Move.WAIT
    assert move(step=13, own_step=12, done=True, pushed=True) is restart.Move.PULL  # the step passed meanwhile
    # A restarted chief went back to its checkpoint: the gradient of step 18 would count as fresh at 15.
    assert move(step=15, own_step=18, done=False, pushed=True) is restart.Move.PULL


def test_after_a_failed_connection_a_push_is_sent_again_only_if_it_was_not_counted():
    ctl = Control(WORKERS)
    values = np.zeros([ctl.size], np.int64)
    values[ctl.pushed(1)], values[Control.GENERATION] = 7, 2
    seen = ctl.view(values)
    assert restart.push_kept(seen, generation=2, w=1, pushed=7)  # the run reached the task: not again
    assert not restart.push_kept(seen, generation=2, w=1, pushed=8)  # it did not: push it again
    assert not restart.push_kept(seen, generation=1, w=1, pushed=7)  # new accumulators since: again


@pytest.mark.parametrize("silent_at", [10, -1], ids=["mid-fit", "fit-end"])
def test_a_worker_whose_connection_to_ps0_goes_silent_carries_on_in_the_same_generation(silent_at):
    # Worker 1 reaches ps 0 through a relay whose connections go silent at its batch 10, or once its
    # last batch is done (the end of the round meets it): its runs meet their 5 s deadline, the next
    # ones go on new connections, and the state was never lost.
    steps = 150
    out = launch.launch_local(programs.faults.train_through_a_silent_connection, num_workers=3, timeout=300,
                              kwargs=dict(steps=steps, silent_worker=1, silent_at=silent_at, ps_restart_timeout=30.0))
    chief, silent = out[0], out[1]
    assert [r["error"] for r in out] == [None, None, None]
    assert silent["connections"] >= 2  # it connected again
    for r in out:
        assert r["step"] == r["stats"]["global_step"] == steps
        assert r["generation"] == 0 and r["state_rewrites"] == 0  # nothing was written again
        np.testing.assert_array_equal(r["weights"][0], chief["weights"][0])
    if silent_at >= 0:
        assert silent["stats"]["pushed"][1] > silent_at + 1  # it trained again after the silence
    assert chief["events"] == []  # 5 s of silence is not a death (worker_timeout 30 s)


def test_without_ps_restart_timeout_a_worker_whose_connection_goes_silent_fails_saying_so():
    # As above, without ps_restart_timeout: the silent worker's run meets its 5 s deadline and its fit
    # raises PsUnavailableError naming ps 0 and the deadline; b = 1, so the others train to the end.
    steps = 40
    out = launch.launch_local(programs.faults.train_through_a_silent_connection, num_workers=3, timeout=300,
                              kwargs=dict(steps=steps, silent_worker=1, silent_at=10, ps_restart_timeout=0.0))
    chief, silent = out[0], out[1]
    assert silent["error"] == "PsUnavailableError", silent  # not a restarted ps: nothing was lost
    assert "on /job:ps/replica:0/task:0/device:CPU:0 (grpc://" in silent["message"], silent["message"]
    assert "did not complete within 5 s (DeadlineExceededError" in silent["message"], silent["message"]
    assert silent["connections"] >= 1
    for r in (chief, out[2]):
        assert r["error"] is None and r["step"] == r["stats"]["global_step"] == steps
        np.testing.assert_array_equal(r["weights"][0], chief["weights"][0])
    assert chief["stats"]["pushed"][1] <= 11  # worker 1 trained no more after its silence


def test_a_rejoining_chief_keeps_the_workers_slots_and_clears_its_step_marks():
    ctl = Control(WORKERS)
    values = np.arange(ctl.size, dtype=np.int64) + 1
    written = restart.control_to_rejoin(ctl.view(values), replicas=2)
    assert written[Control.FINISHED] == written[Control.TAKEN_FOR] == 0 and written[Control.REPLICAS] == 2
    kept = [i for i in range(ctl.size) if i not in (Control.FINISHED, Control.TAKEN_FOR, Control.REPLICAS)]
    np.testing.assert_array_equal(written[kept], values[kept])


def test_without_a_restart_timeout_the_error_is_raised_as_it_came():
    error = errors.PsUnavailableError("ps 0 is gone")
    with pytest.raises(errors.PsUnavailableError, match="ps 0 is gone"):
        recovery.await_generation(None, None, 0, timeout=0.0, error=error)
    with pytest.raises(errors.PsUnavailableError, match="ps 0 is gone"):
        recovery.ChiefRecovery(None, None, timeout=0.0, liveness=None).recover(error, [], 0, np.zeros([1]))


def test_a_restarted_ps_is_written_again_in_a_new_generation():
    address = f"localhost:{free_ports(1)[0]}"
    ps = cluster_lib.Task("ps", 0, address)
    proc = start_ps(address)
    try:
        layout = Layout([tf.Variable(tf.zeros([4]), name="v")], num_shards=1)
        state = SharedState("t/recovery", layout, [ps], WORKERS, endpoint.Endpoints(timeout=10.0))
        state.create([np.arange(4, dtype=np.float32)], step=7)
        state.accs[0].apply_grad(pushes.push_vector(np.ones(4, np.float32), 0, WORKERS), 7)
        assert state.accs[0].num_accumulated() == 1 and state.intact()

        proc.kill()
        proc.wait()
        proc = start_ps(address)
        with pytest.raises(errors.PsRestartedError, match="restarted"):
            state.read_control()  # the session made before the restart is not known there
        assert not state.intact()  # the next run has a new session: the state is gone
        assert not restart.state_lost(state.ctl.view(np.zeros([state.ctl.size], np.int64)), 0)

        control = np.zeros([state.ctl.size], np.int64)
        control[state.ctl.pushed(0)] = 1
        assert state.repopulate([np.arange(4, dtype=np.float32) + 1], 7, control) == 1
        ctl = state.read_control()
        assert (ctl.step, ctl.version, ctl.generation) == (7, 7, 1) and ctl.block(Block.PUSHED)[0] == 1
        assert restart.state_lost(ctl, 0) and not restart.state_lost(ctl, 1)
        np.testing.assert_array_equal(state.read_params()[0], np.arange(4) + 1)
        assert state.intact()

        # A worker that has not seen generation 1 pushes into generation 0's accumulator, which the
        # restart made anew at step 0 (it accepts any tag): nobody takes it.
        grad = pushes.push_vector(np.ones(4, np.float32), 1, WORKERS)
        state.accs_of(0)[0].apply_grad(grad, 3)
        assert state.accs_of(0)[0].num_accumulated() == 1
        assert state.accs[0].num_accumulated() == 0
        state.accs[0].apply_grad(grad, 6)  # stale for step 7: dropped
        state.accs[0].apply_grad(grad, 7)
        assert state.accs[0].num_accumulated() == 1

        # A worker process that joins now (restarted after the ps restart) pushes into generation 1.
        joiner = SharedState("t/recovery", layout, [ps], WORKERS, endpoint.Endpoints(timeout=10.0))
        spec = tf.train.ClusterSpec({"worker": [f"h:{i + 1}" for i in range(WORKERS)], "ps": [address]})
        info = cluster_lib.cluster_info_from_resolver(
            tf.distribute.cluster_resolver.SimpleClusterResolver(spec, task_type="worker", task_id=2))
        client = worker_lib.WorkerClient(joiner, config_lib.ProtocolConfig(2, WORKERS), info, monitor=None)
        try:
            client.resume()
        finally:
            client.close()
        assert client.generation == joiner.generation == 1 and client.counts.pushed == 0  # worker 2 never pushed
        joiner.accs[0].apply_grad(pushes.push_vector(np.ones(4, np.float32), 2, WORKERS), 7)
        assert state.accs[0].num_accumulated() == 2  # where the chief takes
    finally:
        proc.kill()
        proc.wait()


def test_another_ps_task_reads_a_restarted_ps0_as_gone_then_empty_then_written_again():
    # The race the slow suite found: another ps task's poll lands after ps 0 is back, before the
    # chief wrote the job vector again; it is a read (`Ps0Empty`), not a crash of `serve()`.
    address = f"localhost:{free_ports(1)[0]}"
    ps0 = cluster_lib.Task("ps", 0, address)
    proc = start_ps(address)
    try:
        where = endpoint.Endpoints(timeout=10.0).of(ps0, timeout=5.0)
        done_job = job_lib.job_variable(where, WORKERS)
        vector = np.zeros([Job(WORKERS).size], np.int64)
        vector[Job.JOB_ID] = 41
        done_job.assign(vector)
        beats = server_lib._Beats(WORKERS)
        read = server_lib._read_ps0(done_job, beats, ps0)
        assert isinstance(read, lifecycle.JobRead) and read.job_id == 41 and not read.done

        proc.kill()
        proc.wait()
        proc = start_ps(address)
        reads = [server_lib._read_ps0(done_job, beats, ps0) for _ in range(2)]
        assert [type(r) for r in reads] == [lifecycle.NoAnswer, lifecycle.Ps0Empty]  # an old session, then empty
        assert reads[0].listening()

        done_job.assign(vector)  # the chief writes the state again (`tf_backup.ps.recovery`)
        read = server_lib._read_ps0(done_job, beats, ps0)
        assert isinstance(read, lifecycle.JobRead) and read.job_id == 41
    finally:
        proc.kill()
        proc.wait()


def test_another_ps_task_that_ends_on_a_ps0_back_empty_raises_naming_the_setting():
    spec = tf.train.ClusterSpec({"worker": ["h:1", "h:2"], "ps": ["h:3", "h:4"]})
    info = cluster_lib.cluster_info_from_resolver(
        tf.distribute.cluster_resolver.SimpleClusterResolver(spec, task_type="ps", task_id=1))
    settings = lifecycle.Settings(startup_timeout=600.0, chief_timeout=120.0, exit_grace=60.0, silent_worker=10.0,
                                  ps_restart_timeout=30.0, chief_rejoins=False)
    serving = lifecycle.transition(lifecycle.waiting(0.0), lifecycle.JobRead(
        41, False, False, (True, True), (False, False), (0.0, 0.0), 0.0), 1.0, settings)
    ended = lifecycle.transition(lifecycle.transition(serving, lifecycle.Ps0Empty(), 2.0, settings),
                                 lifecycle.Ps0Empty(), 33.0, settings)
    with pytest.raises(errors.PsRestartedError, match=r"\(h:3\) restarted and lost the job 41.*ps_restart_timeout \(30 s\)"):
        server_lib._ended(info, ended, settings)
