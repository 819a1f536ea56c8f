"""What the task processes of this process's local cluster have used so far: CPU seconds, and bytes
on their emulated links (`benchmarks.netem`), read from /proc.
"""

from typing import Dict, Optional


def cluster_task_pids() -> Optional[Dict[str, int]]:
    """{task name: pid} of every task process of this process's local cluster.

    Tasks of a `tf_backup.LocalCluster` run `python -m tf_backup.local._task <log dir>/<task>.payload`:
    the processes whose command line names this process's log dir, by task name ("ps-0",
    "worker-1", ...). None where there is no /proc or this process is not such a task.
    """
    import os  # pylint: disable=g-import-not-at-top
    try:
        with open("/proc/self/cmdline", "rb") as f:
            own = [a.decode() for a in f.read().split(b"\0") if a.endswith(b".payload")]
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    if not own:
        return None
    log_dir = os.path.dirname(own[0])
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except OSError:
            continue  # the process ended meanwhile
        payload = [a for a in args if a.endswith(".payload") and os.path.dirname(a) == log_dir]
        if payload:
            out[os.path.basename(payload[0])[:-len(".payload")]] = int(pid)
    return out


def cluster_cpu_seconds(pids: Optional[Dict[str, int]] = None) -> Optional[Dict[str, float]]:
    """CPU seconds (user + system) used so far by each task process of this process's local cluster.

    None where there is no /proc or this process is not a task (`cluster_task_pids`).
    """
    import os  # pylint: disable=g-import-not-at-top
    pids = cluster_task_pids() if pids is None else pids
    if pids is None:
        return None
    try:
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    out = {}
    for task, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        out[task] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def cluster_net_bytes(pids: Optional[Dict[str, int]] = None) -> Optional[Dict[str, tuple]]:
    """{task: (bytes sent, bytes received) so far} on each task's emulated link (`benchmarks.netem`).

    The kernel's counters of `eth0` in each task process's network namespace, from
    /proc/<pid>/net/dev; tasks without an eth0 are left out, None where this process is not a
    task. Only for tasks placed by netem: a task in the root namespace would read this machine's
    own eth0 (and on loopback every task shares `lo`).
    """
    from benchmarks import netem  # pylint: disable=g-import-not-at-top
    pids = cluster_task_pids() if pids is None else pids
    if pids is None:
        return None
    out = {}
    for task, pid in pids.items():
        c = netem.proc_net_dev(pid)
        if c is not None:
            out[task] = (c.tx_bytes, c.rx_bytes)
    return out
