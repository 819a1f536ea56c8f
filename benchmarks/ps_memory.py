"""Issue 21: the ps task's resident memory over a long run, with and without a dead worker.

A publish feeds no wake-up token to a worker the chief declared dead (design.md, "Wake-up
tokens"); before that, a dead worker's queue grew by one token a step for the rest of the job.
This runs one long fit (3 workers, N = 2, b = 1, the 1e4-parameter MLP, no sleeps) twice on one
machine: once with every worker alive, once with worker 2 killed (kill -9) early. The driver
samples the ps process's resident set size (VmRSS, /proc) with the chief's global step.
"""

import os
import shutil
import tempfile
import time
from typing import Dict, List

import numpy as np

from benchmarks import cluster_counters
from benchmarks import common

NAME = "ps_memory"
TITLE = "ps resident memory over a long run: every worker alive vs one worker killed"


def settings(quick: bool, smoke: bool = False) -> Dict:
    # compute: seconds every worker sleeps per batch (4 processes share 2 cores: without it a worker
    # could be starved past worker_timeout, which a first run showed at 3 s).
    if smoke:
        return dict(steps=300, kill_at=40, every_seconds=0.5, compute=0.005, worker_timeout=10.0)
    if quick:
        return dict(steps=5000, kill_at=100, every_seconds=1.0, compute=0.005, worker_timeout=10.0)
    return dict(steps=30000, kill_at=100, every_seconds=2.0, compute=0.005, worker_timeout=10.0)


def _step(progress_dir: str) -> int:
    try:
        with open(os.path.join(progress_dir, "worker-0.step")) as f:
            return int(f.read() or -1)
    except (OSError, ValueError):
        return -1


def _one_run(s: Dict, kill: bool, timeout: float = 1800.0):
    """(samples [(seconds, global step, ps RSS KiB)], the chief's result) of one cluster."""
    import tf_backup  # pylint: disable=g-import-not-at-top
    from benchmarks import memory_workload  # pylint: disable=g-import-not-at-top
    from benchmarks import mlp_task  # pylint: disable=g-import-not-at-top

    work = tempfile.mkdtemp(prefix="tf_backup_ps_memory_")
    cfg = dict(steps=s["steps"], num_backup_workers=1, hidden=mlp_task.hidden_for_params(1e4), progress_dir=work,
               compute=s["compute"], worker_timeout=s["worker_timeout"])
    cluster = tf_backup.LocalCluster(memory_workload.memory_worker, 3, args=(cfg,), log_dir=os.path.join(work, "logs"))
    samples: List[tuple] = []
    try:
        with cluster:
            cluster.start()
            pid, start, killed = cluster.procs["ps-0"].pid, time.monotonic(), False
            while cluster.procs["worker-0"].poll() is None:
                if time.monotonic() - start > timeout:
                    raise TimeoutError(f"{NAME}: the run did not end within {timeout:.0f} s")
                step = _step(work)
                if kill and not killed and step >= s["kill_at"]:
                    cluster.kill("worker-2")
                    killed = True
                rss = cluster_counters.rss_kib(pid)
                if rss is not None and step >= 0:
                    samples.append((time.monotonic() - start, step, rss))
                time.sleep(s["every_seconds"])
            out = cluster.wait(timeout=120, max_failed_workers=1 if kill else 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return samples, out[0]


def growth_per_1000_steps(samples, from_step: int) -> float:
    """Least-squares slope of RSS (KiB) against global step, per 1,000 steps, over steps >= `from_step`."""
    pts = [(step, rss) for _, step, rss in samples if step >= from_step]
    if len(pts) < 3:
        return float("nan")
    steps, rss = np.array(pts, dtype=float).T
    return float(np.polyfit(steps, rss, 1)[0] * 1000)


def run(out_dir: str, quick: bool, argv: List[str], smoke: bool = False) -> Dict:

    s = settings(quick, smoke)
    failures, rows, csv_rows, curves = [], [], [], {}
    settle = 2 * s["kill_at"] + 600  # the dead worker is declared dead `worker_timeout` after the kill
    for label, kill in (("every worker alive", False), ("worker 2 killed", True)):
        out = common.attempt(NAME, label, failures, lambda kill=kill: _one_run(s, kill))
        if out is None:
            rows.append([label, "failed", "-", "-", "-", "-"])
            continue
        samples, chief = out
        curves[label] = samples
        csv_rows += [[label, t, step, rss] for t, step, rss in samples]

        def at(fraction):
            target = fraction * s["steps"]
            near = min(samples, key=lambda p: abs(p[1] - target))
            return f"{near[2] / 1024:.1f}"

        rows.append([label, at(settle / s["steps"]), at(0.5), at(1.0),
                     f"{growth_per_1000_steps(samples, settle):+.0f}",
                     ", ".join(str(q) for q in chief["wake_queue_sizes"])])
        print(f"{NAME}: {label}: {len(samples)} samples, steps {chief['stats']['global_step']}, "
              f"queues {chief['wake_queue_sizes']}", flush=True)
    notes = [
        f"One fit of {s['steps']:,} global steps per run: 3 workers (N = 2, b = 1), 1 ps, the 9,943-parameter MLP, "
        f"batch 32, SGD, {1e3 * s['compute']:g} ms of sleep per batch (steps are many). In the second run "
        f"worker 2 is killed (kill -9) once the chief passes step {s['kill_at']}; the chief declares it dead "
        f"{s['worker_timeout']:g} s later (`worker_timeout`).",
        f"RSS: VmRSS of the ps process from /proc, sampled every {s['every_seconds']:g} s with the chief's "
        f"global step (written every 20 batches); MiB at the sample nearest the step. Growth: least-squares "
        f"slope of RSS against step over steps >= {settle}, KiB per 1,000 steps. Queues: tokens left in each "
        "worker's wake-up queue at the end (worker 0 first).",
    ]
    columns = ["run", f"RSS at step {settle} (MiB)", f"at {s['steps'] // 2:,}", f"at {s['steps']:,}",
               "growth (KiB / 1,000 steps)", "wake-up queue tokens at the end"]
    image = None
    if curves:
        path = os.path.join(out_dir, f"{NAME}.png")
        series = [(label, [p[1] for p in v], [p[2] / 1024 for p in v]) for label, v in curves.items()]
        if common.plot(path, [{"xlabel": "global step", "ylabel": "ps RSS (MiB)", "series": series}], TITLE):
            image = path
    lines = common.write_results(out_dir, NAME, TITLE, notes, columns, rows, ["run", "seconds", "global_step", "rss_kib"],
                                 csv_rows, failures, argv, image=image)
    return {"lines": lines, "curves": curves, "failures": failures}
