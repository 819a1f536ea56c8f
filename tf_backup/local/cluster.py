"""`LocalCluster`: the task processes of one localhost cluster, started, watched, restarted.

Every task is a Python process of its own running `tf_backup.local._task`, with its own
`TF_CONFIG`, listening on a free localhost port, its output going to its own
log file: the same code that runs on real hosts runs here unchanged. The tasks are
forked from a process that imported TensorFlow once (`tf_backup.local.preload`),
or started afresh (`python -m tf_backup.local._task`) where that cannot be: in a
network namespace of `command_prefix`, or with `preload=False`. Each task's pid is
written beside its log (`<task>.pid`); each task's `TF_BACKUP_LOG_DIR` names that directory.
`wait` runs the supervisor (`tf_backup.local.supervisor`) and carries out what it decides.
"""

import json
import multiprocessing.spawn
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, FrozenSet, List, Mapping, Optional, Sequence

from tf_backup import _checks
from tf_backup import memory
from tf_backup.local import failures
from tf_backup.local import preload as preload_lib
from tf_backup.local import supervisor
from tf_backup.local.logs import Echo
from tf_backup.local.spec import local_cluster_spec
from tf_backup.local.spec import task_names


def check_arguments(fn, num_workers, num_ps, args, kwargs, min_ps: int = 1) -> None:
    """Checks `launch_local`'s and `LocalCluster`'s common arguments, before any process starts."""
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
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(f"`args` must be a tuple or a list. Received args={args!r}")
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"`kwargs` must be a dict or None. Received kwargs={kwargs!r}")
    try:
        pickle.dumps((fn, tuple(args), kwargs))
    except Exception as e:
        raise TypeError(
            "`fn`, `args` and `kwargs` must be picklable (fn a module-level function): each "
            f"worker is a separate process. Pickling failed with: {e}"
        ) from e


def check_wait_arguments(num_workers: int, timeout, ps_exit_grace, max_failed_workers, max_restarts,
                         restart_delay) -> None:
    """Checks `LocalCluster.wait`'s arguments (`launch_local`'s too, before any process starts).

    Raises:
      TypeError: `max_failed_workers` or `max_restarts` is not an integer (bools are not).
      ValueError: a number of seconds that is not finite and positive (`ps_exit_grace`,
        `restart_delay`: >= 0), or `max_failed_workers` outside [0, num_workers).
    """
    _checks.check_seconds("timeout", timeout)
    _checks.check_seconds("ps_exit_grace", ps_exit_grace, allow_zero=True)
    kind = f"an integer in [0, num_workers) = [0, {num_workers})"
    if _checks.check_int("max_failed_workers", max_failed_workers, 0, kind=kind) >= num_workers:
        raise ValueError(f"`max_failed_workers` must be {kind}: the chief may not fail. "
                         f"Received max_failed_workers={max_failed_workers!r}")
    _checks.check_int("max_restarts", max_restarts, 0)
    _checks.check_seconds("restart_delay", restart_delay, allow_zero=True)


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
        the process started is the task's. Such tasks are started afresh,
        not forked from the preloading process.
      preload: fork the tasks from one process that imported TensorFlow
        once (`tf_backup.local.preload`; default: on Linux, unless
        `TF_BACKUP_PRELOAD=0`); False: start each task afresh.
    """

    def __init__(self, fn: Callable, num_workers: int, num_ps: int = 1, args: Sequence = (),
                 kwargs: Optional[dict] = None, log_dir: Optional[str] = None,
                 env: Optional[dict] = None, serve_ps: bool = True, serve_kwargs: Optional[dict] = None,
                 hosts: Optional[Mapping[str, str]] = None,
                 command_prefix: Optional[Callable[[str], Sequence[str]]] = None, preload: Optional[bool] = None):
        check_arguments(fn, num_workers, num_ps, args, {} if kwargs is None else kwargs, min_ps=0)
        kwargs = dict(kwargs or {})
        self._serve_kwargs = dict(serve_kwargs or {})
        self._serve_ps = bool(serve_ps)
        self.num_workers, self.num_ps = num_workers, num_ps
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="tf_backup_local_")
        os.makedirs(self.log_dir, exist_ok=True)
        self.spec = local_cluster_spec(num_workers, num_ps, hosts)
        self._command_prefix = command_prefix
        if preload is not None and not isinstance(preload, bool):
            raise TypeError(f"`preload` must be a bool or None. Received preload={preload!r}")
        self._preload = (preload_lib.enabled() if preload is None else preload) and command_prefix is None
        self._preloader: Optional[preload_lib.Preloader] = None
        self.names = task_names(num_workers, num_ps)
        self.procs: dict = {}
        self.logs = {n: os.path.join(self.log_dir, f"{n}.log") for n in self.names}
        self.results = {n: os.path.join(self.log_dir, f"{n}.result") for n in self.names}
        self.error_paths = {n: p + ".error" for n, p in self.results.items()}  # what a failed task raised
        self.starts = {n: 0 for n in self.names}
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
        child_env["TF_BACKUP_LOG_DIR"] = self.log_dir  # its pid files find the cluster's processes
        with open(self.logs[name], "ab") as log:
            if self.starts[name]:
                log.write(f"\n---- {name} restarted ----\n".encode())
            preloader = self._preloader_for(child_env)
            if preloader is not None:
                self.procs[name] = preloader.spawn(name, payload, self.logs[name], child_env)
            else:
                prefix = list(self._command_prefix(name)) if self._command_prefix else []
                self.procs[name] = subprocess.Popen(
                    prefix + [sys.executable, "-m", "tf_backup.local._task", payload],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=child_env, start_new_session=True,
                )
        pid_path = os.path.join(self.log_dir, f"{name}.pid")
        with open(pid_path + ".tmp", "w") as f:
            f.write(f"{self.procs[name].pid}\n")
        os.replace(pid_path + ".tmp", pid_path)  # whole, for a task that reads its peers' (benchmarks)
        self.starts[name] += 1

    def _preloader_for(self, child_env: Mapping[str, str]) -> Optional[preload_lib.Preloader]:
        """The preloading process to fork a task of `child_env` from (chosen at the first task); None: start it afresh.

        A task whose environment differs from the preloading process's in a
        variable read at a process's start (glibc's, TensorFlow's:
        `preload.read_at_start`) is started afresh.
        """
        if not self._preload:
            return None
        if self._preloader is None:
            self._preloader = preload_lib.shared.for_env(child_env, self.log_dir)
        return self._preloader if self._preloader.serves(child_env) else None

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
                    raise failures.task_failed(name, self.procs, self.logs, self.error_paths)
            if time.monotonic() > deadline:
                running = [n for n in names if self.procs[n].poll() is None]
                raise failures.tasks_timed_out(timeout, running, self.logs)
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
            each of its later ones (at most `supervisor.RESTART_DELAY_MAX`); 0: at once.

        Returns:
          The value each worker's function returned, in worker order (None
          for a worker whose failure was tolerated). A restarted task's value
          is its last process's.

        Raises:
          LocalClusterError: a task failed (past its restarts), or the timeout
            passed (with the failing task's log tail).
        """
        check_wait_arguments(self.num_workers, timeout, ps_exit_grace, max_failed_workers, max_restarts,
                             restart_delay)
        if echo is not None:
            self._check_name(echo)
        echoed = Echo(self.logs[echo], self._log_starts[echo]) if echo is not None else Echo(None)
        policy = supervisor.Policy(timeout=timeout, ps_exit_grace=ps_exit_grace, max_failed_workers=max_failed_workers,
                                   max_restarts=max_restarts, restart_delay=restart_delay)
        lost = self._supervise(policy, echoed)
        return [None if f"worker-{i}" in lost else self.result(f"worker-{i}")
                for i in range(self.num_workers)]

    def _supervise(self, policy: supervisor.Policy, echo: Echo) -> FrozenSet[str]:
        """Looks at the tasks every 0.1 s and does what the supervisor decides; returns the workers lost."""
        state = supervisor.Supervision.start(policy, time.monotonic())
        try:
            while True:
                echo.poll()
                codes = {n: p.poll() for n, p in self.procs.items()}
                state, actions = supervisor.advance(state, policy, codes, self.restarts(), time.monotonic())
                for action in actions:
                    self._carry_out(action, policy)
                if state.phase is supervisor.Phase.DONE:
                    return state.lost
                if state.phase is supervisor.Phase.FAILED:
                    raise self._error(state.failure, policy)
                time.sleep(0.1)
        finally:
            echo.poll(final=True)

    def _carry_out(self, action: supervisor.Action, policy: supervisor.Policy) -> None:
        if isinstance(action, supervisor.Restart):
            self._spawn(action.task)
        elif isinstance(action, supervisor.ScheduleRestart):
            sys.stderr.write(f"tf_backup: task {action.task} exited with code {action.exit_code}; restarting it in "
                             f"{action.delay:.1f} s (restart {action.number} of at most {policy.max_restarts}). "
                             f"Its log: {self.logs[action.task]}\n")
        else:
            sys.stderr.write(
                f"tf_backup: task {action.task} failed (exit code {action.exit_code}); training goes on "
                f"without it ({action.lost} of at most {policy.max_failed_workers} workers lost). Its "
                f"log: {self.logs[action.task]}\n")

    def _error(self, failure: supervisor.Failure, policy: supervisor.Policy) -> failures.LocalClusterError:
        if isinstance(failure, supervisor.TaskFailed):
            return failures.task_failed(failure.task, self.procs, self.logs, self.error_paths)
        if isinstance(failure, supervisor.PsLingered):
            return failures.ps_lingered(policy.ps_exit_grace, failure.tasks, self.logs)
        return failures.timed_out(policy.timeout, failure.running, self.logs)

    def close(self) -> None:
        """Kills every task still running (and its preloading process, unless shared)."""
        _kill_all(self.procs)
        if self._preloader is not None:
            preload_lib.shared.release(self._preloader)  # ends it unless other clusters share it


def _kill_all(procs: dict) -> None:
    """Kills every task still running (its whole process group) and reaps it.

    A task whose preloading process died is gone or orphaned: killed if it runs, its lost exit
    code not raised here (`PreloadError` is for the cluster's waits).
    """
    for proc in procs.values():
        try:
            running = proc.poll() is None
        except preload_lib.PreloadError:
            running = False
        if running:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
    for proc in procs.values():
        try:
            proc.wait(10)
        except (subprocess.TimeoutExpired, preload_lib.PreloadError):
            pass
