"""Issue 20, part 4: tf_backup against MultiWorkerMirroredStrategy when stragglers exist.

Both run as real localhost clusters with the overhead benchmark's MLP (about 1e4 parameters, batch
32 per worker, SGD): every worker sleeps `compute` seconds before each batch (the step's compute)
plus a seeded `pareto` delay keyed by worker and global step. MWMS (4 workers) waits for all of
them every step; tf_backup runs N = 4 with b = 0, 1, 2 (4 + b workers). Step time: seconds per
global step over a timed fit (after a warm-up fit), from worker 0's batch ends and the global step
in its logs.
"""

import statistics
from typing import Dict, List

from benchmarks import common

NAME = "vs_mwms_stragglers"
TITLE = "tf_backup vs MultiWorkerMirroredStrategy under stragglers: seconds per global step, N = 4"


def settings(quick: bool, smoke: bool = False) -> Dict:
    if smoke:
        return dict(backups=[1], reps=2, steps=15, compute=0.05, straggler="pareto:1.5:0.05")
    if quick:
        return dict(backups=[0, 1, 2], reps=3, steps=40, compute=0.1, straggler="pareto:1.5:0.05")
    return dict(backups=[0, 1, 2], reps=5, steps=100, compute=0.1, straggler="pareto:1.5:0.05")


def run(out_dir: str, quick: bool, argv: List[str], smoke: bool = False) -> Dict:
    from benchmarks import workloads  # pylint: disable=g-import-not-at-top

    s = settings(quick, smoke)
    hidden = workloads.hidden_for_params(1e4)
    base = dict(hiddens=[hidden], steps=s["steps"], reps=s["reps"], compute=s["compute"], straggler=s["straggler"],
                per_global_step=True)
    cells = [("MWMS", "mwms", 4, 0)] + [(f"tf_backup b = {b}", "tf_backup", 4 + b, b) for b in s["backups"]]
    times, failures, csv_rows = {}, [], []
    for label, system, workers, b in cells:
        out = workloads.attempt(NAME, f"{label} ({s['reps']} fits)", failures, lambda: workloads.launch_overhead(
            system, workers, dict(base, system=system, num_backup_workers=b)))
        if out is None:
            continue
        times[label] = [rep[0] for rep in out[0][hidden]]
        csv_rows += [[label, workers, k + 1, t] for k, t in enumerate(times[label])]
        print(f"{NAME}: {label}: {', '.join(f'{1e3 * t:.0f}' for t in times[label])} ms per step", flush=True)
    mwms = statistics.median(times["MWMS"]) if "MWMS" in times else None
    rows = []
    for label, system, workers, b in cells:
        if label not in times:
            rows.append([label, workers, "failed", "-", f"0/{s['reps']}"])
            continue
        med = statistics.median(times[label])
        rows.append([label, workers, common.median_range([1e3 * t for t in times[label]], "{:.0f}"),
                     f"{med / mwms:.2f}" if mwms else "-", f"{len(times[label])}/{s['reps']}"])
    notes = [
        f"Model: a 40-{hidden}-{hidden}-10 MLP ({workloads.mlp_params(hidden):,} parameters), batch 32 per worker, "
        "SGD(0.01), random data (each worker its own).",
        f"Stragglers: every worker sleeps {s['compute']:g} s (its compute) plus a `{s['straggler']}` delay (seed 0, "
        "keyed by worker and global step) before each batch. MWMS: 4 workers, every step waits for all; "
        "tf_backup: N = 4 of 4 + b workers, 1 ps task.",
        f"Seconds per global step over each of {s['reps']} timed fits of {s['steps']} batches (after a warm-up "
        "fit), from worker 0's batch ends and global steps; median (min-max). Ratio: ours / MWMS, medians of "
        "this run.",
        "Target (issue 20): ours <= 0.6x MWMS's step time at b >= 1.",
    ]
    columns = ["system", "workers", "ms per global step", "ratio to MWMS", "fits ok"]
    lines = common.write_results(out_dir, NAME, TITLE, notes, columns, rows,
                                 ["system", "workers", "fit", "seconds_per_step"], csv_rows, failures, argv)
    return {"lines": lines, "times": times, "failures": failures}
