"""`launch_local`: a real TensorFlow cluster of processes on this machine.

Every task is a fresh Python process (`python -m tf_backup._task`) with its own
`TF_CONFIG`, listening on a free localhost port, its output going to its own
log file: the same code that runs on real hosts runs here unchanged.
"""

import json
import multiprocessing.spawn
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, List, Optional, Sequence


class LocalClusterError(RuntimeError):
    """A task of a local cluster failed, or the cluster ran past its timeout."""


def free_ports(count: int) -> List[int]:
    """`count` distinct ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_cluster_spec(num_workers: int, num_ps: int = 1) -> dict:
    """A cluster dict of `num_workers` workers and `num_ps` ps tasks on free localhost ports."""
    ports = free_ports(num_workers + num_ps)
    spec = {"worker": [f"localhost:{p}" for p in ports[:num_workers]]}
    if num_ps:
        spec["ps"] = [f"localhost:{p}" for p in ports[num_workers:]]
    return spec


_NOISE = ("I0000 ", "W0000 ", "WARNING: All log messages", "cuda", "oneDNN", "cpu_feature_guard",
          "rebuild TensorFlow", "computation_placer", "E0000 00:00")


def _is_noise(line: str) -> bool:
    """TensorFlow's start-up chatter, left out of log tails and echoes."""
    return any(n in line for n in _NOISE)


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.readlines()
    except OSError:
        return "(no log)"
    kept = [line for line in text if not _is_noise(line)]
    return "".join(kept[-lines:]).rstrip() or "(empty log)"


class _Echo:
    """Copies the complete new lines of a task's log to this process's stdout."""

    def __init__(self, path: Optional[str]):
        self._path = path
        self._offset = 0
        self._partial = ""

    def poll(self, final: bool = False) -> None:
        if self._path is None:
            return
        try:
            with open(self._path, errors="replace") as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except OSError:
            return
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = "" if final else lines.pop()
        out = [line for line in lines if line and not _is_noise(line)]
        if out:
            sys.stdout.write("\n".join(out) + "\n")
            sys.stdout.flush()


def launch_local(fn: Callable, num_workers: int, num_ps: int = 1, args: Sequence = (),
                 kwargs: Optional[dict] = None, timeout: float = 600.0,
                 log_dir: Optional[str] = None, env: Optional[dict] = None,
                 ps_exit_grace: float = 60.0, echo: Optional[str] = None) -> List[Any]:
    """Runs `fn(*args, **kwargs)` in every worker process of a localhost cluster.

    Starts `num_ps` ps tasks (each runs `tf_backup.serve()`) and
    `num_workers` worker tasks, each a fresh process with `TF_CONFIG` naming
    the cluster and its task; worker 0 is the chief. Waits for every worker to
    return, then for the ps tasks to exit by themselves, and tears down
    whatever is left.

    Args:
      fn: a module-level function (it is pickled into the processes). It
        usually builds a `BackupWorkerStrategy()` and trains.
      num_workers: worker processes, N + b.
      num_ps: ps processes.
      args, kwargs: passed to `fn` in every worker.
      timeout: seconds for the whole run.
      log_dir: where each task's log goes (`worker-0.log`, `ps-0.log`, ...);
        default a temporary directory, removed after a successful run.
      env: extra environment variables for every task.
      ps_exit_grace: seconds the ps tasks get to exit after the last worker.
      echo: a task name (e.g. "worker-0") whose output is copied to this
        process's stdout as it comes, without TensorFlow's start-up chatter.

    Returns:
      The value `fn` returned in each worker, in worker order.

    Raises:
      TypeError, ValueError: bad arguments (before any process starts).
      LocalClusterError: a task failed or the timeout passed; the message
        holds the failing task's log tail. No process is left running.
    """
    if os.environ.get("TF_BACKUP_TASK"):
        raise RuntimeError(
            "launch_local() was called inside a task process of a local cluster: the task "
            "re-imported your main module. Guard your script's entry point with "
            "`if __name__ == \"__main__\":` (as with multiprocessing)."
        )
    if not callable(fn):
        raise TypeError(f"`fn` must be callable. Received fn={fn!r}")
    for name, value, minimum in (("num_workers", num_workers, 1), ("num_ps", num_ps, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an integer. Received {name}={value!r}")
        if value < minimum:
            raise ValueError(f"`{name}` must be >= {minimum}. Received {name}={value!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"`timeout` must be a positive number of seconds. Received timeout={timeout!r}")
    names = [f"ps-{i}" for i in range(num_ps)] + [f"worker-{i}" for i in range(num_workers)]
    if echo is not None and echo not in names:
        raise ValueError(f"`echo` must name a task of the cluster ({', '.join(names)}). Received echo={echo!r}")
    kwargs = dict(kwargs or {})
    try:
        pickle.dumps((fn, tuple(args), kwargs))
    except Exception as e:
        raise TypeError(
            "`fn`, `args` and `kwargs` must be picklable (fn a module-level function): each "
            f"worker is a separate process. Pickling failed with: {e}"
        ) from e

    keep_logs = log_dir is not None
    log_dir = log_dir or tempfile.mkdtemp(prefix="tf_backup_local_")
    os.makedirs(log_dir, exist_ok=True)
    spec = local_cluster_spec(num_workers, num_ps)
    tasks = [("ps", i) for i in range(num_ps)] + [("worker", i) for i in range(num_workers)]
    prep = multiprocessing.spawn.get_preparation_data("tf_backup-task")
    prep.pop("authkey", None)  # not picklable, and no multiprocessing connection is used
    procs, logs, results = {}, {}, {}
    try:
        for task_type, index in tasks:
            name = f"{task_type}-{index}"
            logs[name] = os.path.join(log_dir, f"{name}.log")
            results[name] = os.path.join(log_dir, f"{name}.result")
            payload = os.path.join(log_dir, f"{name}.payload")
            with open(payload, "wb") as f:
                rest = pickle.dumps((task_type, fn, tuple(args), kwargs, results[name]))
                pickle.dump((prep, rest), f)
            child_env = dict(os.environ)
            child_env.update(env or {})
            child_env["TF_CONFIG"] = json.dumps(
                {"cluster": spec, "task": {"type": task_type, "index": index}})
            child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            child_env["PYTHONUNBUFFERED"] = "1"
            child_env["TF_BACKUP_TASK"] = name
            with open(logs[name], "ab") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "tf_backup._task", payload],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=child_env, start_new_session=True,
                )
        _supervise(procs, logs, timeout, ps_exit_grace, _Echo(logs.get(echo)))
        out = []
        for index in range(num_workers):
            with open(results[f"worker-{index}"], "rb") as f:
                out.append(pickle.load(f))
    finally:
        _kill_all(procs)
    if not keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    return out


def _kill_all(procs: dict) -> None:
    """Kills every task still running (its whole process group) and reaps it."""
    for proc in procs.values():
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
    for proc in procs.values():
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _supervise(procs: dict, logs: dict, timeout: float, ps_exit_grace: float, echo: _Echo) -> None:
    """Waits for the workers, then the ps tasks; raises on the first failure."""
    try:
        _wait_for_tasks(procs, logs, timeout, ps_exit_grace, echo)
    finally:
        echo.poll(final=True)


def _wait_for_tasks(procs: dict, logs: dict, timeout: float, ps_exit_grace: float, echo: _Echo) -> None:
    deadline = time.monotonic() + timeout
    workers = [n for n in procs if n.startswith("worker")]
    ps = [n for n in procs if n.startswith("ps")]
    workers_done_at = None
    while True:
        echo.poll()
        for name, proc in procs.items():
            if proc.poll() not in (None, 0):
                raise LocalClusterError(
                    f"Task {name} of the local cluster failed (exit code {proc.returncode}). "
                    f"Last lines of {logs[name]}:\n{_tail(logs[name])}"
                )
        if all(procs[n].poll() == 0 for n in workers):
            if workers_done_at is None:
                workers_done_at = time.monotonic()
            if all(procs[n].poll() == 0 for n in ps):
                return
            if time.monotonic() - workers_done_at > ps_exit_grace:
                still = [n for n in ps if procs[n].poll() is None]
                raise LocalClusterError(
                    f"The workers finished but ps tasks {still} did not exit within "
                    f"{ps_exit_grace:.0f} s. Last lines of {logs[still[0]]}:\n{_tail(logs[still[0]])}"
                )
        if time.monotonic() > deadline:
            running = [n for n, p in procs.items() if p.poll() is None]
            tails = "\n".join(f"--- {n} ---\n{_tail(logs[n], 15)}" for n in running)
            raise LocalClusterError(
                f"The local cluster ran past its timeout of {timeout:.0f} s; still running: "
                f"{running}.\n{tails}"
            )
        time.sleep(0.1)
