"""`launch_local`: a real TensorFlow cluster of processes on this machine.

Every task is a fresh Python process (`python -m tf_backup.local._task`) with its own
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
from typing import Any, Callable, List, Mapping, Optional, Sequence

from tf_backup import _checks
from tf_backup import memory


class LocalClusterError(RuntimeError):
    """A task of a local cluster failed, or the cluster ran past its timeout.

    When a failed job ends several tasks, the task named is the one whose
    failure ended the others: the chief, when the ps tasks and the other
    workers exited because it aborted the job (`ChiefUnavailableError`).

    Attributes:
      task: the task that failed ("worker-0", "ps-0", ...); None when the
        timeout passed.
      exit_code: its exit code (negative: killed by that signal); None when
        the timeout passed.
      error: the error it raised, as "module.Type: message"
        ("tf_backup.errors.WorkersLostError: ..."); None if it raised none
        (killed, or the timeout passed).
    """

    def __init__(self, message: str, task: Optional[str] = None, exit_code: Optional[int] = None,
                 error: Optional[str] = None):
        super().__init__(message)
        self.task, self.exit_code, self.error = task, exit_code, error


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


RESTART_DELAY_MAX = 30.0
CHIEF = "worker-0"
# Seconds a task that the chief ended (it aborted the job) waits for the chief's own failure to be
# reported instead: the chief saves a checkpoint and leaves the job before it exits.
CHIEF_EXIT_GRACE = 30.0


def restart_delay(restarts_done: int, first: float, longest: float = RESTART_DELAY_MAX) -> float:
    """Seconds before a task's next restart: `first`, doubled for each earlier restart, at most `longest`.

    As a cluster manager backs off (Kubernetes: 10 s, doubled, at most 5 min), so
    that a task that fails at start does not spend its restarts in seconds.
    """
    return min(first * 2.0 ** restarts_done, longest)


def local_cluster_spec(num_workers: int, num_ps: int = 1, hosts: Optional[Mapping[str, str]] = None) -> dict:
    """A cluster dict of `num_workers` workers and `num_ps` ps tasks on free localhost ports.

    `hosts` maps a task name ("ps-0", "worker-1") to the address it listens on instead of
    localhost (a task in its own network namespace, say); the port is the same free one.
    """
    hosts = hosts or {}
    ports = free_ports(num_workers + num_ps)
    spec = {"worker": [f"{hosts.get(f'worker-{i}', 'localhost')}:{p}" for i, p in enumerate(ports[:num_workers])]}
    if num_ps:
        spec["ps"] = [f"{hosts.get(f'ps-{i}', 'localhost')}:{p}" for i, p in enumerate(ports[num_workers:])]
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


def _error_record(path: str) -> dict:
    """The error a failed task wrote (`tf_backup.local._task.error_record`); {} if it wrote none."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _blame(name: str, procs: dict, error_paths: dict, grace: float = CHIEF_EXIT_GRACE) -> str:
    """The task whose failure to report for task `name`'s: `name`, or the chief.

    The chief, if `name` failed because the chief aborted the job or went
    silent (`ChiefUnavailableError`) and the chief fails too, within `grace`
    seconds: a failed job ends every task, and a ps task can exit before the
    chief whose error ended it.
    """
    chief = procs.get(CHIEF)
    if name == CHIEF or chief is None or not _error_record(error_paths[name]).get("chief_unavailable"):
        return name
    deadline = time.monotonic() + grace
    while chief.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return CHIEF if chief.poll() not in (None, 0) else name


def _task_failed(name: str, procs: dict, logs: dict, error_paths: dict) -> LocalClusterError:
    """The error for a failed task (the chief instead, if it caused the failure: `_blame`)."""
    name = _blame(name, procs, error_paths)
    code = procs[name].returncode
    record = _error_record(error_paths[name])
    error = f"{record['type']}: {record['message']}" if record else None
    first_line = (error or "").split("\n", 1)[0]
    return LocalClusterError(
        f"Task {name} of the local cluster failed (exit code {code})" + (f": {first_line}" if first_line else "")
        + f". Last lines of {logs[name]}:\n{_tail(logs[name])}", name, code, error)


class _Echo:
    """Copies the complete new lines of a task's log to this process's stdout."""

    def __init__(self, path: Optional[str], offset: int = 0):
        self._path = path
        self._offset = offset  # where this cluster's lines start (a log is appended to, run after run)
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


def _check_arguments(fn, num_workers, num_ps, args, kwargs, min_ps: int = 1) -> None:
    if os.environ.get("TF_BACKUP_TASK"):
        raise RuntimeError(
            "launch_local() was called inside a task process of a local cluster: the task "
            "re-imported your main module. Guard your script's entry point with "
            "`if __name__ == \"__main__\":` (as with multiprocessing)."
        )
    if not callable(fn):
        raise TypeError(f"`fn` must be callable. Received fn={fn!r}")
    _checks.check_int("num_workers", num_workers, 1)
    _checks.check_int("num_ps", num_ps, min_ps)
    try:
        pickle.dumps((fn, tuple(args), kwargs))
    except Exception as e:
        raise TypeError(
            "`fn`, `args` and `kwargs` must be picklable (fn a module-level function): each "
            f"worker is a separate process. Pickling failed with: {e}"
        ) from e


class LocalCluster:
    """The task processes of one localhost cluster, which a test may kill and restart.

    ```python
    with LocalCluster(train, num_workers=3, args=(100,), log_dir=d) as cluster:
        cluster.start()
        cluster.kill("worker-2")               # SIGKILL, as a crashed host
        cluster.restart("worker-2")            # the same TF_CONFIG, log appended
        codes = cluster.wait_exit(timeout=120)  # {"ps-0": 0, "worker-0": 0, ...}
    ```

    Task names are `ps-<i>` and `worker-<i>`; worker 0 is the chief. Leaving
    the `with` block kills whatever still runs. `launch_local` is built on it.

    Args:
      fn, args, kwargs: what every worker task runs.
      num_workers, num_ps: the tasks (`num_ps` may be 0 for programs of other
        strategies, e.g. `MultiWorkerMirroredStrategy`).
      log_dir: each task's log, payload and result (default: a temp dir).
      env: extra environment variables for every task. Every task also
        starts with `tf_backup.memory.malloc_env()` (glibc settings that keep
        freed memory; `TF_BACKUP_TUNE_MALLOC=0`: not).
      serve_ps: ps tasks run `tf_backup.serve()`; False: they run `fn` too
        (a TF1 graph job's ps, say).
      serve_kwargs: keyword arguments of the ps tasks' `tf_backup.serve()`
        (`ps_restart_timeout`, say).
      hosts: task name -> the address it listens on and is reached at
        (default localhost); see `local_cluster_spec`.
      command_prefix: task name -> argv put before the task's command (e.g.
        `["ip", "netns", "exec", "<ns>"]`: the task runs in that network
        namespace; `benchmarks.netem`). It must exec the command, so that
        the process started is the task's.
    """

    def __init__(self, fn: Callable, num_workers: int, num_ps: int = 1, args: Sequence = (),
                 kwargs: Optional[dict] = None, log_dir: Optional[str] = None,
                 env: Optional[dict] = None, serve_ps: bool = True, serve_kwargs: Optional[dict] = None,
                 hosts: Optional[Mapping[str, str]] = None,
                 command_prefix: Optional[Callable[[str], Sequence[str]]] = None):
        kwargs = dict(kwargs or {})
        self._serve_kwargs = dict(serve_kwargs or {})
        _check_arguments(fn, num_workers, num_ps, args, kwargs, min_ps=0)
        self._serve_ps = bool(serve_ps)
        self.num_workers, self.num_ps = num_workers, num_ps
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="tf_backup_local_")
        os.makedirs(self.log_dir, exist_ok=True)
        self.spec = local_cluster_spec(num_workers, num_ps, hosts)
        self._command_prefix = command_prefix
        self.names = [f"ps-{i}" for i in range(num_ps)] + [f"worker-{i}" for i in range(num_workers)]
        self.procs: dict = {}
        self.logs = {n: os.path.join(self.log_dir, f"{n}.log") for n in self.names}
        self.results = {n: os.path.join(self.log_dir, f"{n}.result") for n in self.names}
        self.error_paths = {n: p + ".error" for n, p in self.results.items()}  # what a failed task raised
        self.starts = {n: 0 for n in self.names}
        self._restart_due: dict = {}  # task -> when the supervisor restarts it (time.monotonic())
        # The logs' sizes before this cluster: a log of the same directory's earlier run is kept
        # (appended to), and the echo shows this run's lines only.
        self._log_starts = {n: os.path.getsize(p) if os.path.exists(p) else 0 for n, p in self.logs.items()}
        self._fn, self._args, self._kwargs, self._env = fn, tuple(args), kwargs, dict(env or {})
        prep = multiprocessing.spawn.get_preparation_data("tf_backup-task")
        prep.pop("authkey", None)  # not picklable, and no multiprocessing connection is used
        self._prep = prep

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_name(self, name: str) -> None:
        if name not in self.names:
            raise ValueError(f"`name` must be a task of the cluster ({', '.join(self.names)}). "
                             f"Received name={name!r}")

    def start(self, names: Optional[Sequence[str]] = None) -> "LocalCluster":
        """Starts the named tasks (default: every task, ps tasks first)."""
        for name in names or self.names:
            self._check_name(name)
            self._spawn(name)
        return self

    def _spawn(self, name: str) -> None:
        task_type, index = name.rsplit("-", 1)
        if os.path.exists(self.error_paths[name]):
            os.remove(self.error_paths[name])  # an earlier process's
        payload = os.path.join(self.log_dir, f"{name}.payload")
        with open(payload, "wb") as f:
            role = "serve" if task_type == "ps" and self._serve_ps else "fn"
            fn_kwargs = self._serve_kwargs if role == "serve" else self._kwargs
            rest = pickle.dumps((role, self._fn, self._args, fn_kwargs, self.results[name]))
            pickle.dump((self._prep, rest), f)
        child_env = dict(os.environ)
        child_env.update(memory.malloc_env())  # every task, whatever it runs: the same allocator settings
        child_env.update(self._env)
        child_env["TF_CONFIG"] = json.dumps(
            {"cluster": self.spec, "task": {"type": task_type, "index": int(index)}})
        child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env["TF_BACKUP_TASK"] = name
        with open(self.logs[name], "ab") as log:
            if self.starts[name]:
                log.write(f"\n---- {name} restarted ----\n".encode())
            prefix = list(self._command_prefix(name)) if self._command_prefix else []
            self.procs[name] = subprocess.Popen(
                prefix + [sys.executable, "-m", "tf_backup.local._task", payload],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=child_env, start_new_session=True,
            )
        self.starts[name] += 1

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` (default SIGKILL) to the task's process group and reaps it."""
        self._check_name(name)
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait(10)

    def restart(self, name: str) -> None:
        """Kills the task if it runs, then starts it again with the same `TF_CONFIG`."""
        self.kill(name)
        self._spawn(name)

    def restarts(self) -> dict:
        """How many times each task was started again (by `restart` or the supervisor)."""
        return {n: max(0, c - 1) for n, c in self.starts.items()}

    def _restart_failed(self, name: str, max_restarts: int, first_delay: float) -> bool:
        """The supervisor's decision for a task that exited non-zero, asked every loop while it is down.

        True: it is restarted, now or once its back-off delay has passed (asked
        again meanwhile, it stays True). False: it is not (its restarts are
        spent, or the chief has returned: a task failing now has nothing to rejoin).
        """
        chief = self.procs.get("worker-0")
        if chief is not None and chief.poll() == 0:
            self._restart_due.pop(name, None)
            return False
        due = self._restart_due.get(name)
        if due is None:
            done = self.starts[name] - 1
            if done >= max_restarts:
                return False
            delay = restart_delay(done, first_delay)
            self._restart_due[name] = time.monotonic() + delay
            sys.stderr.write(f"tf_backup: task {name} exited with code {self.procs[name].returncode}; "
                             f"restarting it in {delay:.1f} s (restart {done + 1} of at most {max_restarts}). "
                             f"Its log: {self.logs[name]}\n")
        elif time.monotonic() >= due:
            del self._restart_due[name]
            self._spawn(name)
        return True

    def returncodes(self) -> dict:
        """Each task's exit code; None while it runs or before it started."""
        return {n: (self.procs[n].poll() if n in self.procs else None) for n in self.names}

    def wait_exit(self, timeout: float) -> dict:
        """Waits until every started task has exited, at most `timeout` s; returns `returncodes()`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in self.procs.values()):
                break
            time.sleep(0.1)
        return self.returncodes()

    def wait_for(self, names: Sequence[str], timeout: float) -> List[Any]:
        """Waits until the named tasks have returned; returns their results, in order.

        Raises:
          LocalClusterError: any task failed, or the timeout passed (with a log tail).
        """
        _checks.check_seconds("timeout", timeout)
        for name in names:
            self._check_name(name)
        deadline = time.monotonic() + timeout
        while not all(self.procs[n].poll() == 0 for n in names):
            for name, proc in self.procs.items():
                if proc.poll() not in (None, 0):
                    raise _task_failed(name, self.procs, self.logs, self.error_paths)
            if time.monotonic() > deadline:
                running = [n for n in names if self.procs[n].poll() is None]
                raise LocalClusterError(
                    f"Tasks {running} of the local cluster ran past the timeout of {timeout:.0f} s. "
                    f"Last lines of {self.logs[running[0]]}:\n{_tail(self.logs[running[0]])}")
            time.sleep(0.1)
        return [self.result(n) for n in names]

    def result(self, name: str) -> Any:
        """What the task's function returned (raises FileNotFoundError if it did not return)."""
        with open(self.results[name], "rb") as f:
            return pickle.load(f)

    def log(self, name: str) -> str:
        with open(self.logs[name], errors="replace") as f:
            return f.read()

    def wait(self, timeout: float = 600.0, ps_exit_grace: float = 60.0, echo: Optional[str] = None,
             max_failed_workers: int = 0, max_restarts: int = 0, restart_delay: float = 1.0) -> List[Any]:
        """Waits for every worker to return, then for the ps tasks to exit.

        Args:
          timeout: seconds for the whole run.
          ps_exit_grace: seconds the ps tasks get to exit after the last worker.
          echo: a task whose output is copied to stdout as it comes.
          max_failed_workers: how many workers other than the chief may fail
            (e.g. b, the backup workers) without failing the run.
          max_restarts: a supervisor, as a cluster manager with
            `restartPolicy: OnFailure` is: a task that exits non-zero is
            started again with the same `TF_CONFIG`, up to this many times per
            task, until the chief has returned. 0: no task is restarted.
          restart_delay: seconds before a task's first restart, doubled for
            each of its later ones (at most `RESTART_DELAY_MAX`); 0: at once.

        Returns:
          The value each worker's function returned, in worker order (None
          for a worker whose failure was tolerated). A restarted task's value
          is its last process's.

        Raises:
          LocalClusterError: a task failed (past its restarts), or the timeout
            passed (with the failing task's log tail).
        """
        _checks.check_seconds("timeout", timeout)
        _checks.check_int("max_restarts", max_restarts, 0)
        _checks.check_seconds("restart_delay", restart_delay, allow_zero=True)
        if echo is not None:
            self._check_name(echo)
        echoed = _Echo(self.logs[echo], self._log_starts[echo]) if echo is not None else _Echo(None)
        restart = (lambda name: self._restart_failed(name, max_restarts, restart_delay)) if max_restarts else None
        failed = _supervise(self.procs, self.logs, self.error_paths, timeout, ps_exit_grace, echoed, max_failed_workers,
                            restart)
        return [None if f"worker-{i}" in failed else self.result(f"worker-{i}")
                for i in range(self.num_workers)]

    def close(self) -> None:
        """Kills every task still running."""
        _kill_all(self.procs)


def launch_local(fn: Callable, num_workers: int, num_ps: int = 1, args: Sequence = (),
                 kwargs: Optional[dict] = None, timeout: float = 600.0,
                 log_dir: Optional[str] = None, env: Optional[dict] = None,
                 ps_exit_grace: float = 60.0, echo: Optional[str] = None,
                 max_failed_workers: int = 0, max_restarts: int = 0, restart_delay: float = 1.0,
                 hosts: Optional[Mapping[str, str]] = None,
                 command_prefix: Optional[Callable[[str], Sequence[str]]] = None) -> List[Any]:
    """Runs `fn(*args, **kwargs)` in every worker process of a localhost cluster.

    Starts `num_ps` ps tasks (each runs `tf_backup.serve()`) and
    `num_workers` worker tasks, each a fresh process with `TF_CONFIG` naming
    the cluster and its task; worker 0 is the chief. Waits for every worker to
    return, then for the ps tasks to exit by themselves, and tears down
    whatever is left. (`LocalCluster` gives a test control over each task.)

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
      max_failed_workers: how many workers other than the chief may fail
        without failing the run (b: training goes on without them).
      max_restarts: restart each task that exits non-zero up to this many
        times, as a cluster manager would (`LocalCluster.wait`); with a
        `checkpoint_dir`, a restarted chief resumes from its checkpoint.
      restart_delay: seconds before a task's first restart, doubled for each
        of its later ones (at most `RESTART_DELAY_MAX`); 0: at once.
      hosts, command_prefix: where each task listens and what starts it
        (`LocalCluster`); default localhost, started directly.

    Returns:
      The value `fn` returned in each worker, in worker order (None for a
      worker whose failure was tolerated).

    Raises:
      TypeError, ValueError: bad arguments (before any process starts).
      LocalClusterError: a task failed or the timeout passed; the message
        holds the failing task's log tail. No process is left running.
    """
    _check_arguments(fn, num_workers, num_ps, args, dict(kwargs or {}))
    _checks.check_seconds("timeout", timeout)
    _checks.check_int("max_restarts", max_restarts, 0)
    _checks.check_seconds("restart_delay", restart_delay, allow_zero=True)
    if isinstance(max_failed_workers, bool) or not isinstance(max_failed_workers, int) or not (
            0 <= max_failed_workers < num_workers):
        raise ValueError("`max_failed_workers` must be an integer in [0, num_workers). Received "
                         f"max_failed_workers={max_failed_workers!r}")
    names = [f"ps-{i}" for i in range(num_ps)] + [f"worker-{i}" for i in range(num_workers)]
    if echo is not None and echo not in names:
        raise ValueError(f"`echo` must name a task of the cluster ({', '.join(names)}). Received echo={echo!r}")
    with LocalCluster(fn, num_workers, num_ps, args, kwargs, log_dir, env, hosts=hosts,
                      command_prefix=command_prefix) as cluster:
        cluster.start()
        out = cluster.wait(timeout, ps_exit_grace, echo, max_failed_workers, max_restarts, restart_delay)
    if log_dir is None:
        shutil.rmtree(cluster.log_dir, ignore_errors=True)
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


def _supervise(procs: dict, logs: dict, error_paths: dict, timeout: float, ps_exit_grace: float, echo: _Echo,
               max_failed_workers: int = 0, restart: Optional[Callable[[str], bool]] = None) -> set:
    """Waits for the workers, then the ps tasks; raises on the first failure not tolerated."""
    try:
        return _wait_for_tasks(procs, logs, error_paths, timeout, ps_exit_grace, echo, max_failed_workers, restart)
    finally:
        echo.poll(final=True)


def _wait_for_tasks(procs: dict, logs: dict, error_paths: dict, timeout: float, ps_exit_grace: float, echo: _Echo,
                    max_failed_workers: int, restart: Optional[Callable[[str], bool]]) -> set:
    """Returns the workers whose failure was tolerated.

    A task that exits non-zero is first offered to `restart` (which replaces its entry of `procs`
    and returns True, or declines); then it is tolerated (up to `max_failed_workers` workers other
    than the chief) or fails the run, naming the chief instead if the chief's failure ended it
    (`_blame`; `error_paths`: each task's error record).
    """
    deadline = time.monotonic() + timeout
    workers = [n for n in procs if n.startswith("worker")]
    ps = [n for n in procs if n.startswith("ps")]
    workers_done_at = None
    failed = set()
    while True:
        echo.poll()
        # Workers first: when the chief fails, its ps tasks fail after it (they end with the job).
        # One that exits before the chief is blamed on the chief all the same (`_blame`).
        for name in workers + ps:
            proc = procs[name]
            if proc.poll() in (None, 0) or name in failed:
                continue
            if restart is not None and restart(name):
                continue
            if name in workers and name != "worker-0" and len(failed) < max_failed_workers:
                failed.add(name)
                sys.stderr.write(
                    f"tf_backup: task {name} failed (exit code {proc.returncode}); training goes on "
                    f"without it ({len(failed)} of at most {max_failed_workers} workers lost). Its "
                    f"log: {logs[name]}\n")
                continue
            raise _task_failed(name, procs, logs, error_paths)
        if all(procs[n].poll() == 0 or n in failed for n in workers):
            if workers_done_at is None:
                workers_done_at = time.monotonic()
            if all(procs[n].poll() == 0 for n in ps):
                return failed
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
