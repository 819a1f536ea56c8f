"""`launch_local`: run a function in every worker of a real TensorFlow cluster on this machine.

A `LocalCluster` (`tf_backup.local.cluster`) started, waited for and torn down in one call.
"""

import shutil
from typing import Any, Callable, List, Mapping, Optional, Sequence

from tf_backup.local.cluster import LocalCluster
from tf_backup.local.cluster import check_arguments
from tf_backup.local.cluster import check_wait_arguments
from tf_backup.local.spec import task_names


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
        of its later ones (at most `supervisor.RESTART_DELAY_MAX`); 0: at once.
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
    check_arguments(fn, num_workers, num_ps, args, {} if kwargs is None else kwargs)
    check_wait_arguments(num_workers, timeout, ps_exit_grace, max_failed_workers, max_restarts, restart_delay)
    names = task_names(num_workers, num_ps)
    if echo is not None and echo not in names:
        raise ValueError(f"`echo` must name a task of the cluster ({', '.join(names)}). Received echo={echo!r}")
    with LocalCluster(fn, num_workers, num_ps, args, kwargs, log_dir, env, hosts=hosts,
                      command_prefix=command_prefix) as cluster:
        cluster.start()
        out = cluster.wait(timeout, ps_exit_grace, echo, max_failed_workers, max_restarts, restart_delay)
    if log_dir is None:
        shutil.rmtree(cluster.log_dir, ignore_errors=True)
    return out
