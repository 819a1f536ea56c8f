"""Adaptive N (`num_backup_workers="auto"`) against every fixed b, under stragglers that change mid-run.

The default job's task and model (MNIST-1D, the 1-D CNN and Adam of configs/mnist1d.json, batch 32
per worker), 6 workers. Every worker sleeps `compute` seconds before each batch (besides the real
CNN compute) plus its straggler delay from a `phases` model keyed by global step (`settings`: the
full run is issue 33's 1,000 steps: a Pareto background, a slow worker on top, a worker that stalls
and comes back, a calm cluster; the quick run two phases of 120 steps). One run per seed of the
straggler draws, on one cluster per mode. A run ends at a fixed global step; the chief records when
each phase ended and snapshots its weights, which are evaluated on the test split afterwards (not
timed).
"""

import csv
import json
import math
import os
import statistics
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

from benchmarks import common
from benchmarks import time_to_accuracy
from tf_backup.protocol import config as config_lib

NAME = "adaptive"
TITLE = "Adaptive N against fixed b: time to accuracy on MNIST-1D, 6 workers, stragglers that change mid-run"
WORKERS = 6
MODES = [("auto", "auto")] + [(f"b = {b}", b) for b in range(WORKERS)]
SETTLED = 10  # phase 1 is also timed from this step on: past the start-up and the warmup
# Targets: these fractions of the lowest median final accuracy. 0.9 is reached in the first phases, where
# every b > 0 is within the seeds' spread; the higher ones ask for the later phases' progress too.
FRACTIONS = (0.9, 0.95, 0.98)
BACKGROUND = "pareto:1.5:0.02"


class Phase(NamedTuple):
    """A stretch of global steps with its straggler condition(s): `specs` are (first step in the phase, spec)."""

    name: str
    steps: int
    specs: Tuple[Tuple[int, str], ...]
    what: str  # for the notes


def settings(quick: bool, smoke: bool = False) -> Dict:
    if smoke:
        return dict(modes=MODES[:2], seeds=[0], compute=0.02, every_seconds=0.5, phases=[
            Phase("pareto", 15, ((0, BACKGROUND),), "Pareto delays on every worker"),
            Phase("slow", 15, ((0, "slow:4,5:5"),), "workers 4 and 5 5x slow")])
    if quick:
        return dict(modes=MODES[:5], seeds=[0, 1, 2], compute=0.03, every_seconds=0.5, phases=[
            Phase("pareto", 120, ((0, BACKGROUND),), "Pareto delays on every worker"),
            Phase("slow", 120, ((0, "slow:4,5:5"),), "workers 4 and 5 sleep 5x `compute`, no other delay")])
    # Issue 33's patterns: a heavy-tailed background; one worker slow for a long stretch (fleet studies:
    # 1.34x on average; here it sleeps 2x `compute`, the CNN's own time not scaled); one that stalls
    # (20x: its gradients all late, as if gone) and comes back; a calm cluster.
    return dict(modes=MODES, seeds=[0, 1, 2], compute=0.03, every_seconds=1.0, phases=[
        Phase("pareto", 250, ((0, BACKGROUND),), "Pareto delays on every worker"),
        Phase("slow", 250, ((0, f"{BACKGROUND}+slow:5:2"),), "the same, and worker 5 2x slow"),
        Phase("stall", 250, ((0, f"{BACKGROUND}+slow:3:20"), (80, BACKGROUND)),
              "the same, and worker 3 20x slow for 80 steps (all its gradients late), then back"),
        Phase("calm", 250, ((0, "none"),), "no delay at all")])


def starts(phases: List[Phase]) -> List[int]:
    """The first global step of each phase, and the step that ends the last."""
    out = [0]
    for phase in phases:
        out.append(out[-1] + phase.steps)
    return out


def straggler(s: Dict) -> str:
    """The `phases:` spec of the whole run."""
    pieces = [(start + offset, spec) for start, phase in zip(starts(s["phases"]), s["phases"])
              for offset, spec in phase.specs]
    return "phases:" + ";".join([pieces[0][1]] + [f"{step}:{spec}" for step, spec in pieces[1:]])


def run(out_dir: str, quick: bool, argv: List[str], smoke: bool = False, modes: Optional[List[str]] = None) -> Dict:
    """`modes`: a subset of "auto" and "0".."5" (the fixed b's) to run; default all of the settings'."""
    import tf_backup  # pylint: disable=g-import-not-at-top
    from benchmarks import accuracy_workload  # pylint: disable=g-import-not-at-top

    s = settings(quick, smoke)
    if modes:
        s["modes"] = [(label, b) for label, b in MODES if str(b) in modes]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "mnist1d.json")) as f:
        base = json.load(f)
    phases, bounds = s["phases"], starts(s["phases"])
    stop, reps = bounds[-1], len(s["seeds"])
    curves = {label: [] for label, _ in s["modes"]}
    marks = {label: [] for label, _ in s["modes"]}
    chosen = {label: [] for label, _ in s["modes"]}
    noise = {label: [] for label, _ in s["modes"]}
    changes = {label: [] for label, _ in s["modes"]}
    expected = {label: [] for label, _ in s["modes"]}
    periods = {label: [] for label, _ in s["modes"]}
    failures, csv_rows = [], []
    for label, b in s["modes"]:
        cfg = dict(base, mode="sync_backup", num_backup_workers=b, seconds=3600.0, steps=100000, reps=reps,
                   every_seconds=s["every_seconds"], straggler=straggler(s), seed=0, straggler_seeds=s["seeds"],
                   compute=s["compute"], stop_step=stop, mark_steps=[SETTLED] + bounds[1:])
        out = common.attempt(NAME, f"{label} ({reps} run(s))", failures, lambda: tf_backup.launch_local(
            accuracy_workload.accuracy_worker, WORKERS, args=(cfg,), timeout=3600))
        if out is None:
            continue
        chief = out[0]
        for curve, mark, replicas, scale, changed, times, period in zip(
                chief["runs"], chief["marks"], chief["replicas"], chief["noise_scale"], chief["change_points"],
                chief["expected_seconds"], chief["periods"]):
            curves[label].append(curve)
            marks[label].append(mark)
            chosen[label].append(replicas)
            noise[label].append(scale)
            changes[label].append(changed)
            expected[label].append(times)
            periods[label].append(period)
            k = len(curves[label])
            csv_rows += [[label, k, s["seeds"][k - 1], sec, step, acc] for sec, step, acc in curve]
            print(f"{NAME}: {label} run {k} (seed {s['seeds'][k - 1]}): phases end at "
                  f"{', '.join('-' if m is None else f'{m:.1f}' for m in mark[1:])} s, "
                  f"accuracy {curve[-1][2]:.3f}", flush=True)
    done = {k: v for k, v in curves.items() if v}
    finals = {k: statistics.median(c[-1][2] for c in v) for k, v in done.items()}
    target = round(0.9 * min(finals.values()), 2) if finals else float("nan")

    def between(label, first, last):  # seconds from mark `first` (None: the start) to mark `last`
        return [m[last] - (0.0 if first is None else m[first]) for m in marks[label]
                if m[last] is not None and (first is None or m[first] is not None)]

    def reach(label):
        return [time_to_accuracy.first_reach(c, target, 0) for c in curves[label]]

    def phase_seconds(label):  # per phase, per run; marks: [SETTLED, end of phase 1, ..., end of the last]
        return [between(label, None if i == 0 else i, i + 1) for i in range(len(phases))]

    rows, medians = [], {}
    blank = ["-"] * (len(phases) + 5)
    for label, _ in s["modes"]:
        if not curves[label]:
            rows.append([label] + blank + [f"0/{reps}"])
            continue
        per_phase, settled = phase_seconds(label), between(label, 0, 1)
        times = reach(label)
        if not all(per_phase):
            rows.append([label] + blank + [f"0/{reps} reached step {stop}"])
            continue
        totals = [sum(run_phases) for run_phases in zip(*per_phase)]
        medians[label] = dict(phases=[statistics.median(p) for p in per_phase], settled=statistics.median(settled),
                              total=statistics.median(totals))
        n_by_phase = []
        for first, last in zip(bounds, bounds[1:]):
            picked = [n for r in chosen[label] for n in r[first:last]]
            n_by_phase.append(f"{statistics.median(picked):g}" if picked else "-")
        cells = [common.median_range(p, "{:.1f}") for p in per_phase]
        rows.append([label, cells[0], common.median_range(settled, "{:.1f}")] + cells[1:]
                    + [common.median_range(totals, "{:.1f}"),
                       common.median_range([t for t in times if t is not None], "{:.1f}")
                       + (f", {times.count(None)} never" if None in times else ""),
                       common.median_range([c[-1][2] for c in curves[label]], "{:.3f}"),
                       " / ".join(n_by_phase), f"{len(curves[label])}/{reps}"])
    described = "; ".join(f"{p.name} (steps {first}-{last - 1}): {p.what}"
                          for p, first, last in zip(phases, bounds, bounds[1:]))
    notes = [
        f"Task: the default job's (`configs/mnist1d.json`: MNIST-1D, CNN filters {base['model'].get('filters')}, "
        f"{base['optimizer']} lr {base['learning_rate']}, batch {base['batch_size']} per worker), {WORKERS} workers; "
        "`auto`: `num_backup_workers=\"auto\"` (N in [1, 6], window 50 steps, warmup "
        f"{config_lib.AdaptiveSettings.warmup}); `b = k`: N = 6 - k.",
        f"Stragglers: every worker sleeps {s['compute']:g} s before each batch plus its delay from "
        f"`{straggler(s)}` (keyed by worker and global step; seed {', '.join(map(str, s['seeds']))}, one run "
        f"each): {described}. The real CNN compute shares the 2 cores.",
        f"A run trains a fresh model to global step {stop}; {reps} run(s) per mode on one cluster, median "
        "(min-max) over runs. Phase seconds: wall time from the phase's first batch end (the run's first batch, "
        "all workers starting together) to the first batch end at or past the phase's last step; "
        f"\"{phases[0].name} after step {SETTLED}\": the first phase without its first {SETTLED} steps (the first "
        "batch traces the step function on every worker at once, and the warmup waits for all 6).",
        f"Target accuracy {target:.2f} (90% of the lowest median final accuracy); its time is that of the first "
        f"snapshot at or above it (snapshots every {s['every_seconds']:g} s).",
        "Goal (issue 33): auto within 1.0x of the best fixed b in every phase, and first to the target among all "
        "modes.",
    ] + _verdict(medians, [p.name for p in phases])
    columns = (["mode", f"{phases[0].name} s", f"{phases[0].name} after step {SETTLED} s"]
               + [f"{p.name} s" for p in phases[1:]] + ["total s", f"s to {target:.2f}", "final test accuracy",
                  f"median N ({' / '.join(p.name for p in phases)})", "runs ok"])
    csv_columns = ["mode", "run", "seed", "seconds", "global_step", "test_accuracy"]
    notes += ["", "Seconds to higher targets (the same runs; `reach_table`):", ""] + reach_table(done)
    weighted = progress_table(bounds, [p.name for p in phases], chosen, noise, marks)
    if weighted:
        notes += ["", "Seconds per phase per 100 units of progress (`progress_table`):", ""] + weighted
    changed = change_table(bounds, [p.name for p in phases], changes.get("auto", []))
    if changed:
        notes += ["", "`auto`'s change points in the workers' compute times (`change_table`):", ""] + changed
    foreseen = expectation_table(bounds, [p.name for p in phases], chosen.get("auto", []), expected.get("auto", []),
                                 periods.get("auto", []))
    if foreseen:
        notes += ["", "`auto`'s expected step times against the measured ones (`expectation_table`):", ""] + foreseen
    image = None
    if not smoke and plot(os.path.join(out_dir, f"{NAME}.png"), done):
        image = os.path.join(out_dir, f"{NAME}.png")
    lines = common.write_results(out_dir, NAME, TITLE, notes, columns, rows, csv_columns, csv_rows, failures, argv,
                                 image=image)
    # Per step: N, the noise estimate, the workers whose compute times had a change point, the step
    # times the rule expected per N (auto), the chief's seconds from one publish to the next.
    with open(os.path.join(out_dir, f"{NAME}_steps.json"), "w") as f:
        json.dump({"replicas": chosen, "noise_scale": noise, "change_points": changes,
                   "expected_seconds": rounded(expected), "periods": rounded(periods), "phase_starts": bounds,
                   "phase_names": [p.name for p in phases], "marks": marks}, f)
    return {"lines": lines, "medians": medians, "failures": failures, "chosen": chosen}


def reach_table(curves: Dict[str, list], fractions=FRACTIONS, targets: Optional[List[float]] = None) -> List[str]:
    """Markdown lines: per target (a fraction of the lowest median final accuracy), each mode's seconds to it.

    `curves`: per mode, per run, (seconds, global step, test accuracy) snapshots. A cell is the median
    (min-max) over runs, "never" counted as infinite in the median; the last column says whether
    auto was first (its median below every fixed b's). `targets`: accuracies instead of fractions
    (to compare runs whose lowest final accuracies differ).
    """
    finals = {k: statistics.median(c[-1][2] for c in v) for k, v in curves.items() if v}
    if not finals:
        return []
    lowest = min(finals.values())
    labels = list(finals)
    lines = ["| target | " + " | ".join(labels) + " | auto first |", "|---" * (len(labels) + 2) + "|"]
    wanted = ([(t, f"{t:.2f}") for t in targets] if targets else
              [(round(f * lowest, 2), f"{round(f * lowest, 2):.2f} ({f:g} x {lowest:.3f})") for f in fractions])
    for target, name in wanted:  # a fraction's target is rounded as the main table's is
        times = {k: [time_to_accuracy.first_reach(c, target, 0) for c in curves[k]] for k in labels}
        medians = {k: statistics.median([math.inf if t is None else t for t in v]) for k, v in times.items()}
        cells = ["never" if all(t is None for t in v) else
                 common.median_range([t for t in v if t is not None], "{:.1f}")
                 + (f", {v.count(None)} never" if None in v else "") for v in times.values()]
        fixed = [m for k, m in medians.items() if k != "auto"]
        first = "-" if "auto" not in medians or not fixed else ("yes" if medians["auto"] < min(fixed) else "no")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {first} |")
    return lines


def progress_table(bounds: List[int], names: List[str], chosen: Dict[str, list], noise: Dict[str, list],
                   marks: Dict[str, list]) -> List[str]:
    """Markdown lines: per mode and phase, seconds per 100 units of progress (empty without auto's runs).

    Seconds for a fixed number of steps favour the smallest N wherever the cores are shared (a step
    of fewer gradients is faster even with no stragglers, and makes less progress). Here each step
    counts `progress(N) / progress(WORKERS)` units (`tf_backup.protocol.adaptive.progress`, the rule's
    own model, as in `benchmarks/adaptive_sim.py`), with the simple noise scale B that auto's chief
    measured in that phase of the run of the same seed (its median over the phase's steps; Adam's
    factor is 1). `chosen`: per mode, per run, every step's N; `noise`: auto's per-step estimates;
    `marks`: per mode, per run, the seconds at step `SETTLED`, then at each phase's end (`bounds`).
    A cell is the median over runs (x: against the best fixed b of that phase).
    """
    from tf_backup.protocol import adaptive as rule  # pylint: disable=g-import-not-at-top
    if not noise.get("auto") or not any(chosen.get(k) for k in chosen if k != "auto"):
        return []
    scale = [[statistics.median([b for b in run[first:last] if b is not None] or [math.inf])
              for first, last in zip(bounds, bounds[1:])] for run in noise["auto"]]
    cells: Dict[str, List[float]] = {}
    for label, runs in chosen.items():
        per_phase = [[] for _ in names]
        for k, (ns, mark) in enumerate(zip(runs, marks[label])):
            if k >= len(scale) or any(m is None for m in mark[1:]):
                continue
            ends = [0.0] + list(mark[1:])
            for i, (first, last) in enumerate(zip(bounds, bounds[1:])):
                b = scale[k][i]
                units = sum(rule.progress(n, b, 1) / rule.progress(WORKERS, b, 1) for n in ns[first:last])
                if units > 0:
                    per_phase[i].append(100.0 * (ends[i + 1] - ends[i]) / units)
        if all(per_phase):
            cells[label] = [statistics.median(v) for v in per_phase]
    fixed = {k: v for k, v in cells.items() if k != "auto"}
    if not fixed:
        return []
    best = [min(v[i] for v in fixed.values()) for i in range(len(names))]
    lines = ["| mode | " + " | ".join(f"{n} s/100" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, v in cells.items():
        lines.append(f"| {label} | " + " | ".join(f"{x:.2f} ({x / best[i]:.2f}x)" for i, x in enumerate(v)) + " |")
    return lines


def curves_from_csv(path: str) -> Dict[str, list]:
    """The `curves` of a run from its CSV (`run`'s `adaptive.csv`)."""
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    runs: Dict[Tuple[str, str], list] = {}
    for r in rows:
        runs.setdefault((r["mode"], r["run"]), []).append(
            (float(r["seconds"]), int(r["global_step"]), float(r["test_accuracy"])))
    curves: Dict[str, list] = {}
    for (label, _), curve in runs.items():
        curves.setdefault(label, []).append(curve)
    return curves


def plot(path: str, curves: Dict[str, list]) -> bool:
    """Test accuracy against wall time, every run of every mode (False without matplotlib)."""
    series = []
    for label, runs in curves.items():
        for i, c in enumerate(runs):
            series.append((label if i == 0 else f"{label} ({i + 1})", [p[0] for p in c], [p[2] for p in c]))
    return common.plot(path, [{"xlabel": "wall time (s)", "ylabel": "test accuracy", "series": series}], TITLE)


def _verdict(medians: Dict[str, Dict], names: List[str]) -> List[str]:
    """What this run says of the goal, from the medians (empty when auto or every fixed b is missing).

    Per phase in raw seconds only: they favour the smallest N on shared cores, so whether the per-phase
    goal is met is read from `progress_table`, not from these lines.
    """
    fixed = {k: v for k, v in medians.items() if k != "auto"}
    if "auto" not in medians or not fixed:
        return []
    auto, out = medians["auto"], []
    picks = [(name, lambda m, i=i: m["phases"][i]) for i, name in enumerate(names)]
    picks.insert(1, (f"{names[0]} after step {SETTLED}", lambda m: m["settled"]))
    for name, pick in picks:
        best = min(fixed, key=lambda k: pick(fixed[k]))
        ratio = pick(auto) / pick(fixed[best])
        out.append(f"{name}, raw seconds: auto {pick(auto):.1f} s, best fixed {best} {pick(fixed[best]):.1f} s: "
                   f"{ratio:.2f}x.")
    return out  # whether auto is first to each target: `reach_table`'s last column


def change_table(bounds: List[int], names: List[str], changes: List[List[List[int]]]) -> List[str]:
    """Markdown lines: per phase, auto's change points (`StepRecord.change_points`); empty if there is none.

    `changes`: per run, per step, the workers whose compute times had a change point. A cell is the
    median over runs of the change points in the phase, then of the steps from the phase's first
    step to its first change point ("-": none in that run; the median of the runs that had one).
    """
    if not any(workers for run in changes for workers in run):
        return []
    lines = ["| phase | change points (median of runs) | steps to the first (median) | runs with one |",
             "|---|---|---|---|"]
    for name, first, last in zip(names, bounds, bounds[1:]):
        counts = [sum(len(w) for w in run[first:last]) for run in changes]
        firsts = [next(i for i, w in enumerate(run[first:last]) if w) for run in changes if any(run[first:last])]
        first_cell = f"{statistics.median(firsts):g}" if firsts else "-"
        lines.append(f"| {name} | {statistics.median(counts):g} | {first_cell} | {len(firsts)}/{len(changes)} |")
    return lines


def rounded(x, digits: int = 5):
    """`x` (floats in nested lists and dicts) rounded to `digits` decimals: 10 us is finer than any step time here."""
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v, digits) for v in x]
    return round(x, digits) if isinstance(x, float) and math.isfinite(x) else x


def expectation_table(bounds: List[int], names: List[str], replicas: List[List[int]],
                      expected: List[List[List[float]]], periods: List[List[float]], n_min: int = 1) -> List[str]:
    """Markdown lines: per phase and N, the step time auto's rule expected for N against the period measured.

    Per run, `replicas[i]` is step i's N, chosen after step i - 1 from `expected[i - 1]` (E[T_(n)]
    for n = n_min, ...; empty: the warmup); `periods[i]` the chief's seconds from one publish to
    the next. A row pools the steps of every run with that N in the phase: their count, the median
    expected time for that N and for N + 1 (what one more gradient was expected to cost), the
    median measured period, and measured / expected. Empty if nothing was expected.
    """
    if not any(e for run in expected for e in run):
        return []
    lines = ["| phase | N | steps | expected s (N) | expected s (N + 1) | measured s | measured / expected |",
             "|---|---|---|---|---|---|---|"]
    for name, first, last in zip(names, bounds, bounds[1:]):
        rows: Dict[int, List[Tuple[float, float, float]]] = {}
        for n_run, e_run, p_run in zip(replicas, expected, periods):
            for i in range(max(first, 1), min(last, len(n_run), len(p_run))):
                e, n = e_run[i - 1], n_run[i]
                if e and 0 <= n - n_min < len(e):
                    more = e[n - n_min + 1] if n - n_min + 1 < len(e) else math.nan
                    rows.setdefault(n, []).append((e[n - n_min], more, p_run[i]))
        for n in sorted(rows):
            got = rows[n]
            med = [statistics.median(x[k] for x in got) for k in range(3)]
            more = "-" if math.isnan(med[1]) else f"{med[1]:.3f}"
            lines.append(f"| {name} | {n} | {len(got)} | {med[0]:.3f} | {more} | {med[2]:.3f} | "
                         f"{med[2] / med[0]:.2f} |")
    return lines


def progress_table_from_json(path: str) -> List[str]:
    """`progress_table` of a run from its step record (`run`'s `adaptive_steps.json`), then its `change_table`."""
    with open(path) as f:
        d = json.load(f)
    lines = progress_table(d["phase_starts"], d["phase_names"], d["replicas"], d["noise_scale"], d["marks"])
    changes = change_table(d["phase_starts"], d["phase_names"], d.get("change_points", {}).get("auto", []))
    expected = expectation_table(d["phase_starts"], d["phase_names"], d["replicas"].get("auto", []),
                                 d.get("expected_seconds", {}).get("auto", []), d.get("periods", {}).get("auto", []))
    return lines + ([""] + changes if changes else []) + ([""] + expected if expected else [])


if __name__ == "__main__":
    # `python -m benchmarks.adaptive PATH.csv [FRACTION ...] [--targets=ACC,ACC]`: a committed run's times to
    # targets (fractions of its lowest median final accuracy, or accuracies); `... PATH_steps.json`: its
    # seconds per phase per 100 units of progress.
    if sys.argv[1].endswith(".json"):
        print("\n".join(progress_table_from_json(sys.argv[1])))
        sys.exit(0)
    args = [a for a in sys.argv[1:] if not a.startswith("--targets=")]
    at = [float(t) for a in sys.argv[1:] if a.startswith("--targets=") for t in a.split("=", 1)[1].split(",")]
    print("\n".join(reach_table(curves_from_csv(args[0]), [float(f) for f in args[1:]] or FRACTIONS, at or None)))
