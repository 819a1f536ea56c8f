"""`Preloader`: a local cluster's tasks forked from a process that has imported TensorFlow.

Importing TensorFlow, Keras and tf_backup costs about 6 s of CPU a process on this
project's 2-core machines (loading TensorFlow's shared libraries, mostly), more than
a short local run's training. Every task of a local cluster imports the same, so
`LocalCluster` forks its tasks, restarted ones too, from a preloading process
(`tf_backup.local._preloaded`) that imported them once. A forked task runs
`tf_backup.local._task.main` as a started one does: its own session, its own
`TF_CONFIG`, its own log. Nothing of TensorFlow's runtime is inherited: the
preloading process never runs an op.

One preloading process serves every cluster this process starts in turn (`shared`),
as multiprocessing's forkserver serves a process: a test suite or a benchmark that
starts a hundred clusters imports TensorFlow for them once. It lives until this
process exits (its stdin closes; it then kills every task it forked that still runs).
A cluster whose environment differs from it while it still has tasks running
gets a preloading process of its own, ended with the cluster.

A task's parent is the preloading process, so `ForkedTask` is the cluster's
handle on it (what `subprocess.Popen` is for a started task): its exit code
comes back through the preloading process's pipe.

Linux only (fork after importing TensorFlow is not safe on macOS). Off with
`TF_BACKUP_PRELOAD=0` or `LocalCluster(preload=False)`.
"""

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, Mapping, Optional

# Variables a process may read as it starts or imports TensorFlow (glibc's malloc, the dynamic
# loader, Python, TensorFlow's and XLA's flags and logging, Keras's backend, thread pools): a task
# whose value of one differs from the preloading process's cannot be forked from it. Any other
# variable is set in the forked task, before its function runs. TensorFlow's variables are read
# early but for TF_CONFIG and ours, which are read when a job starts.
_READ_AT_START = ("MALLOC_", "LD_", "PYTHON", "TF_", "XLA_", "KERAS_", "CUDA_", "OMP_", "KMP_", "GLIBC_", "TPU_")
_READ_LATE = ("TF_CONFIG", "TF_BACKUP_")


def read_at_start(name: str) -> bool:
    """Whether environment variable `name` may be read before a forked task's own code runs."""
    return name.startswith(_READ_AT_START) and not name.startswith(_READ_LATE)

# Seconds the preloading process gets for its imports (about 6 here; a loaded machine is slower).
IMPORT_TIMEOUT = 300.0
# Seconds a fork request waits for its answer.
FORK_TIMEOUT = 60.0


def enabled() -> bool:
    """Whether local clusters fork their tasks from a preloading process (Linux, unless `TF_BACKUP_PRELOAD=0`)."""
    return sys.platform.startswith("linux") and os.environ.get("TF_BACKUP_PRELOAD", "1") != "0"


class PreloadError(RuntimeError):
    """The preloading process failed to start, or stopped answering (its log says why)."""


class ForkedTask:
    """A task forked by a `Preloader`: `subprocess.Popen`'s interface that `LocalCluster` uses."""

    def __init__(self, preloader: "Preloader", pid: int):
        self._preloader = preloader
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        """Its exit code, None while it runs.

        Raises:
          PreloadError: the preloading process died (killed) before this task,
            which has now exited too: its exit code was never reported.
        """
        if self.returncode is None:
            self._preloader.pump()  # sets `returncode` when its exit is read
            if self.returncode is None and self._preloader.exited() and not _exists(self.pid):
                raise self._preloader.lost(self.pid)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"task pid {self.pid}", timeout)
            self._preloader.pump(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it has just exited: its code is on its way
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process now has the pid: ours is gone
        return False
    return True


class Reports:
    """What a preloading process has said, read in order (pure: no I/O).

    `ready` once its imports are done; `started[number]`: the task forked for
    request `number`, until `spawn` hands it out; `running`: the tasks not seen
    to exit, by pid. An exit goes to the task of that pid at that moment: pids
    come back once a process is reaped (the kernel's pid_max is 32768 here, and
    TensorFlow's threads take pids too), and the preloading process reports an
    exit before a fork can reuse its pid.
    """

    def __init__(self, owner):
        self._owner = owner  # what the tasks pump for their exits
        self.ready = False
        self.started: Dict[int, ForkedTask] = {}
        self.running: Dict[int, ForkedTask] = {}

    def read(self, message: dict) -> None:
        if "ready" in message:
            self.ready = True
        elif "started" in message:
            task = ForkedTask(self._owner, message["pid"])
            self.running[task.pid] = task
            self.started[message["started"]] = task
        elif "exited" in message:
            task = self.running.pop(message["exited"], None)
            if task is not None:
                task.returncode = message["code"]


class Preloader:
    """One preloading process, started with environment `env`.

    Args:
      env: its environment; a forked task's is set whole before its function runs.
      log_dir: where its own log goes (`preload.log`); also in its command line.
    """

    def __init__(self, env: Mapping[str, str], log_dir: Optional[str] = None):
        self.env = dict(env)
        self.cwd = os.getcwd()  # where it resolved the modules it imported
        log_dir = log_dir or tempfile.mkdtemp(prefix="tf_backup_preload_")
        self.log_path = os.path.join(log_dir, "preload.log")
        self._reports = Reports(self)
        self._pending = b""
        self._requests = 0
        self._lock = threading.RLock()  # clusters of several threads may share it
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tf_backup.local._preloaded", log_dir],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env, start_new_session=True)
        os.set_blocking(self._proc.stdout.fileno(), False)

    def exited(self) -> bool:
        """Whether the preloading process has ended (killed, say): it reports no exit any more."""
        return self._proc.poll() is not None

    def lost(self, pid: int) -> PreloadError:
        return self._error(f"ended (exit code {self._proc.returncode}) before task pid {pid}, whose exit code "
                           "is therefore unknown")

    def serves(self, env: Mapping[str, str]) -> bool:
        """Whether a task of environment `env` can be forked from this one (`read_at_start`; the same cwd)."""
        differ = {k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k)}
        return (self._proc.poll() is None and os.getcwd() == self.cwd
                and not any(read_at_start(k) for k in differ))

    def running(self) -> int:
        """How many tasks it forked have not been seen to exit."""
        with self._lock:
            self.pump()
            return len(self._reports.running)

    def spawn(self, task: str, payload: str, log: str, env: Mapping[str, str]) -> ForkedTask:
        """Forks task `task` (`tf_backup.local._task` on `payload`, output appended to `log`)."""
        with self._lock:
            self._await(lambda: self._reports.ready, IMPORT_TIMEOUT, "to import TensorFlow")
            self._requests += 1
            number = self._requests
            request = {"number": number, "payload": payload, "log": log, "env": dict(env)}
            try:
                self._proc.stdin.write((json.dumps(request) + "\n").encode())
                self._proc.stdin.flush()
            except BrokenPipeError as e:
                raise self._error("stopped before it could fork a task") from e
            self._await(lambda: number in self._reports.started, FORK_TIMEOUT, f"to fork task {task}")
            return self._reports.started.pop(number)

    def pump(self, timeout: float = 0.0) -> None:
        """Reads what the preloading process has said (waiting up to `timeout` s for something)."""
        with self._lock:
            self._pump(timeout)

    def _pump(self, timeout: float) -> None:
        if self._proc.stdout.closed:  # closed: every task it forked was killed and reaped before
            return
        if timeout > 0:
            select.select([self._proc.stdout], [], [], timeout)
        while True:
            try:
                data = self._proc.stdout.read()
            except BlockingIOError:  # nothing more for now
                data = None
            if not data:
                break
            self._pending += data
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            self._reports.read(json.loads(line))

    def _await(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            if done():
                return
            if self._proc.poll() is not None:
                self.pump()
                if done():
                    return
                raise self._error(f"exited with code {self._proc.returncode} while waiting {what}")
            if time.monotonic() > deadline:
                raise self._error(f"did not answer in {timeout:.0f} s while waiting {what}")
            self.pump(0.05)

    def _error(self, what: str) -> PreloadError:
        with open(self.log_path, errors="replace") as f:
            log = f.read()[-3000:]
        return PreloadError(f"The preloading process of the local cluster (pid {self._proc.pid}) {what}. "
                            f"Its log, {self.log_path}:\n{log}")

    def close(self) -> None:
        """Ends the preloading process, which kills every task it forked that still runs."""
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc.stdout.close()


class Shared:
    """The preloading process this process's clusters share, and the ones a cluster owns alone.

    `for_env` gives the shared one when it serves the task's environment; else a
    new shared one, if the old one has no task running; else one of the
    cluster's own, which `release` ends with the cluster.
    """

    def __init__(self):
        self._shared: Optional[Preloader] = None
        self._lock = threading.Lock()

    def for_env(self, env: Mapping[str, str], log_dir: str) -> Preloader:
        with self._lock:
            if self._shared is not None and self._shared.serves(env):
                return self._shared
            if self._shared is None or self._shared.exited() or self._shared.running() == 0:
                if self._shared is not None:
                    self._shared.close()
                self._shared = Preloader(env)
                return self._shared
        return Preloader(env, log_dir)

    def release(self, preloader: Preloader) -> None:
        """A cluster is done with `preloader`: ends it unless it is the shared one."""
        if preloader is not self._shared:
            preloader.close()


# This process's preloading processes (as multiprocessing keeps one forkserver a process): a
# cluster's preloading process outlives the cluster, to serve the next one.
shared = Shared()
