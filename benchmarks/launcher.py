"""A plain multi-process localhost cluster for programs that are not tf_backup's.

`tf_backup.launch_local` adds a ps job whose tasks run `tf_backup.serve()` and
exit when a tf_backup chief ends the job, so it cannot run a
`MultiWorkerMirroredStrategy` program or a TF1 graph job. `launch(fn, cluster)`
starts one process per task (`python -m benchmarks._task PAYLOAD`) with its own
`TF_CONFIG`, runs `fn(*args)` in the tasks named in `run_in` (the others, e.g.
TF1 ps tasks, run `fn` too and are killed once the tasks of `run_in` are done),
and returns their results in task order. A failure raises `ClusterError` with
the failing task's log tail; every process is killed at the end.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence


class ClusterError(RuntimeError):
    """A task failed or the cluster ran past its timeout."""


def free_ports(count: int) -> List[int]:
    from tf_backup import launch  # pylint: disable=g-import-not-at-top
    return launch.free_ports(count)


def cluster_spec(jobs: Dict[str, int]) -> Dict[str, List[str]]:
    """{"worker": 4} -> {"worker": ["localhost:P1", ...]} on free ports."""
    ports = iter(free_ports(sum(jobs.values())))
    return {job: [f"localhost:{next(ports)}" for _ in range(n)] for job, n in jobs.items()}


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            text = [l for l in f.read().splitlines() if "I0000" not in l and "W0000" not in l]
        return "\n".join(text[-lines:])
    except OSError:
        return "(no log)"


def launch(fn: Callable, jobs: Dict[str, int], args: Sequence = (), run_in: Sequence[str] = ("worker",),
           timeout: float = 600.0, log_dir: Optional[str] = None) -> List[Any]:
    """Runs `fn(*args)` in every task of a localhost cluster with `jobs` tasks per job.

    Returns the results of the tasks whose job (or name, e.g. "worker-0") is in `run_in`, in job
    then index order; the other tasks are killed once those are done.
    """
    keep = log_dir is not None
    log_dir = log_dir or tempfile.mkdtemp(prefix="tf_backup_bench_")
    os.makedirs(log_dir, exist_ok=True)
    spec = cluster_spec(jobs)
    procs, logs, results = {}, {}, {}
    try:
        for job, n in jobs.items():
            for index in range(n):
                name = f"{job}-{index}"
                logs[name] = os.path.join(log_dir, f"{name}.log")
                results[name] = os.path.join(log_dir, f"{name}.result")
                payload = os.path.join(log_dir, f"{name}.payload")
                with open(payload, "wb") as f:
                    pickle.dump((fn.__module__, fn.__qualname__, tuple(args), results[name]), f)
                env = dict(os.environ)
                env["TF_CONFIG"] = json.dumps({"cluster": spec, "task": {"type": job, "index": index}})
                env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
                env["PYTHONUNBUFFERED"] = "1"
                with open(logs[name], "ab") as log:
                    procs[name] = subprocess.Popen(
                        [sys.executable, "-m", "benchmarks._task", payload], stdout=log,
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                        start_new_session=True)
        waited = [n for n in procs if n.split("-")[0] in run_in or n in run_in]
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in procs.items():
                if proc.poll() not in (None, 0):
                    raise ClusterError(f"task {name} failed (exit code {proc.returncode}); "
                                       f"last lines of {logs[name]}:\n{_tail(logs[name])}")
            if all(procs[n].poll() == 0 for n in waited):
                break
            if time.monotonic() > deadline:
                running = [n for n in waited if procs[n].poll() is None]
                raise ClusterError(f"the cluster ran past its timeout of {timeout:.0f} s; still "
                                   f"running: {running}; last lines of {logs[running[0]]}:\n"
                                   f"{_tail(logs[running[0]])}")
            time.sleep(0.1)
        out = []
        for name in waited:
            with open(results[name], "rb") as f:
                out.append(pickle.load(f))
    finally:
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
    if not keep:
        shutil.rmtree(log_dir, ignore_errors=True)
    return out
