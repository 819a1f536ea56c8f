"""The first fits of a local cluster against glibc's number of malloc arenas (`MALLOC_ARENA_MAX`).

    python -m benchmarks.malloc_arenas [--arenas=2,16] [--rounds=3] [--fits=4] [--params=1e7]

The bandwidth benchmark's loopback cell (`benchmarks.bandwidth_cell --rate=0`: 4 workers, b = 0, 2 ps
tasks with `apply_on_ps`, its MLP, a batch of 4 rows and a 100 ms sleep per batch), a warm-up fit of 2
steps, then `--fits` timed fits of 8 steps. Each value of `--arenas` runs on a cluster of its own,
every task started with `MALLOC_ARENA_MAX` set to it (16 is glibc's own limit on 2 cores, 8 per core);
the values alternate within each round. Printed per run: each fit's ms a step and the CPU a step of
every task together (worker 0's batch ends, `benchmarks.step_timing`), the peak resident memory of
the cluster's processes (this process's descendants started since the run began, sampled every
0.5 s), and the values of `MALLOC_ARENA_MAX` they started with.

Why (docs/performance.md, "The first fits"): each arena grows to its own peak, page by page, while the
threads that use it allocate a step's model-sized buffers, so a process with many arenas faults in
memory for many more steps than one with few.
"""

import argparse
import os
import statistics
import threading
import time
from typing import Dict, List, Optional

from benchmarks import cluster_counters


def ticks_since_boot() -> float:
    """Now, in the clock ticks of /proc/<pid>/stat's start times."""
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK")


def descendants(root: int, since: float = 0.0) -> List[int]:
    """The pids of every process below `root` started at or after `since` (ticks since boot; from /proc).

    `since` leaves out what earlier runs left: a local cluster's preloading process lives on, idle,
    after its cluster (`tf_backup.local.preload`).
    """
    parent, started = {}, {}
    for name in os.listdir("/proc"):
        fields = cluster_counters.stat_fields(int(name)) if name.isdigit() else None
        if fields is not None:  # None: not a process, or ended meanwhile
            parent[int(name)], started[int(name)] = int(fields[1]), int(fields[19])
    out = []
    for pid in (p for p in parent if started[p] >= since):
        p, hops = parent.get(pid), 0
        while p and p != root and hops < 64:
            p, hops = parent.get(p), hops + 1
        if p == root:
            out.append(pid)
    return out


def arena_setting(pid: int) -> Optional[str]:
    """`MALLOC_ARENA_MAX` as process `pid` started with it (None: unset or unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    value = env.get(b"MALLOC_ARENA_MAX")
    return None if value is None else value.decode()


class ClusterWatch:
    """Samples this process's descendants started since it began, every `period` seconds, in a thread:
    `peak` is their largest resident bytes together, `arenas` the `MALLOC_ARENA_MAX` values they started with."""

    def __init__(self, period: float = 0.5, limit_s: float = 1800.0):
        self.peak, self.arenas = 0, set()
        self._stop, self._period, self._limit = threading.Event(), period, limit_s
        self._thread = threading.Thread(target=self._run, daemon=True, name="cluster-watch")

    def _run(self) -> None:
        end = time.monotonic() + self._limit  # bounded, whatever happens to the run it watches
        seen, since = set(), ticks_since_boot() - 1
        while not self._stop.wait(self._period) and time.monotonic() < end:
            pids = descendants(os.getpid(), since)
            self.peak = max(self.peak, 1024 * sum(cluster_counters.rss_kib(p) or 0 for p in pids))
            for pid in set(pids) - seen:
                self.arenas.add(arena_setting(pid))
            seen.update(pids)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


def run_once(arenas: int, params: float, fits: int) -> Dict:
    from benchmarks import bandwidth  # pylint: disable=g-import-not-at-top
    from benchmarks import mlp_task  # pylint: disable=g-import-not-at-top
    from benchmarks import overhead_workload  # pylint: disable=g-import-not-at-top

    hidden = mlp_task.hidden_for_params(params, bandwidth.DEPTH)
    cfg = dict(system="tf_backup", hiddens=[hidden], depth=bandwidth.DEPTH, batch=bandwidth.BATCH,
               compute=bandwidth.COMPUTE, steps=8, reps=fits, warmup=2, net_counters=False)
    cfg.update(bandwidth.variant_cfg({"apply_on_ps": True}))
    before = os.environ.get("MALLOC_ARENA_MAX")
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)  # every task's: `memory.malloc_env` keeps the caller's own
    try:
        with ClusterWatch() as watch:
            out = overhead_workload.launch_overhead("tf_backup", 4, cfg, timeout=900, num_ps=2, network=None)
    finally:
        if before is None:
            del os.environ["MALLOC_ARENA_MAX"]
        else:
            os.environ["MALLOC_ARENA_MAX"] = before
    cpu = [sum((c or {}).values()) for c in out[0][("cpu", hidden)]]
    return {"ms": [1e3 * statistics.mean(r) for r in out[0][hidden]], "cpu_ms": [1e3 * c for c in cpu],
            "peak_rss_gb": watch.peak / 1e9, "arenas_seen": sorted(watch.arenas - {None})}


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arenas", default="2,16", help="MALLOC_ARENA_MAX values, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fits", type=int, default=4)
    parser.add_argument("--params", type=float, default=1e7)
    args = parser.parse_args(argv)
    values = [int(v) for v in args.arenas.split(",")]
    if any(v < 1 for v in values) or args.rounds < 1 or args.fits < 1:
        raise SystemExit(f"--arenas must be positive, --rounds and --fits at least 1: {args}")
    runs = {v: [] for v in values}
    for r in range(args.rounds):
        for v in values:
            got = run_once(v, args.params, args.fits)
            runs[v].append(got)
            print(f"round {r} arenas {v}: ms/step per fit {[round(x) for x in got['ms']]}, CPU ms/step "
                  f"{[round(x) for x in got['cpu_ms']]}, peak RSS {got['peak_rss_gb']:.2f} GB, the tasks' "
                  f"MALLOC_ARENA_MAX {got['arenas_seen']}", flush=True)
    print("| MALLOC_ARENA_MAX | ms/step, fit 1 | ms/step, fits 2+ | CPU ms/step, fit 1 | CPU ms/step, fits 2+ "
          "| peak RSS GB |\n|---|---|---|---|---|---|")
    for v, got in runs.items():
        first = [g["ms"][0] for g in got]
        rest = [x for g in got for x in g["ms"][1:]]
        cpu_first = [g["cpu_ms"][0] for g in got]
        cpu_rest = [x for g in got for x in g["cpu_ms"][1:]]
        med = lambda xs: f"{statistics.median(xs):.0f}" if xs else "-"  # noqa: E731
        print(f"| {v} | {med(first)} ({', '.join(f'{x:.0f}' for x in first)}) | {med(rest)} | {med(cpu_first)} "
              f"| {med(cpu_rest)} | {statistics.median(g['peak_rss_gb'] for g in got):.2f} |")


if __name__ == "__main__":
    main()
