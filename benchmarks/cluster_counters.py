"""What the task processes of this process's local cluster have used so far: CPU seconds, resident
memory, and bytes on their emulated links (`benchmarks.netem`), read from /proc.
"""

from typing import Dict, List, Optional


def stat_fields(pid: int) -> Optional[List[str]]:
    """The fields of /proc/<pid>/stat after the command name (index 0 is the state, 1 the parent,
    11-12 user and system ticks, 19 the start time in ticks since boot); None once it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def rss_kib(pid: int) -> Optional[int]:
    """The process's resident set size in KiB (VmRSS), or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cluster_task_pids() -> Optional[Dict[str, int]]:
    """{task name: pid} of every running task process of this process's local cluster.

    A `tf_backup.LocalCluster` writes each task's pid beside its log (`<log dir>/<task>.pid`)
    and names the log dir in every task's `TF_BACKUP_LOG_DIR`. None where there is no /proc
    or this process is not such a task.
    """
    import os  # pylint: disable=g-import-not-at-top
    log_dir = os.environ.get("TF_BACKUP_LOG_DIR")
    if not log_dir or not os.path.isdir("/proc"):
        return None
    out = {}
    for name in sorted(os.listdir(log_dir)):
        if not name.endswith(".pid"):
            continue
        try:
            with open(os.path.join(log_dir, name)) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            continue  # being written
        if os.path.exists(f"/proc/{pid}"):
            out[name[:-len(".pid")]] = pid
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
        fields = stat_fields(pid)
        if fields is None:
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
