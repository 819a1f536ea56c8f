"""Item 1: the trade-off of b (the paper's central figure), achieved against ideal step time.

N = 4 gradients per step, b = 0..3 backup workers (N + b worker processes, 1 ps), every worker
sleeping `compute + delay(worker, global step)` before each batch with a Pareto (Lomax) delay
seeded identically for every b. The ideal step time of a step is the N-th smallest of the N + b
workers' times (`tf_backup.stragglers.ideal_step_times`); achieved step time is the time between
two consecutive global steps published by the chief.
"""

import statistics
from typing import Dict, List

import numpy as np

from benchmarks import common

NAME = "tradeoff"
TITLE = "Trade-off of b: step time with N = 4 and b backup workers, achieved vs ideal"


def settings(quick: bool, smoke: bool = False) -> Dict:
    if smoke:
        return dict(n=4, bs=[1], clusters=1, reps=3, steps=8, compute=0.1, straggler="pareto:1.5:0.05")
    if quick:
        return dict(n=4, bs=[0, 1, 2, 3], clusters=1, reps=3, steps=10, compute=0.1,
                    straggler="pareto:1.5:0.05")
    return dict(n=4, bs=[0, 1, 2, 3], clusters=3, reps=1, steps=60, compute=0.2,
                straggler="pareto:1.5:0.1")


def run(out_dir: str, quick: bool, argv: List[str], smoke: bool = False) -> Dict:
    import tf_backup  # pylint: disable=g-import-not-at-top
    from tf_backup import stragglers  # pylint: disable=g-import-not-at-top
    from benchmarks import workloads  # pylint: disable=g-import-not-at-top

    s = settings(quick, smoke)
    n, seed, hidden = s["n"], 0, workloads.hidden_for_params(1e4)
    model = stragglers.parse(s["straggler"], seed=seed)
    per_b = {b: {"mean": [], "p90": [], "ideal_mean": [], "ideal_p90": [], "ratio": [], "ratio_p90": [],
                 "replay_mean": [], "ratio_replay": [], "dropped": []} for b in s["bs"]}
    failures = []
    csv_rows = []
    for cluster in range(s["clusters"]):  # interleave b, so drifting machine load hits every b alike
        for b in s["bs"]:
            cfg = dict(num_backup_workers=b, hidden=hidden, compute=s["compute"],
                       straggler=s["straggler"], seed=seed, steps=s["steps"], reps=s["reps"])
            try:
                out = tf_backup.launch_local(workloads.tf_backup_worker, n + b, args=(cfg,), timeout=600)
            except Exception as e:  # pylint: disable=broad-except
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                failures.append(f"b = {b}, cluster {cluster + 1} ({s['reps']} run(s)): {msg}")
                print(f"{NAME}: b = {b}: FAILED: {msg}", flush=True)
                continue
            chief = out[0]
            for rep_index, rep in enumerate(chief["reps"]):
                durations = workloads.step_durations(chief["history"], rep["start_step"], s["steps"])
                steps = sorted(durations)
                if not steps:
                    failures.append(f"b = {b}, cluster {cluster + 1}, rep {rep_index + 1}: no steady steps")
                    continue
                delays = model.delays(n + b, max(steps) + 1)[steps]
                ideal = stragglers.ideal_step_times(s["compute"] + delays, n)
                achieved = np.array([durations[k] for k in steps])
                pub = workloads.simulate_protocol(model.delay, n, n + b, s["compute"], rep["start_step"],
                                                  max(steps) - rep["start_step"] + 1)
                replay = np.array([pub[k] - pub[k - 1] for k in steps])
                r = per_b[b]
                r["mean"].append(achieved.mean())
                r["p90"].append(float(np.quantile(achieved, 0.9)))
                r["ideal_mean"].append(ideal.mean())
                r["ideal_p90"].append(float(np.quantile(ideal, 0.9)))
                r["ratio"].append(achieved.mean() / ideal.mean())
                r["ratio_p90"].append(r["p90"][-1] / r["ideal_p90"][-1])
                r["replay_mean"].append(replay.mean())
                r["ratio_replay"].append(achieved.mean() / replay.mean())
                csv_rows.append([b, n + b, cluster + 1, rep_index + 1, len(steps), achieved.mean(),
                                 r["p90"][-1], ideal.mean(), r["ideal_p90"][-1], r["ratio"][-1],
                                 r["ratio_p90"][-1], replay.mean(), r["ratio_replay"][-1],
                                 sum(chief["stats"]["dropped"])])
                print(f"{NAME}: b = {b} run {len(r['mean'])}: mean {achieved.mean() * 1e3:.0f} ms "
                      f"(ideal {ideal.mean() * 1e3:.0f} ms), achieved/ideal {r['ratio'][-1]:.3f}", flush=True)
            per_b[b]["dropped"].append(sum(chief["stats"]["dropped"]))
    runs = s["clusters"] * s["reps"]
    ms = lambda v: common.median_range([x * 1e3 for x in v], "{:.0f}")  # noqa: E731
    rows = []
    for b in s["bs"]:
        r = per_b[b]
        rows.append([b, n + b, ms(r["mean"]), ms(r["ideal_mean"]), common.median_range(r["ratio"], "{:.3f}"),
                     ms(r["p90"]), ms(r["ideal_p90"]), common.median_range(r["ratio_p90"], "{:.3f}"),
                     ms(r["replay_mean"]), common.median_range(r["ratio_replay"], "{:.3f}"),
                     f"{len(r['mean'])}/{runs}"])
    worst = max((statistics.median(per_b[b]["ratio"]) for b in s["bs"] if per_b[b]["ratio"]), default=float("nan"))
    worst_replay = max((statistics.median(per_b[b]["ratio_replay"]) for b in s["bs"] if per_b[b]["ratio"]),
                       default=float("nan"))
    notes = [
        f"N = {n} gradients per step, b backup workers (N + b worker processes + 1 ps), a "
        f"{workloads.INPUT_DIM}-{hidden}-{hidden}-10 MLP ({workloads.mlp_params(hidden)} parameters), batch 32, SGD.",
        f"Each worker **sleeps** {s['compute']:g} s of simulated compute plus a straggler delay before each "
        f"batch (`{s['straggler']}`, {model.describe()}); the delay is a pure function of (seed, worker, "
        "global step), so every b sees the same delays. Sleeping instead of computing keeps the figures "
        "independent of how the processes share the cores.",
        "Achieved: time between consecutive global steps published by the chief (the first step of each "
        f"timed fit and the last one are left out). Ideal: per step, the N-th smallest of the N + b "
        f"workers' times ({s['compute']:g} s + delay), i.e. no communication, no real compute, no overhead.",
        f"A run is one timed fit of {s['steps']} batches per worker; {s['clusters']} fresh cluster(s) per b with "
        f"{s['reps']} timed fit(s) each (after a warm-up fit); median (min–max) over the runs.",
        "Replay: a zero-overhead replay of the same protocol with the same delays in which, as in tf_backup "
        "and TF1, a late worker is not cancelled: it finishes its stale batch (its gradient is dropped) "
        "before starting on the current step, so a long stall also keeps it out of the next steps "
        "(`benchmarks.workloads.simulate_protocol`). ideal <= replay <= achieved: replay/ideal is what "
        "not cancelling stragglers costs, achieved/replay is tf_backup's own overhead (communication, "
        "the real Keras step, polling, 2 shared cores).",
        f"Target: achieved/ideal (mean) within 1.15 for every b; worst median here: {worst:.3f}; worst "
        f"achieved/replay: {worst_replay:.3f}.",
    ]
    columns = ["b", "workers", "mean step ms", "ideal mean ms", "achieved/ideal (mean)", "p90 step ms",
               "ideal p90 ms", "achieved/ideal (p90)", "replay mean ms", "achieved/replay (mean)", "runs ok"]
    csv_columns = ["b", "workers", "cluster", "rep", "steps", "mean_s", "p90_s", "ideal_mean_s", "ideal_p90_s",
                   "ratio_mean", "ratio_p90", "replay_mean_s", "ratio_replay_mean",
                   "dropped_total_in_cluster"]
    image = None
    if not smoke:
        import os  # pylint: disable=g-import-not-at-top
        path = os.path.join(out_dir, f"{NAME}.png")
        bs = [b for b in s["bs"] if per_b[b]["mean"]]
        if common.plot(path, [
                {"xlabel": "backup workers b (N = 4)", "ylabel": "step time (ms)", "series": [
                    ("achieved mean", bs, [statistics.median(per_b[b]["mean"]) * 1e3 for b in bs]),
                    ("ideal mean", bs, [statistics.median(per_b[b]["ideal_mean"]) * 1e3 for b in bs]),
                    ("replay mean", bs, [statistics.median(per_b[b]["replay_mean"]) * 1e3 for b in bs]),
                    ("achieved p90", bs, [statistics.median(per_b[b]["p90"]) * 1e3 for b in bs]),
                    ("ideal p90", bs, [statistics.median(per_b[b]["ideal_p90"]) * 1e3 for b in bs])]},
                {"xlabel": "backup workers b (N = 4)", "ylabel": "achieved / ideal", "hline": 1.15, "series": [
                    ("mean", bs, [statistics.median(per_b[b]["ratio"]) for b in bs]),
                    ("p90", bs, [statistics.median(per_b[b]["ratio_p90"]) for b in bs]),
                    ("mean, vs replay", bs, [statistics.median(per_b[b]["ratio_replay"]) for b in bs])]}], TITLE):
            image = path
    lines = common.write_results(out_dir, NAME, TITLE, notes, columns, rows, csv_columns, csv_rows,
                                 failures, argv, image=image)
    return {"lines": lines, "per_b": per_b, "failures": failures, "worst_ratio": worst,
            "worst_replay_ratio": worst_replay}
