"""Adaptive N (`num_backup_workers="auto"`) against every fixed b, under stragglers that change mid-run.

The default job's task and model (MNIST-1D, the 1-D CNN and Adam of configs/mnist1d.json, batch 32
per worker), 6 workers. Every worker sleeps `compute` seconds before each batch (besides the real
CNN compute) plus its straggler delay from a `phases` model keyed by global step: in phase 1
every worker draws Pareto delays, in phase 2 two workers are 5x slow (`slow:4,5:5`: they sleep
5x `compute`). A run ends at a fixed global step; the chief records when each phase ended and
snapshots its weights, which are evaluated on the test split afterwards (not timed).
"""

import json
import os
import statistics
from typing import Dict, List, Optional

from benchmarks import common
from benchmarks import time_to_accuracy
from tf_backup.protocol import config as config_lib

NAME = "adaptive"
TITLE = "Adaptive N against fixed b: time to accuracy on MNIST-1D, 6 workers, stragglers that change mid-run"
WORKERS = 6
MODES = [("auto", "auto")] + [(f"b = {b}", b) for b in range(4)]
SETTLED = 10  # phase 1 is also timed from this step on: past the start-up and the warmup


def settings(quick: bool, smoke: bool = False) -> Dict:
    if smoke:
        return dict(modes=MODES[:2], reps=1, phase_steps=15, compute=0.02, every_seconds=0.5,
                    phase1="pareto:1.5:0.02")
    if quick:
        return dict(modes=MODES, reps=3, phase_steps=120, compute=0.03, every_seconds=0.5,
                    phase1="pareto:1.5:0.02")
    return dict(modes=MODES, reps=5, phase_steps=300, compute=0.03, every_seconds=1.0,
                phase1="pareto:1.5:0.02")


def straggler(s: Dict) -> str:
    return f"phases:{s['phase1']};{s['phase_steps']}:slow:4,5:5"


def run(out_dir: str, quick: bool, argv: List[str], smoke: bool = False, modes: Optional[List[str]] = None) -> Dict:
    """`modes`: a subset of "auto" and "0".."3" (the fixed b's) to run; default all of the settings'."""
    import tf_backup  # pylint: disable=g-import-not-at-top
    from benchmarks import accuracy_workload  # pylint: disable=g-import-not-at-top

    s = settings(quick, smoke)
    if modes:
        s["modes"] = [(label, b) for label, b in s["modes"] if str(b) in modes]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "mnist1d.json")) as f:
        base = json.load(f)
    stop = 2 * s["phase_steps"]
    curves = {label: [] for label, _ in s["modes"]}
    marks = {label: [] for label, _ in s["modes"]}
    chosen = {label: [] for label, _ in s["modes"]}
    noise = {label: [] for label, _ in s["modes"]}
    failures, csv_rows = [], []
    for label, b in s["modes"]:
        cfg = dict(base, mode="sync_backup", num_backup_workers=b, seconds=3600.0, steps=100000, reps=s["reps"],
                   every_seconds=s["every_seconds"], straggler=straggler(s), seed=0, compute=s["compute"],
                   stop_step=stop, mark_steps=[SETTLED, s["phase_steps"], stop])
        out = common.attempt(NAME, f"{label} ({s['reps']} run(s))", failures, lambda: tf_backup.launch_local(
            accuracy_workload.accuracy_worker, WORKERS, args=(cfg,), timeout=1800))
        if out is None:
            continue
        chief = out[0]
        for curve, mark, replicas, scale in zip(chief["runs"], chief["marks"], chief["replicas"],
                                                chief["noise_scale"]):
            curves[label].append(curve)
            marks[label].append(mark)
            chosen[label].append(replicas)
            noise[label].append(scale)
            k = len(curves[label])
            csv_rows += [[label, k, sec, step, acc] for sec, step, acc in curve]
            print(f"{NAME}: {label} run {k}: phase 1 {mark[1]:.1f} s, both {mark[2]:.1f} s, "
                  f"accuracy {curve[-1][2]:.3f}", flush=True)
    done = {k: v for k, v in curves.items() if v}
    finals = {k: statistics.median(c[-1][2] for c in v) for k, v in done.items()}
    target = round(0.9 * min(finals.values()), 2) if finals else float("nan")

    def between(label, first, last):  # seconds from mark `first` (None: the start) to mark `last`
        return [m[last] - (0.0 if first is None else m[first]) for m in marks[label]
                if m[last] is not None and (first is None or m[first] is not None)]

    def reach(label):
        return [time_to_accuracy.first_reach(c, target, 0) for c in curves[label]]

    rows, medians = [], {}
    for label, _ in s["modes"]:
        if not curves[label]:
            rows.append([label] + ["-"] * 7 + [f"0/{s['reps']}"])
            continue
        p1, settled, p2 = between(label, None, 1), between(label, 0, 1), between(label, 1, 2)
        times = reach(label)
        if not p1 or not p2:
            rows.append([label] + ["-"] * 7 + [f"0/{s['reps']} reached step {stop}"])
            continue
        medians[label] = dict(p1=statistics.median(p1), settled=statistics.median(settled), p2=statistics.median(p2),
                              total=statistics.median([a + b for a, b in zip(p1, p2)]),
                              reach=statistics.median([t if t is not None else float("inf") for t in times]))
        n_by_phase = []
        for phase in (0, 1):
            picked = [n for r in chosen[label] for n in r[phase * s["phase_steps"]:(phase + 1) * s["phase_steps"]]]
            n_by_phase.append(f"{statistics.median(picked):g}" if picked else "-")
        rows.append([label, common.median_range(p1, "{:.1f}"), common.median_range(settled, "{:.1f}"),
                     common.median_range(p2, "{:.1f}"),
                     common.median_range([a + b for a, b in zip(p1, p2)], "{:.1f}"),
                     common.median_range([t for t in times if t is not None], "{:.1f}")
                     + (f", {times.count(None)} never" if None in times else ""),
                     common.median_range([c[-1][2] for c in curves[label]], "{:.3f}"),
                     " / ".join(n_by_phase), f"{len(curves[label])}/{s['reps']}"])
    notes = [
        f"Task: the default job's (`configs/mnist1d.json`: MNIST-1D, CNN filters {base['model'].get('filters')}, "
        f"{base['optimizer']} lr {base['learning_rate']}, batch {base['batch_size']} per worker), {WORKERS} workers; "
        "`auto`: `num_backup_workers=\"auto\"` (N in [1, 6], window 50 steps, warmup "
        f"{config_lib.AdaptiveSettings.warmup}); `b = k`: N = 6 - k.",
        f"Stragglers: every worker sleeps {s['compute']:g} s before each batch plus its delay from "
        f"`{straggler(s)}` (seed 0, keyed by worker and global step): phase 1 (steps 0-{s['phase_steps'] - 1}) "
        f"Pareto delays on every worker, phase 2 (steps {s['phase_steps']}-{stop - 1}) workers 4 and 5 sleep "
        f"5 x {s['compute']:g} s, the others have no delay. The real CNN compute shares the 2 cores.",
        f"A run trains a fresh model to global step {stop}; {s['reps']} run(s) per mode on one cluster, median "
        "(min-max) over runs. Phase seconds: wall time from the first batch (all workers start together) to the "
        f"first batch end at or past the phase's last step; \"after step {SETTLED}\": phase 1 without its first "
        f"{SETTLED} steps (the first batch traces the step function on every worker at once, and the warmup "
        "waits for all 6).",
        f"Target accuracy {target:.2f} (90% of the lowest median final accuracy); its time is that of the first "
        f"snapshot at or above it (snapshots every {s['every_seconds']:g} s).",
        "Goal (issue 19): auto within 10% of the best fixed b in each phase, and faster to the target than every "
        "fixed b.",
    ] + _verdict(medians)
    columns = ["mode", "phase 1 s", f"phase 1 after step {SETTLED} s", "phase 2 s", "total s", f"s to {target:.2f}", "final test accuracy",
               "median N (phase 1 / 2)", "runs ok"]
    csv_columns = ["mode", "run", "seconds", "global_step", "test_accuracy"]
    image = None
    if not smoke and plot(os.path.join(out_dir, f"{NAME}.png"), done):
        image = os.path.join(out_dir, f"{NAME}.png")
    lines = common.write_results(out_dir, NAME, TITLE, notes, columns, rows, csv_columns, csv_rows, failures, argv,
                                 image=image)
    with open(os.path.join(out_dir, f"{NAME}_steps.json"), "w") as f:  # N and the noise estimate of every step
        json.dump({"replicas": chosen, "noise_scale": noise}, f)
    return {"lines": lines, "medians": medians, "failures": failures, "chosen": chosen}


def plot(path: str, curves: Dict[str, list]) -> bool:
    """Test accuracy against wall time, every run of every mode (False without matplotlib)."""
    series = []
    for label, runs in curves.items():
        for i, c in enumerate(runs):
            series.append((label if i == 0 else f"{label} ({i + 1})", [p[0] for p in c], [p[2] for p in c]))
    return common.plot(path, [{"xlabel": "wall time (s)", "ylabel": "test accuracy", "series": series}], TITLE)


def _verdict(medians: Dict[str, Dict[str, float]]) -> List[str]:
    """What this run says of the goal, from the medians (empty when auto or every fixed b is missing)."""
    fixed = {k: v for k, v in medians.items() if k != "auto"}
    if "auto" not in medians or not fixed:
        return []
    auto, out = medians["auto"], []
    for key, name in (("p1", "phase 1"), ("settled", f"phase 1 after step {SETTLED}"), ("p2", "phase 2")):
        best = min(fixed, key=lambda k: fixed[k][key])
        ratio = auto[key] / fixed[best][key]
        out.append(f"{name}: auto {auto[key]:.1f} s, best fixed {best} {fixed[best][key]:.1f} s: "
                   f"{ratio:.2f}x ({'within' if ratio <= 1.1 else 'not within'} 10%).")
    best = min(fixed, key=lambda k: fixed[k]["reach"])
    faster = all(auto["reach"] < v["reach"] for v in fixed.values())
    out.append(f"Time to the target: auto {auto['reach']:.1f} s, best fixed {best} {fixed[best]['reach']:.1f} s: "
               f"auto is {'faster than every fixed b' if faster else 'not faster than every fixed b'}.")
    return out
