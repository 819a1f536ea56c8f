"""Issue 20, part 4: tf_backup against MultiWorkerMirroredStrategy when stragglers exist.

Both run as real localhost clusters: every worker sleeps `compute` seconds before each batch (the
step's compute) plus a seeded `pareto` delay keyed by worker and global step. MWMS (4 workers)
waits for all of them every step; tf_backup runs N = 4 with b = 0, 1, 2 (4 + b workers).

1. Step time, with the overhead benchmark's MLP (about 1e4 parameters, batch 32 per worker, SGD):
   seconds per global step over a timed fit (after a warm-up fit), from worker 0's batch ends and
   the global step in its logs.
2. Time to accuracy, with the default job's task (MNIST-1D, the CNN and Adam of
   configs/mnist1d.json, batch 32 per worker): every run trains a fresh model for the same number of
   global steps; the chief's snapshots are evaluated on the test split after training
   (`accuracy_workload.accuracy_worker`).
"""

import json
import math
import os
import statistics
from typing import Dict, List

import numpy as np

from benchmarks import common
from benchmarks import scale_sim
from benchmarks import time_to_accuracy

NAME = "vs_mwms_stragglers"
TITLE = "tf_backup vs MultiWorkerMirroredStrategy under stragglers: step time and time to accuracy, N = 4"


def settings(quick: bool, smoke: bool = False) -> Dict:
    # accuracy_steps: global steps of every time-to-accuracy run; accuracy_reps: runs per system.
    if smoke:
        return dict(backups=[1], restart_backups=[], reps=2, steps=15, compute=0.05, straggler="pareto:1.5:0.05",
                    accuracy_steps=10, accuracy_reps=1)
    if quick:
        return dict(backups=[0, 1, 2], restart_backups=[1], reps=3, steps=40, compute=0.1, straggler="pareto:1.5:0.05",
                    accuracy_steps=120, accuracy_reps=3)
    return dict(backups=[0, 1, 2], restart_backups=[1], reps=5, steps=100, compute=0.1, straggler="pareto:1.5:0.05",
                accuracy_steps=300, accuracy_reps=5)


def run(out_dir: str, quick: bool, argv: List[str], smoke: bool = False) -> Dict:
    from benchmarks import mlp_task  # pylint: disable=g-import-not-at-top
    from benchmarks import overhead_workload  # pylint: disable=g-import-not-at-top

    s = settings(quick, smoke)
    hidden = mlp_task.hidden_for_params(1e4)
    base = dict(hiddens=[hidden], steps=s["steps"], reps=s["reps"], compute=s["compute"], straggler=s["straggler"],
                per_global_step=True)
    cells = [("MWMS", "mwms", 4, 0)] + [(f"tf_backup b = {b}", "tf_backup", 4 + b, b) for b in s["backups"]]
    restart = [(f"tf_backup b = {b}, restart", "tf_backup", 4 + b, b) for b in s["restart_backups"]]
    times, failures, csv_rows = {}, [], []
    for label, system, workers, b in cells + restart:
        cancel = "restart" if label.endswith("restart") else False
        out = common.attempt(NAME, f"{label} ({s['reps']} fits)", failures, lambda: overhead_workload.launch_overhead(
            system, workers, dict(base, system=system, num_backup_workers=b, cancel=cancel)))
        if out is None:
            continue
        times[label] = [rep[0] for rep in out[0][hidden]]
        csv_rows += [[label, workers, k + 1, t] for k, t in enumerate(times[label])]
        print(f"{NAME}: {label}: {', '.join(f'{1e3 * t:.0f}' for t in times[label])} ms per step", flush=True)
    mwms = statistics.median(times["MWMS"]) if "MWMS" in times else None
    ideal = {label: ideal_step_seconds(s, workers, restart=label.endswith("restart"))
             for label, _, workers, _ in cells + restart}
    rows = []
    for label, system, workers, b in cells + restart:
        order, event = ideal[label]
        ideal_ratios = [f"{x / ideal['MWMS'][k]:.2f}" for k, x in enumerate((order, event))]
        if label not in times:
            rows.append([label, workers, "failed", "-", f"{1e3 * order:.0f}", f"{1e3 * event:.0f}",
                         " / ".join(ideal_ratios), "-", f"0/{s['reps']}"])
            continue
        med = statistics.median(times[label])
        ratio = med / mwms if mwms else None
        rows.append([label, workers, common.median_range([1e3 * t for t in times[label]], "{:.0f}"),
                     f"{ratio:.2f}" if ratio else "-", f"{1e3 * order:.0f}", f"{1e3 * event:.0f}",
                     " / ".join(ideal_ratios),
                     " / ".join(f"{ratio / (x / ideal['MWMS'][k]):.2f}" for k, x in enumerate((order, event)))
                     if ratio else "-", f"{len(times[label])}/{s['reps']}"])
    notes = [
        "## Step time",
        "",
        f"Model: a 40-{hidden}-{hidden}-10 MLP ({mlp_task.mlp_params(hidden):,} parameters), batch 32 per worker, "
        "SGD(0.01), random data (each worker its own).",
        f"Stragglers: every worker sleeps {s['compute']:g} s (its compute) plus a `{s['straggler']}` delay (seed 0, "
        "keyed by worker and global step) before each batch. MWMS: 4 workers, every step waits for all; "
        "tf_backup: N = 4 of 4 + b workers, 1 ps task.",
        f"Seconds per global step over each of {s['reps']} timed fits of {s['steps']} batches (after a warm-up "
        "fit), from worker 0's batch ends and global steps; median (min-max). Ratio: ours / MWMS, medians of "
        "this run.",
        "Ideal (no communication, from the same seeded delays of the steps the fits ran, "
        f"{IDEAL_FIRST_STEP} to {IDEAL_FIRST_STEP} + {s['reps']} x {s['steps']} x workers / 4): "
        "*order statistic*: each step lasts the 4th-fastest worker's compute + delay, every worker starting "
        "each step afresh (Chen et al.; `tf_backup.sim.ideal_step_times`); *event model*: the protocol's "
        "timing with zero communication (`benchmarks.scale_sim.sync_steps`): a dropped worker finishes its "
        "sleep, then starts the newest step, as the benchmark's workers do (no cancel); in the *restart* rows "
        "every worker still computing an older step starts the new one at its publish (the workers' sleeps "
        "are cut, `sleep_unless_superseded`, and `restart_superseded` pulls the new step). Ideal ratio: the "
        "ideal of ours / the ideal of MWMS; measured / ideal: our measured ratio over it (1.00 = all of "
        "the ideal's gain).",
        "Targets: ours <= 0.6x MWMS's step time at b >= 1 (issue 20); at b = 1, within 1.05x of the ideal "
        "ratio (issue 31).",
    ]
    columns = ["system", "workers", "ms per global step", "ratio to MWMS", "ideal ms (order stat.)",
               "ideal ms (event model)", "ideal ratio (order / event)", "measured / ideal (order / event)",
               "fits ok"]
    accuracy = _time_to_accuracy(out_dir, s, cells, failures, argv)
    lines = common.write_results(out_dir, NAME, TITLE, notes, columns, rows,
                                 ["system", "workers", "fit", "seconds_per_step"], csv_rows, failures, argv,
                                 extra=accuracy["lines"], image=accuracy["image"])
    return {"lines": lines, "times": times, "curves": accuracy["curves"], "failures": failures}


IDEAL_FIRST_STEP = 3  # the warm-up fit's steps (`step_timing.timed_fits`); the timed fits start there


def ideal_step_seconds(s: Dict, workers: int, restart: bool = False):
    """(order statistic, event model) ideal seconds per global step of N = 4 of `workers`, without communication.

    With `restart`, the event model restarts a worker still computing an older step at each publish (the
    benchmark's `cancel="restart"` rows: `restart_superseded`).

    Both from the benchmark's own seeded delays (`s["straggler"]`, seed 0, keyed by worker and global step, as
    `pacing.make_sleep_callback` sleeps them) over the global steps its timed fits ran: worker 0's
    `reps x steps` batches are about `reps x steps x workers / 4` global steps (each step takes 4 of the
    workers' gradients).
    """
    from tf_backup.sim import stragglers  # pylint: disable=g-import-not-at-top
    model = stragglers.parse(s["straggler"], seed=0)
    count = s["reps"] * s["steps"] * workers // 4
    delays = model.delays(workers, IDEAL_FIRST_STEP + count)[IDEAL_FIRST_STEP:]
    order = float(np.mean(stragglers.ideal_step_times(s["compute"] + delays, 4)))
    timeline = scale_sim.sync_steps(lambda w, step: model.delay(w, step), workers, 4, s["compute"], 0.0,
                                    restart=restart, start_step=IDEAL_FIRST_STEP)
    published = [next(timeline).published for _ in range(count)]
    return order, published[-1] / count


def _time_to_accuracy(out_dir: str, s: Dict, cells, failures: List[str], argv: List[str]) -> Dict:
    """Part 2: every system trains the default job's CNN for `accuracy_steps` global steps, `accuracy_reps` runs.

    Returns the Markdown lines of its table (and writes `<NAME>_accuracy.csv`, the curves).
    """
    import tf_backup  # pylint: disable=g-import-not-at-top
    from benchmarks import launcher  # pylint: disable=g-import-not-at-top
    from benchmarks import accuracy_workload  # pylint: disable=g-import-not-at-top

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "mnist1d.json")) as f:
        base = json.load(f)
    steps, reps = s["accuracy_steps"], s["accuracy_reps"]
    curves, csv_rows = {}, []
    for label, system, workers, b in cells:
        cfg = dict(base, system=system, mode="sync" if b == 0 else "sync_backup", num_backup_workers=b,
                   steps=100000, stop_step=steps, reps=reps, every_seconds=0.5, straggler=s["straggler"],
                   compute=s["compute"], seed=0)
        if system == "mwms":
            launch = lambda cfg=cfg: launcher.launch(  # noqa: E731
                accuracy_workload.accuracy_worker, {"worker": workers}, args=(cfg,), timeout=1200)
        else:
            cfg["seconds"] = math.inf
            launch = lambda cfg=cfg, workers=workers: tf_backup.launch_local(  # noqa: E731
                accuracy_workload.accuracy_worker, workers, args=(cfg,), timeout=1200)
        out = common.attempt(NAME, f"{label}, time to accuracy ({reps} runs)", failures, launch)
        if out is None:
            continue
        curves[label] = out[0]["runs"]
        for k, curve in enumerate(curves[label]):
            csv_rows += [[label, workers, k + 1, sec, step, acc] for sec, step, acc in curve]
            print(f"{NAME}: {label} run {k + 1}: {curve[-1][0]:.1f} s, {curve[-1][1]} steps, "
                  f"accuracy {curve[-1][2]:.3f}", flush=True)
    finals = {k: statistics.median(c[-1][2] for c in v) for k, v in curves.items()}
    target = round(0.9 * min(finals.values()), 2) if finals else float("nan")

    def reach(label, index):
        return [time_to_accuracy.first_reach(c, target, index) for c in curves.get(label, [])]

    def median_reach(label):
        times = [math.inf if t is None else t for t in reach(label, 0)]
        return statistics.median(times) if times else None

    mwms = median_reach("MWMS")
    rows = []
    for label, _, workers, _ in cells:
        v = curves.get(label, [])
        if not v:
            rows.append([label, workers, "failed", "-", "-", "-", "-", f"0/{reps}"])
            continue
        times, step_counts = reach(label, 0), reach(label, 1)
        mine = median_reach(label)
        ratio = f"{mine / mwms:.2f}" if mwms and math.isfinite(mwms) and math.isfinite(mine) else "-"
        rows.append([label, workers, common.median_range([c[-1][0] for c in v], "{:.1f}"),
                     common.median_range([c[-1][2] for c in v], "{:.3f}"),
                     common.median_range([t for t in times if t is not None], "{:.1f}")
                     + (f", {times.count(None)} never" if None in times else ""),
                     common.median_range([t for t in step_counts if t is not None], "{:.0f}"), ratio,
                     f"{len(v)}/{reps}"])
    head = common.header(TITLE, argv)
    common.write_csv(os.path.join(out_dir, f"{NAME}_accuracy.csv"), head,
                     ["system", "workers", "run", "seconds", "global_step", "test_accuracy"], csv_rows)
    lines = [
        "## Time to accuracy",
        "",
        f"Task: the default job's (`configs/mnist1d.json`: MNIST-1D, CNN filters {base['model'].get('filters')}, "
        f"{base['optimizer']} lr {base['learning_rate']}, batch {base['batch_size']} per worker), the same sleeps "
        "as above. Each run trains a fresh model for "
        f"{steps} global steps (N = 4 gradients each); {reps} run(s) per system in one cluster; the clock starts "
        "when every worker has reached the run's first batch (a barrier; the first step's tracing is inside). "
        "The chief's weights every 0.5 s are evaluated on the test split after training.",
        f"Target accuracy {target:.2f} (90% of the lowest median final accuracy); its time and steps are those "
        "of the first snapshot at or above it; ratio: median time to the target, ours / MWMS, this run. "
        "Wall s: to the end of the chief's fit.",
        "",
    ] + common.table(["system", "workers", "wall s", "final test accuracy", f"s to {target:.2f}",
                      f"steps to {target:.2f}", "time ratio to MWMS", "runs ok"], rows) + [
        "", f"Curves: `{NAME}_accuracy.csv`.", ""]
    image = None
    if curves:
        path = os.path.join(out_dir, f"{NAME}.png")
        by_time = [(label, [p[0] for p in v[0]], [p[2] for p in v[0]]) for label, v in curves.items()]
        by_step = [(label, [p[1] for p in v[0]], [p[2] for p in v[0]]) for label, v in curves.items()]
        if common.plot(path, [{"xlabel": "wall time (s)", "ylabel": "test accuracy", "series": by_time},
                              {"xlabel": "global step", "ylabel": "test accuracy", "series": by_step}],
                       "MNIST-1D under Pareto stragglers: MWMS vs tf_backup (first run of each)"):
            image = path
    return {"lines": lines, "curves": curves, "image": image}
