"""Item 2: time to accuracy on the offline default task, async vs sync vs sync with backups.

The default job's task and model (MNIST-1D, the 1-D CNN and Adam of configs/mnist1d.json, batch 32
per worker), N = 4: `async` (4 workers, every gradient applied), `sync` (4 workers, b = 0) and
`sync_backup` (b = 1, 2: 5, 6 workers), the same seeded Pareto straggler delays (a sleep before each
batch, keyed by worker and global step). Every run trains for the same wall time; the chief
snapshots its weights every half second (every few seconds in the full mode), and the snapshots are
evaluated on the test split after training (not timed).
"""

import json
import os
import statistics
from typing import Dict, List

from benchmarks import common

NAME = "time_to_accuracy"
TITLE = "Time to accuracy on MNIST-1D: async vs sync vs sync with backup workers (N = 4)"
MODES = [("async", "async", 4, 0), ("sync (b = 0)", "sync", 4, 0), ("sync_backup b = 1", "sync_backup", 5, 1),
         ("sync_backup b = 2", "sync_backup", 6, 2)]


def settings(quick: bool, smoke: bool = False) -> Dict:
    # A run trains for `seconds` of wall time (at most `steps` batches per worker).
    if smoke:
        return dict(modes=MODES[1:2], clusters=1, reps=3, seconds=3, steps=20, every_seconds=0.5,
                    straggler="pareto:1.5:0.02")
    if quick:
        return dict(modes=MODES, clusters=1, reps=3, seconds=10, steps=100000, every_seconds=0.5,
                    straggler="pareto:1.5:0.02")
    return dict(modes=MODES, clusters=3, reps=1, seconds=120, steps=100000, every_seconds=4.0,
                straggler="pareto:1.5:0.02")


def _at_time(curve, t):
    """Accuracy of the last snapshot taken by wall time t."""
    before = [a for s, _, a in curve if s <= t]
    return before[-1] if before else float("nan")


def first_reach(curve, target, index):
    for point in curve:
        if point[2] >= target:
            return point[index]
    return None


def _claims(curves, target) -> List[str]:
    """What this run says of the two claims, from the medians (empty when a mode is missing)."""
    def median_reach(label):
        times = [first_reach(c, target, 0) for c in curves.get(label, [])]
        times = [t if t is not None else float("inf") for t in times]
        return statistics.median(times) if times else None

    def median_final(label):
        v = curves.get(label, [])
        return statistics.median(c[-1][2] for c in v) if v else None

    backups = [label for label in curves if label.startswith("sync_backup")]
    sync, asyn = median_reach("sync (b = 0)"), median_final("async")
    lines = []
    if sync is not None and backups and all(median_reach(b) is not None for b in backups):
        sooner = all(median_reach(b) < sync for b in backups)
        lines.append(f"Claim 1 {'holds' if sooner else 'does not hold'} here: median seconds to {target:.2f}, "
                     f"sync {sync:.1f}, " + ", ".join(f"{b} {median_reach(b):.1f}" for b in backups) + ".")
    if asyn is not None and backups and all(median_final(b) is not None for b in backups):
        better = all(median_final(b) > asyn for b in backups)
        lines.append(f"Claim 2 {'holds' if better else 'does not hold'} here: median final accuracy, async "
                     f"{asyn:.3f}, " + ", ".join(f"{b} {median_final(b):.3f}" for b in backups) + ".")
    return lines


def run(out_dir: str, quick: bool, argv: List[str], smoke: bool = False) -> Dict:
    import tf_backup  # pylint: disable=g-import-not-at-top
    from benchmarks import accuracy_workload  # pylint: disable=g-import-not-at-top

    s = settings(quick, smoke)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "mnist1d.json")) as f:
        base = json.load(f)
    curves = {label: [] for label, *_ in s["modes"]}
    failures, csv_rows = [], []
    for cluster in range(s["clusters"]):
        for label, mode, workers, b in s["modes"]:
            cfg = dict(base, mode=mode, num_backup_workers=b, seconds=s["seconds"], steps=s["steps"], reps=s["reps"],
                       every_seconds=s["every_seconds"], straggler=s["straggler"], seed=0)
            out = common.attempt(
                NAME, f"{label}, cluster {cluster + 1} ({s['reps']} run(s))", failures,
                lambda: tf_backup.launch_local(accuracy_workload.accuracy_worker, workers, args=(cfg,), timeout=900))
            if out is None:
                continue
            for curve in out[0]["runs"]:
                curves[label].append(curve)
                run_index = len(curves[label])
                csv_rows += [[label, workers, run_index, sec, step, acc] for sec, step, acc in curve]
                print(f"{NAME}: {label} run {run_index}: {curve[-1][0]:.1f} s, {curve[-1][1]} steps, "
                      f"accuracy {curve[-1][2]:.3f}", flush=True)
    done = {k: v for k, v in curves.items() if v}
    walls = {k: statistics.median(c[-1][0] for c in v) for k, v in done.items()}
    common_t = min(walls.values()) if walls else float("nan")
    finals = {k: statistics.median(c[-1][2] for c in v) for k, v in done.items()}
    target = round(0.9 * min(finals.values()), 2) if finals else float("nan")
    runs = s["clusters"] * s["reps"]
    rows = []
    fmt3 = lambda v: common.median_range(v, "{:.3f}")  # noqa: E731
    for label, mode, workers, b in s["modes"]:
        v = curves[label]
        reach_t = [first_reach(c, target, 0) for c in v]
        reach_s = [first_reach(c, target, 1) for c in v]
        rows.append([label, workers, common.median_range([c[-1][0] for c in v], "{:.1f}"),
                     common.median_range([c[-1][1] for c in v], "{:.0f}"), fmt3([c[-1][2] for c in v]),
                     fmt3([_at_time(c, common_t) for c in v]),
                     common.median_range([x for x in reach_t if x is not None], "{:.1f}")
                     + (f", {reach_t.count(None)} never" if None in reach_t else ""),
                     common.median_range([x for x in reach_s if x is not None], "{:.0f}"),
                     f"{len(v)}/{runs}"])
    notes = [
        f"Task: the default job's (`configs/mnist1d.json`: MNIST-1D, CNN filters {base['model'].get('filters')}, "
        f"{base['optimizer']} lr {base['learning_rate']}, batch {base['batch_size']} per worker), N = 4. async: 4 "
        "workers, every gradient applied (a global step per gradient); sync: 4 workers, b = 0; sync_backup: "
        "4 + b workers.",
        f"Stragglers: every worker **sleeps** a `{s['straggler']}` delay (seed 0, keyed by worker and global step) "
        "before each batch; the real CNN compute shares the 2 cores.",
        f"A run trains a fresh model for {s['seconds']:g} s of wall time from the start of the chief's `fit` "
        "(tracing included); the chief's fit stops at the first batch end past it, which ends the round for "
        f"every worker. {s['clusters']} cluster(s) per mode with {s['reps']} run(s) each; median (min–max) over "
        "runs.",
        f"Same wall time: the final accuracy column; also the accuracy at {common_t:.1f} s, the shortest median "
        f"run. Target accuracy {target:.2f} (90% of the lowest median final accuracy); time and steps are those "
        f"of the first snapshot at or above it (snapshots every {s['every_seconds']:g} s of wall time).",
        "Claims to check: sync with backups reaches a given accuracy sooner than sync without; it ends better "
        "than async.",
    ] + _claims(curves, target)
    columns = ["mode", "workers", "wall s", "global steps", "final test accuracy", f"accuracy at {common_t:.1f} s",
               f"s to {target:.2f}", f"steps to {target:.2f}", "runs ok"]
    csv_columns = ["mode", "workers", "run", "seconds", "global_step", "test_accuracy"]
    image = None
    if not smoke:
        path = os.path.join(out_dir, f"{NAME}.png")
        by_time, by_step = [], []
        for label in done:
            for i, c in enumerate(done[label]):
                name = label if i == 0 else f"{label} ({i + 1})"
                by_time.append((name, [p[0] for p in c], [p[2] for p in c]))
                by_step.append((name, [p[1] for p in c], [p[2] for p in c]))
        if common.plot(path, [{"xlabel": "wall time (s)", "ylabel": "test accuracy", "series": by_time},
                              {"xlabel": "global step", "ylabel": "test accuracy", "series": by_step}], TITLE):
            image = path
    lines = common.write_results(out_dir, NAME, TITLE, notes, columns, rows, csv_columns, csv_rows, failures, argv,
                                 image=image)
    return {"lines": lines, "curves": curves, "failures": failures}
