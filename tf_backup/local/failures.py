"""How a local cluster's run fails: `LocalClusterError`, and which task it names.

A failed job ends every task, so the first task seen failing is not always the cause: a ps
task that the chief's abort ended can exit before the chief. Each failed task writes its error
beside its result (`tf_backup.local._task.error_record`); `blame` reads it to name the cause.
"""

import json
import time
from typing import Mapping, Optional, Sequence

from tf_backup.local.logs import tail
from tf_backup.local.spec import CHIEF

# Seconds a task that the chief ended (it aborted the job) waits for the chief's own failure to be
# reported instead: the chief saves a checkpoint and leaves the job before it exits.
CHIEF_EXIT_GRACE = 30.0


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


def read_error_record(path: str) -> dict:
    """The error a failed task wrote (`tf_backup.local._task.error_record`); {} if it wrote none."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def blame(name: str, procs: Mapping, error_paths: Mapping[str, str], grace: float = CHIEF_EXIT_GRACE) -> str:
    """The task whose failure to report for task `name`'s: `name`, or the chief.

    The chief, if `name` failed because the chief aborted the job or went
    silent (`ChiefUnavailableError`) and the chief fails too, within `grace`
    seconds: a failed job ends every task, and a ps task can exit before the
    chief whose error ended it.
    """
    chief = procs.get(CHIEF)
    if name == CHIEF or chief is None or not read_error_record(error_paths[name]).get("chief_unavailable"):
        return name
    deadline = time.monotonic() + grace
    while chief.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return CHIEF if chief.poll() not in (None, 0) else name


def task_failed(name: str, procs: Mapping, logs: Mapping[str, str],
                error_paths: Mapping[str, str]) -> LocalClusterError:
    """The error for a failed task (the chief instead, if it caused the failure: `blame`)."""
    name = blame(name, procs, error_paths)
    code = procs[name].returncode
    record = read_error_record(error_paths[name])
    error = f"{record['type']}: {record['message']}" if record else None
    first_line = (error or "").split("\n", 1)[0]
    return LocalClusterError(
        f"Task {name} of the local cluster failed (exit code {code})" + (f": {first_line}" if first_line else "")
        + f". Last lines of {logs[name]}:\n{tail(logs[name])}", name, code, error)


def timed_out(timeout: float, running: Sequence[str], logs: Mapping[str, str]) -> LocalClusterError:
    """The error for a run past its timeout: the tasks still running, each with its log tail."""
    tails = "\n".join(f"--- {n} ---\n{tail(logs[n], 15)}" for n in running)
    return LocalClusterError(
        f"The local cluster ran past its timeout of {timeout:.0f} s; still running: "
        f"{list(running)}.\n{tails}"
    )


def tasks_timed_out(timeout: float, running: Sequence[str], logs: Mapping[str, str]) -> LocalClusterError:
    """The error for tasks waited for (`LocalCluster.wait_for`) that ran past the timeout."""
    return LocalClusterError(
        f"Tasks {list(running)} of the local cluster ran past the timeout of {timeout:.0f} s. "
        f"Last lines of {logs[running[0]]}:\n{tail(logs[running[0]])}")


def ps_lingered(ps_exit_grace: float, still: Sequence[str], logs: Mapping[str, str]) -> LocalClusterError:
    """The error for ps tasks still running `ps_exit_grace` s after the workers finished."""
    return LocalClusterError(
        f"The workers finished but ps tasks {list(still)} did not exit within "
        f"{ps_exit_grace:.0f} s. Last lines of {logs[still[0]]}:\n{tail(logs[still[0]])}"
    )
