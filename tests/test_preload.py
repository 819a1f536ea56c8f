"""A local cluster's tasks forked from one preloading process (`tf_backup.local.preload`), or started afresh."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import tf_backup
from tf_backup.local import preload
import programs.launch
from test_faults import readline
from test_launch import alive
from test_launch import proc_stat
from test_launch import tasks_left

TESTS = os.path.dirname(os.path.abspath(__file__))


def pid_file(log_dir, task: str) -> int:
    with open(os.path.join(log_dir, f"{task}.pid")) as f:
        return int(f.read())


@pytest.mark.cluster
def test_a_clusters_tasks_are_forked_from_one_preloading_process(tmp_path):
    """Each task: its own pid, session, environment; one parent for all, not this process, and the next cluster's."""
    names = ["ps-0", "worker-0", "worker-1"]
    log_dir = str(tmp_path)
    with tf_backup.LocalCluster(programs.launch.process_identity, num_workers=2, num_ps=1, serve_ps=False,
                                log_dir=log_dir, env={"TFB_TEST_MARKER": "m"}) as cluster:
        got = cluster.start().wait_for(names, timeout=120)
        pids = [cluster.procs[n].pid for n in names]
    assert [g["pid"] for g in got] == pids == [pid_file(log_dir, n) for n in names]
    parents = {g["ppid"] for g in got}
    assert len(parents) == 1 and os.getpid() not in parents
    assert [g["pgid"] for g in got] == pids  # each its own process group: a kill of one kills no other
    assert [g["task"] for g in got] == names
    assert [g["tf_config_task"] for g in got] == [{"type": "ps", "index": 0}, {"type": "worker", "index": 0},
                                                  {"type": "worker", "index": 1}]
    assert [g["marker"] for g in got] == ["m"] * 3
    assert [g["log_dir"] for g in got] == [log_dir] * 3
    assert tasks_left(log_dir, 3) == []
    # The next cluster's task comes from the same preloading process, with its own environment, whole.
    with tf_backup.LocalCluster(programs.launch.process_identity, num_workers=1, num_ps=0,
                                log_dir=str(tmp_path / "next")) as cluster:
        [again] = cluster.start().wait_for(["worker-0"], timeout=120)
    assert again["ppid"] in parents and again["marker"] is None and again["task"] == "worker-0"


@pytest.mark.cluster
def test_without_preload_a_task_is_started_afresh_by_this_process(tmp_path):
    with tf_backup.LocalCluster(programs.launch.process_identity, num_workers=1, num_ps=0, log_dir=str(tmp_path),
                                preload=False) as cluster:
        [got] = cluster.start().wait_for(["worker-0"], timeout=120)
    assert got["ppid"] == os.getpid() and got["pid"] == pid_file(tmp_path, "worker-0")
    assert isinstance(cluster.procs["worker-0"], subprocess.Popen)


@pytest.mark.cluster
def test_exit_codes_come_back_through_the_preloading_process(tmp_path):
    """0 for a return, 1 for a raise, -9 and -15 for the signals; a restart forks a new process."""
    with tf_backup.LocalCluster(programs.launch.return_fail_or_sleep, num_workers=3, num_ps=0,
                                log_dir=str(tmp_path)) as cluster:
        cluster.start()
        codes = cluster.wait_exit(timeout=60)
        assert (codes["worker-0"], codes["worker-1"], codes["worker-2"]) == (0, 1, None)
        first = cluster.procs["worker-2"].pid
        cluster.kill("worker-2")
        assert cluster.returncodes()["worker-2"] == -signal.SIGKILL
        cluster.restart("worker-2")
        second = cluster.procs["worker-2"].pid
        assert second != first and pid_file(tmp_path, "worker-2") == second
        cluster.kill("worker-2", signal.SIGTERM)
        assert cluster.procs["worker-2"].wait(30) == -signal.SIGTERM
        assert cluster.restarts() == {"worker-0": 0, "worker-1": 0, "worker-2": 1}
    with open(tmp_path / "worker-1.log") as f:
        assert "RuntimeError: worker 1 broke on purpose" in f.read()


LAUNCHER = """
import sys, time
import tf_backup
from tf_backup.local import preload
import programs.launch
cluster = tf_backup.LocalCluster(programs.launch.sleep_forever, num_workers=2, num_ps=0, log_dir=sys.argv[1])
cluster.start()
print(json.dumps([cluster.procs[n].pid for n in cluster.names]), flush=True)
time.sleep(600)
""".replace("import sys, time", "import json, sys, time")


@pytest.mark.cluster
def test_a_killed_launcher_leaves_no_task_behind(tmp_path):
    """kill -9 of the process that started a cluster: the preloading process sees its pipe close and kills the tasks."""
    log_dir = str(tmp_path / "logs")
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, log_dir], cwd=TESTS, stdout=subprocess.PIPE,
                                env=dict(os.environ, PYTHONPATH=TESTS, TF_CPP_MIN_LOG_LEVEL="3"))
    try:
        pids = json.loads(readline(launcher.stdout, 180))  # the tasks run
        preloader = int(proc_stat(pids[0])[1])  # the task's parent
        assert sorted(tasks_left(log_dir, 2)) == sorted(pids) and alive(preloader)
        launcher.kill()
        launcher.wait(10)
        deadline = time.monotonic() + 30
        while (tasks_left(log_dir, 2) or alive(preloader)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tasks_left(log_dir, 2) == [] and not alive(preloader)
    finally:
        launcher.kill()


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.05)


@pytest.mark.cluster
def test_a_task_whose_preloading_process_died_says_its_exit_code_is_lost(tmp_path):
    """kill -9 of the preloading process: its task runs on (orphaned); once it is gone too, polling it
    raises PreloadError instead of reporting "still running" for ever; the next cluster gets a new one."""
    with tf_backup.LocalCluster(programs.launch.sleep_forever, num_workers=1, num_ps=0,
                                log_dir=str(tmp_path / "a")) as cluster:
        task = cluster.start().procs["worker-0"]
        preloader = int(proc_stat(task.pid)[1])
        os.kill(preloader, signal.SIGKILL)
        wait_until(lambda: not alive(preloader), 10, "the preloading process's end")
        assert task.poll() is None  # orphaned, still running
        os.kill(task.pid, signal.SIGKILL)
        wait_until(lambda: proc_stat(task.pid) is None, 10, "the orphaned task's reaping")
        with pytest.raises(preload.PreloadError, match=f"before task pid {task.pid}, whose exit code is"):
            task.poll()
    with tf_backup.LocalCluster(programs.launch.process_identity, num_workers=1, num_ps=0,
                                log_dir=str(tmp_path / "b")) as cluster:
        [got] = cluster.start().wait_for(["worker-0"], timeout=120)
    assert got["ppid"] != preloader and got["ppid"] != os.getpid()


def test_preload_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="`preload` must be a bool or None. Received preload='yes'"):
        tf_backup.LocalCluster(programs.launch.sleep_forever, num_workers=1, log_dir=str(tmp_path), preload="yes")


class NoPump:
    """A preloading process whose reports the test feeds by hand."""

    def pump(self, timeout: float = 0.0) -> None:
        pass

    def exited(self) -> bool:
        return False


def test_an_exit_goes_to_the_task_of_that_pid_at_that_moment():
    """A pid comes back once reaped: the exit of its earlier process is not its new task's."""
    reports = preload.Reports(NoPump())
    reports.read({"ready": 1})
    reports.read({"started": 1, "pid": 100})
    first = reports.started.pop(1)
    reports.read({"exited": 100, "code": 1})
    reports.read({"started": 2, "pid": 100})  # the same pid, forked again
    second = reports.started.pop(2)
    assert reports.ready and (first.pid, second.pid) == (100, 100)
    assert first.poll() == 1 and second.poll() is None and list(reports.running) == [100]
    reports.read({"exited": 100, "code": -9})
    assert (first.poll(), second.poll()) == (1, -9) and reports.running == {}
    reports.read({"exited": 101, "code": 0})  # a pid it does not know: nobody's
    assert (first.poll(), second.poll()) == (1, -9)


def test_only_variables_read_at_a_process_start_keep_a_task_from_a_preloading_process():
    assert all(preload.read_at_start(v) for v in ("MALLOC_ARENA_MAX", "TF_CPP_MIN_LOG_LEVEL", "PYTHONPATH",
                                                   "LD_PRELOAD", "XLA_FLAGS", "KERAS_BACKEND", "OMP_NUM_THREADS"))
    assert not any(preload.read_at_start(v) for v in ("TF_CONFIG", "TF_BACKUP_TASK", "TF_BACKUP_LOG_DIR",
                                                       "PYTEST_CURRENT_TEST", "HOME"))
