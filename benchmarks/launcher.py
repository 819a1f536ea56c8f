"""Localhost clusters for programs that are not tf_backup's (MultiWorkerMirroredStrategy, TF1).

`launch(fn, {"ps": 1, "worker": 2}, args, run_in=("worker-0",))` runs `fn(*args)`
in every task of a `tf_backup.LocalCluster` whose ps tasks run `fn` too
(not `tf_backup.serve()`), waits for the tasks named in `run_in` (job names or
task names) and returns their results in task order; every other task is
killed then (TF1 ps tasks serve forever). A failure raises
`tf_backup.LocalClusterError` with the failing task's log tail. `hosts` and
`command_prefix` place tasks (in network namespaces: `benchmarks.netem`), as in
`tf_backup.LocalCluster`.
"""

import shutil
from typing import Any, Callable, Dict, List, Optional, Sequence

import tf_backup


def launch(fn: Callable, jobs: Dict[str, int], args: Sequence = (), run_in: Sequence[str] = ("worker",),
           timeout: float = 600.0, log_dir: Optional[str] = None, hosts: Optional[Dict[str, str]] = None,
           command_prefix: Optional[Callable[[str], Sequence[str]]] = None) -> List[Any]:
    unknown = sorted(set(jobs) - {"ps", "worker"})
    if unknown:
        raise ValueError(f"`jobs` may name `ps` and `worker`. Received jobs={jobs!r}")
    cluster = tf_backup.LocalCluster(fn, num_workers=jobs.get("worker", 0), num_ps=jobs.get("ps", 0),
                                     args=args, log_dir=log_dir, serve_ps=False, hosts=hosts,
                                     command_prefix=command_prefix)
    names = [n for n in cluster.names if n.rsplit("-", 1)[0] in run_in or n in run_in]
    with cluster:
        cluster.start()
        out = cluster.wait_for(names, timeout)
    if log_dir is None:
        shutil.rmtree(cluster.log_dir, ignore_errors=True)
    return out
