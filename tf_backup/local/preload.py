"""`Preloader`: a local cluster's tasks forked from one process that has imported TensorFlow.

Importing TensorFlow, Keras and tf_backup costs about 6 s of CPU a process on this
project's 2-core machines (loading TensorFlow's shared libraries, mostly), more than
a short local run's training. Every task of a local cluster imports the same, so
`LocalCluster` starts one preloading process (`tf_backup.local._preloaded`) that
imports them once and forks each task, restarted ones too, from it. A forked task
runs `tf_backup.local._task.main` as a started one does: its own session, its own
`TF_CONFIG`, its own log. Nothing of TensorFlow's runtime is inherited: the
preloading process never runs an op.

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
import time
from typing import Dict, Mapping, Optional

# Variables that differ between the tasks of one cluster: set in each forked task. Every other
# variable is the preloading process's own, read at its start (by glibc, TensorFlow's C++ logging).
TASK_VARIABLES = ("TF_CONFIG", "TF_BACKUP_TASK")

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
        if self.returncode is None:
            self._preloader.pump()
            self.returncode = self._preloader.exit_codes.get(self.pid)
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


class Preloader:
    """One preloading process, started for `env` (every variable but `TASK_VARIABLES`).

    Args:
      log_dir: where its own log goes (`preload.log`); also in its command line.
      env: its environment, which every task it forks inherits.
    """

    def __init__(self, log_dir: str, env: Mapping[str, str]):
        self.env = dict(env)
        self.log_path = os.path.join(log_dir, "preload.log")
        self.exit_codes: Dict[int, int] = {}
        self._pending = b""
        self._started: Dict[str, int] = {}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tf_backup.local._preloaded", log_dir],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env, start_new_session=True)
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._ready = False

    def serves(self, env: Mapping[str, str]) -> bool:
        """Whether a task of environment `env` (its task variables aside) can be forked from this one."""
        return self._proc.poll() is None and self.env == {k: v for k, v in env.items() if k not in TASK_VARIABLES}

    def spawn(self, task: str, payload: str, log: str, env: Mapping[str, str]) -> ForkedTask:
        """Forks task `task` (`tf_backup.local._task` on `payload`, output appended to `log`)."""
        self._await(lambda: self._ready, IMPORT_TIMEOUT, "to import TensorFlow")
        request = {"task": task, "payload": payload, "log": log,
                   "env": {k: env[k] for k in TASK_VARIABLES if k in env}}
        self._started.pop(task, None)
        try:
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError as e:
            raise self._error("stopped before it could fork a task") from e
        self._await(lambda: task in self._started, FORK_TIMEOUT, f"to fork task {task}")
        return ForkedTask(self, self._started.pop(task))

    def pump(self, timeout: float = 0.0) -> None:
        """Reads what the preloading process has said (waiting up to `timeout` s for something)."""
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
            message = json.loads(line)
            if "ready" in message:
                self._ready = True
            elif "started" in message:
                self._started[message["started"]] = message["pid"]
            elif "exited" in message:
                self.exit_codes[message["exited"]] = message["code"]

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
