"""launch_local's own contract: errors carry the log, nothing is left running."""

import os
import pathlib

import pytest

import tf_backup
from tf_backup.local import logs
from tf_backup.local import supervisor
from tf_backup.local.spec import local_cluster_spec
import programs.launch


def proc_stat(pid: int):
    """The fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, ...]; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def tasks_left(log_dir, tasks: int):
    """The task processes of the cluster of `log_dir` still running, by the pid files beside their logs."""
    pids = [int(p.read_text()) for p in pathlib.Path(log_dir).glob("*.pid")]
    assert len(pids) == tasks, f"{len(pids)} pid files in {log_dir}, not {tasks}"
    return [p for p in pids if alive(p)]


@pytest.mark.cluster
def test_failing_worker_raises_with_its_log_and_kills_the_rest(tmp_path):
    log_dir = str(tmp_path / "logs")
    with pytest.raises(tf_backup.LocalClusterError) as info:
        tf_backup.launch_local(programs.launch.fail_on_worker_1, num_workers=2, timeout=120, log_dir=log_dir)
    message = str(info.value)
    assert "Task worker-1 of the local cluster failed (exit code 1)" in message
    assert "RuntimeError: worker 1 broke on purpose" in message
    assert (info.value.task, info.value.exit_code) == ("worker-1", 1)
    assert info.value.error == "builtins.RuntimeError: worker 1 broke on purpose"
    assert tasks_left(log_dir, 3) == []


@pytest.mark.cluster
def test_a_failed_chief_is_named_although_the_ps_task_it_aborted_exited_first(tmp_path):
    """The chief's StepTimeoutError ends the job; its ps task exits (ChiefUnavailableError) 5 s before it."""
    log_dir = str(tmp_path / "logs")
    with pytest.raises(tf_backup.LocalClusterError) as info:
        tf_backup.launch_local(programs.launch.chief_fails_and_exits_late, num_workers=2, args=(3.0, 5.0), timeout=180,
                               log_dir=log_dir)
    assert (info.value.task, info.value.exit_code) == ("worker-0", 1), str(info.value)
    assert info.value.error.startswith("tf_backup.errors.StepTimeoutError: Worker 0 /job:worker/task:0 (")
    assert str(info.value).startswith("Task worker-0 of the local cluster failed (exit code 1): "
                                      "tf_backup.errors.StepTimeoutError: Worker 0")
    # The ps task had failed first, because of the chief.
    with open(os.path.join(log_dir, "ps-0.log")) as f:
        assert "ChiefUnavailableError: The chief /job:worker/task:0" in f.read()
    assert tasks_left(log_dir, 3) == []


@pytest.mark.cluster
def test_timeout_names_the_running_tasks_and_kills_them(tmp_path):
    log_dir = str(tmp_path / "logs")
    with pytest.raises(tf_backup.LocalClusterError, match=r"past its timeout of 3 s; still running: "
                                                          r"\['ps-0', 'worker-0'\]"):
        tf_backup.launch_local(programs.launch.sleep_forever, num_workers=1, timeout=3, log_dir=log_dir)
    assert tasks_left(log_dir, 2) == []


def test_bad_arguments_fail_before_any_process_starts():
    with pytest.raises(TypeError, match="picklable"):
        tf_backup.launch_local(lambda: 1, num_workers=1)
    with pytest.raises(ValueError, match="num_workers=0"):
        tf_backup.launch_local(programs.launch.sleep_forever, num_workers=0)
    with pytest.raises(TypeError, match="num_ps=1.0"):
        tf_backup.launch_local(programs.launch.sleep_forever, num_workers=1, num_ps=1.0)
    with pytest.raises(ValueError, match="timeout=0"):
        tf_backup.launch_local(programs.launch.sleep_forever, num_workers=1, timeout=0)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_workers=0), ValueError, "num_workers=0"),
    (dict(num_workers=True), TypeError, "num_workers=True"),
    (dict(num_ps=1.0), TypeError, "num_ps=1.0"),
    (dict(num_ps=0), ValueError, "num_ps=0"),
    (dict(args=3), TypeError, "`args` must be a tuple or a list. Received args=3"),
    (dict(kwargs=[1]), TypeError, "kwargs=\\[1\\]"),
    (dict(timeout=0), ValueError, "timeout=0"),
    (dict(timeout="60"), ValueError, "timeout='60'"),
    (dict(timeout=float("nan")), ValueError, "timeout=nan"),
    (dict(ps_exit_grace=-1), ValueError, "`ps_exit_grace` must be a finite number of seconds >= 0. "
                                         "Received ps_exit_grace=-1"),
    (dict(ps_exit_grace=float("inf")), ValueError, "ps_exit_grace=inf"),
    (dict(ps_exit_grace="10"), ValueError, "ps_exit_grace='10'"),
    (dict(max_failed_workers=2), ValueError, "max_failed_workers=2"),
    (dict(max_failed_workers=-1), ValueError, "max_failed_workers=-1"),
    (dict(max_failed_workers=1.0), TypeError, "max_failed_workers=1.0"),
    (dict(max_failed_workers=True), TypeError, "max_failed_workers=True"),
    (dict(max_restarts=-1), ValueError, "max_restarts=-1"),
    (dict(max_restarts="2"), TypeError, "max_restarts='2'"),
    (dict(restart_delay=-1), ValueError, "restart_delay=-1"),
    (dict(restart_delay=float("nan")), ValueError, "restart_delay=nan"),
    (dict(echo="worker-3"), ValueError, "echo='worker-3'"),
])
def test_launch_local_refuses_bad_arguments_before_any_process_starts(tmp_path, kwargs, error, message):
    log_dir = tmp_path / "logs"
    with pytest.raises(error, match=message):
        tf_backup.launch_local(programs.launch.sleep_forever, **dict(dict(num_workers=2, log_dir=str(log_dir)), **kwargs))
    assert not log_dir.exists()  # nothing started


def test_local_cluster_wait_refuses_bad_arguments_before_it_supervises(tmp_path):
    cluster = tf_backup.LocalCluster(programs.launch.sleep_forever, num_workers=2, num_ps=0, log_dir=str(tmp_path))
    for kwargs, message in [(dict(ps_exit_grace=float("nan")), "ps_exit_grace=nan"),
                            (dict(max_failed_workers=2), "max_failed_workers=2")]:
        with pytest.raises(ValueError, match=message):
            cluster.wait(**kwargs)  # never started: a wait that supervised would find no process


def test_max_failed_workers_lets_that_many_workers_fail_and_no_more(tmp_path):
    """3 workers: with max_failed_workers=1 the run goes on without worker 1; with 2 failing, it fails naming one.

    (With the default 0, one failed worker fails the run: test_failing_worker_raises_with_its_log_and_kills_the_rest.)
    """
    with tf_backup.LocalCluster(programs.launch.fail_on_workers, num_workers=3, num_ps=0, args=((1,),),
                                log_dir=str(tmp_path / "one")) as cluster:
        assert cluster.start().wait(timeout=120, max_failed_workers=1) == ["worker-0", None, "worker-2"]
        assert cluster.returncodes() == {"worker-0": 0, "worker-1": 1, "worker-2": 0}
    with tf_backup.LocalCluster(programs.launch.fail_on_workers, num_workers=3, num_ps=0, args=((1, 2),),
                                log_dir=str(tmp_path / "two")) as cluster:
        with pytest.raises(tf_backup.LocalClusterError) as failure:
            cluster.start().wait(timeout=120, max_failed_workers=1)
        assert failure.value.task in ("worker-1", "worker-2") and failure.value.exit_code == 1
        assert failure.value.error == f"builtins.RuntimeError: {failure.value.task} broke on purpose"
        assert f"Task {failure.value.task} of the local cluster failed (exit code 1)" in str(failure.value)


def test_a_task_process_cannot_launch_a_cluster(monkeypatch):
    monkeypatch.setenv("TF_BACKUP_TASK", "worker-0")
    with pytest.raises(RuntimeError, match="if __name__ == \"__main__\""):
        tf_backup.launch_local(programs.launch.sleep_forever, num_workers=1)
    assert os.environ["TF_BACKUP_TASK"] == "worker-0"


def test_echo_copies_complete_new_lines_without_tensorflow_chatter(tmp_path, capsys):
    log = tmp_path / "worker-0.log"
    log.write_text("I0000 00:00:1 cpu_feature_guard.cc:227] chatter\nepoch 1\npartial")
    echo = logs.Echo(str(log))
    echo.poll()
    assert capsys.readouterr().out == "epoch 1\n"
    with open(log, "a") as f:
        f.write(" line\nepoch 2\n")
    echo.poll()
    assert capsys.readouterr().out == "partial line\nepoch 2\n"
    echo.poll(final=True)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("user_level, level", [(None, "2"), ("0", "0")])
def test_tasks_default_tensorflows_log_level_unless_the_user_set_it(tmp_path, monkeypatch, user_level, level):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    if user_level is not None:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", user_level)
    with tf_backup.LocalCluster(programs.launch.environment_variable, num_workers=1, num_ps=0,
                                args=("TF_CPP_MIN_LOG_LEVEL",), log_dir=str(tmp_path)) as cluster:
        assert cluster.start().wait(timeout=60) == [level]


def test_echo_must_name_a_task():
    with pytest.raises(ValueError, match="echo='worker-3'"):
        tf_backup.launch_local(programs.launch.sleep_forever, num_workers=2, echo="worker-3")


def echo_task_name(suffix):
    import os  # pylint: disable=g-import-not-at-top
    return os.environ["TF_BACKUP_TASK"] + suffix


def test_a_cluster_without_serve_runs_fn_in_ps_tasks_and_waits_for_chosen_tasks(tmp_path):
    """What the benchmarks use for MultiWorkerMirroredStrategy and TF1 graph jobs."""
    cluster = tf_backup.LocalCluster(echo_task_name, num_workers=2, num_ps=1, args=("!",),
                                     log_dir=str(tmp_path), serve_ps=False)
    with cluster:
        cluster.start()
        assert cluster.wait_for(["worker-1", "ps-0"], timeout=120) == ["worker-1!", "ps-0!"]
    no_ps = tf_backup.LocalCluster(echo_task_name, num_workers=1, num_ps=0, args=("?",))
    with no_ps:
        assert no_ps.start().wait(timeout=120) == ["worker-0?"]
    with pytest.raises(ValueError, match="num_ps=-1"):
        tf_backup.LocalCluster(echo_task_name, num_workers=1, num_ps=-1)


def prefix_and_address():
    import json  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    config = json.loads(os.environ["TF_CONFIG"])
    task = config["task"]
    return os.environ["PLACED_BY"], config["cluster"][task["type"]][task["index"]].rsplit(":", 1)[0]


def test_hosts_and_command_prefix_place_each_task(tmp_path):
    """The hook `benchmarks.netem` uses: each task's address in TF_CONFIG, and a command run before it."""
    spec = local_cluster_spec(2, 2, hosts={"worker-1": "198.18.0.11", "ps-0": "198.18.0.20"})
    assert [a.rsplit(":", 1)[0] for a in spec["worker"] + spec["ps"]] == [
        "localhost", "198.18.0.11", "198.18.0.20", "localhost"]
    assert len({int(a.rsplit(":", 1)[1]) for a in spec["worker"] + spec["ps"]}) == 4
    # `env` execs the task's command, as `ip netns exec` does; the addresses are only written down here.
    cluster = tf_backup.LocalCluster(prefix_and_address, num_workers=2, num_ps=1, log_dir=str(tmp_path),
                                     serve_ps=False, hosts={"worker-1": "198.18.0.11", "ps-0": "198.18.0.20"},
                                     command_prefix=lambda name: ["env", f"PLACED_BY=prefix of {name}"])
    with cluster:
        cluster.start()
        assert cluster.wait_for(["worker-0", "worker-1", "ps-0"], timeout=120) == [
            ("prefix of worker-0", "localhost"), ("prefix of worker-1", "198.18.0.11"),
            ("prefix of ps-0", "198.18.0.20")]


def test_the_supervisor_restarts_a_failing_task_up_to_max_restarts(tmp_path):
    """`max_restarts`: each task that exits non-zero starts again with the same TF_CONFIG, a bounded number of times."""
    cluster = tf_backup.LocalCluster(programs.launch.fail_until_started, num_workers=2, num_ps=0,
                                     args=(2, str(tmp_path)), log_dir=str(tmp_path / "logs"))
    with cluster:
        assert cluster.start().wait(timeout=120, max_restarts=2, restart_delay=0.5) == [
            ("worker-0", 3), ("worker-1", 3)]
        assert cluster.restarts() == {"worker-0": 2, "worker-1": 2}
    for task in ("worker-0", "worker-1"):  # backed off: 0.5 s before the first restart, 1 s before the second
        times = [float(t) for t in (tmp_path / f"{task}.starts.times").read_text().split()]
        assert len(times) == 3 and times[1] - times[0] >= 0.5 and times[2] - times[1] >= 1.0, times
    # One restart fewer than needed: the run fails, naming the task, once its restarts are spent.
    cluster = tf_backup.LocalCluster(programs.launch.fail_until_started, num_workers=1, num_ps=0,
                                     args=(2, str(tmp_path / "again")), log_dir=str(tmp_path / "logs2"))
    os.makedirs(tmp_path / "again")
    with cluster:
        with pytest.raises(tf_backup.LocalClusterError) as failure:
            cluster.start().wait(timeout=120, max_restarts=1)
        assert (failure.value.task, failure.value.exit_code, cluster.restarts()) == ("worker-0", 1, {"worker-0": 1})
    with pytest.raises(ValueError, match="max_restarts=-1"):
        tf_backup.launch_local(programs.launch.sleep_forever, num_workers=1, max_restarts=-1)
    with pytest.raises(ValueError, match="restart_delay=-1"):
        tf_backup.launch_local(programs.launch.sleep_forever, num_workers=1, max_restarts=1, restart_delay=-1)


def test_the_supervisor_backs_off_doubling_up_to_its_longest_delay():
    assert [supervisor.restart_delay(k, first=1.0) for k in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert supervisor.restart_delay(3, first=0.0) == 0.0


def test_the_supervisor_restarts_nothing_once_the_chief_has_returned(tmp_path):
    """A task that fails after the chief returned has no job to rejoin: the run fails, naming it."""
    cluster = tf_backup.LocalCluster(programs.launch.fail_after_the_chief_returned, num_workers=2, num_ps=0,
                                     args=(3.0,), log_dir=str(tmp_path / "logs"))
    with cluster:
        with pytest.raises(tf_backup.LocalClusterError) as failure:
            cluster.start().wait(timeout=120, max_restarts=3, restart_delay=0)
        assert cluster.returncodes()["worker-0"] == 0
        assert (failure.value.task, failure.value.exit_code, cluster.restarts()) == (
            "worker-1", 1, {"worker-0": 0, "worker-1": 0})


# The supervisor's transitions, without processes: exit codes made up, the clock passed in.
RUNNING = {"ps-0": None, "worker-0": None, "worker-1": None}
NO_RESTARTS = {"ps-0": 0, "worker-0": 0, "worker-1": 0}


def look(state, policy, now, restarts=None, **codes):
    """One `advance` with RUNNING's tasks, `codes` (worker_1=1: "worker-1" exited 1) changed."""
    seen = dict(RUNNING, **{name.replace("_", "-"): code for name, code in codes.items()})
    return supervisor.advance(state, policy, seen, restarts or NO_RESTARTS, now)


def test_the_supervision_waits_for_the_workers_then_the_ps_tasks():
    policy = supervisor.Policy(timeout=100, ps_exit_grace=10)
    state = supervisor.Supervision.start(policy, now=0.0)
    state, actions = look(state, policy, 1.0, worker_0=0)
    assert (state.phase, actions) == (supervisor.Phase.WORKERS, [])
    state, actions = look(state, policy, 2.0, worker_0=0, worker_1=0)
    assert (state.phase, state.workers_done_at, actions) == (supervisor.Phase.PS_EXIT, 2.0, [])
    state, actions = look(state, policy, 5.0, worker_0=0, worker_1=0)
    assert (state.phase, state.workers_done_at) == (supervisor.Phase.PS_EXIT, 2.0)
    state, actions = look(state, policy, 6.0, ps_0=0, worker_0=0, worker_1=0)
    assert (state.phase, state.lost, state.failure, actions) == (supervisor.Phase.DONE, frozenset(), None, [])
    with pytest.raises(ValueError, match="The run is over"):
        look(state, policy, 7.0)


def test_the_supervision_fails_when_the_ps_tasks_outstay_their_grace_or_the_timeout_passes():
    policy = supervisor.Policy(timeout=100, ps_exit_grace=10)
    state, _ = look(supervisor.Supervision.start(policy, 0.0), policy, 2.0, worker_0=0, worker_1=0)
    same, _ = look(state, policy, 12.0, worker_0=0, worker_1=0)
    assert same.phase is supervisor.Phase.PS_EXIT
    lingered, _ = look(state, policy, 12.5, worker_0=0, worker_1=0)
    assert (lingered.phase, lingered.failure) == (supervisor.Phase.FAILED, supervisor.PsLingered(("ps-0",)))
    running, _ = look(supervisor.Supervision.start(policy, 0.0), policy, 100.0, worker_1=0)
    assert running.phase is supervisor.Phase.WORKERS
    late, _ = look(running, policy, 100.5, worker_1=0)
    assert late.failure == supervisor.TimedOut(("ps-0", "worker-0"))


def test_the_supervision_loses_workers_up_to_max_failed_workers_but_never_the_chief():
    policy = supervisor.Policy(timeout=100, max_failed_workers=1)
    start = supervisor.Supervision.start(policy, 0.0)
    state, actions = look(start, policy, 1.0, worker_1=3)
    assert (state.phase, state.lost, actions) == (
        supervisor.Phase.WORKERS, frozenset({"worker-1"}), [supervisor.LoseWorker("worker-1", 3, 1)])
    state, actions = look(state, policy, 2.0, worker_0=0, worker_1=3)
    assert (state.phase, actions) == (supervisor.Phase.PS_EXIT, [])
    chief, actions = look(start, policy, 1.0, worker_0=1)
    assert (chief.phase, chief.failure, actions) == (supervisor.Phase.FAILED, supervisor.TaskFailed("worker-0"), [])
    # Workers first: a ps task that exits with the chief's failure does not hide it.
    both, _ = look(start, policy, 1.0, ps_0=1, worker_0=1)
    assert both.failure == supervisor.TaskFailed("worker-0")


def test_the_supervision_restarts_a_task_after_its_back_off_until_its_restarts_are_spent():
    policy = supervisor.Policy(timeout=100, max_restarts=2, restart_delay=0.5)
    state, actions = look(supervisor.Supervision.start(policy, 0.0), policy, 1.0, worker_1=1)
    assert (dict(state.restart_due), actions) == (
        {"worker-1": 1.5}, [supervisor.ScheduleRestart("worker-1", 1, 0.5, 1)])
    state, actions = look(state, policy, 1.4, worker_1=1)
    assert (dict(state.restart_due), actions) == ({"worker-1": 1.5}, [])
    state, actions = look(state, policy, 1.5, worker_1=1)
    assert (dict(state.restart_due), actions) == ({}, [supervisor.Restart("worker-1")])
    restarted = state
    once = dict(NO_RESTARTS, **{"worker-1": 1})
    state, actions = look(restarted, policy, 3.0, restarts=once, worker_1=1)
    assert actions == [supervisor.ScheduleRestart("worker-1", 1, 1.0, 2)]
    spent, actions = look(restarted, policy, 3.0, restarts=dict(once, **{"worker-1": 2}), worker_1=1)
    assert (spent.failure, actions) == (supervisor.TaskFailed("worker-1"), [])
    # A task restarted in the look that times out counts as running.
    timed_out, actions = look(state, policy, 101.0, restarts=once, worker_1=1)
    assert (actions, timed_out.failure) == (
        [supervisor.Restart("worker-1")], supervisor.TimedOut(("ps-0", "worker-0", "worker-1")))


def test_the_supervision_restarts_nothing_once_the_chief_has_returned():
    policy = supervisor.Policy(timeout=100, max_restarts=3, restart_delay=0)
    state, actions = look(supervisor.Supervision.start(policy, 0.0), policy, 1.0, worker_1=1)
    assert actions == [supervisor.ScheduleRestart("worker-1", 1, 0.0, 1)]
    state, actions = look(state, policy, 1.0, worker_0=0, worker_1=1)
    assert (state.phase, state.failure, dict(state.restart_due), actions) == (
        supervisor.Phase.FAILED, supervisor.TaskFailed("worker-1"), {}, [])
