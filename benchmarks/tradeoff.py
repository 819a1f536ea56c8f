"""Item 1: the trade-off of b (the paper's central figure), achieved against ideal step time.

N = 4 gradients per step, b = 0..3 backup workers (N + b worker processes, 1 ps), every worker
sleeping `compute + delay(worker, global step)` before each batch with a Pareto (Lomax) delay
seeded identically for every b. The ideal step time of a step is the N-th smallest of the N + b
workers' times (`tf_backup.sim.stragglers.ideal_step_times`); achieved step time is the time between
two consecutive global steps published by the chief.

Each b runs under two straggler policies, in turn on the same cluster: "finish" (a late worker
finishes its stale batch, whose gradient is dropped, as in TF1 and the paper) and "restart" (the
publish of the next step cuts a late worker's sleep short, `sleep_unless_superseded`, and the
worker starts the batch afresh on the new step, `restart_superseded`: the model behind the
order-statistic ideal).
"""

import itertools
import statistics
from typing import Dict, List

import numpy as np

from benchmarks import common
from benchmarks import scale_sim

NAME = "tradeoff"
TITLE = "Trade-off of b: step time with N = 4 and b backup workers, achieved vs ideal"


def settings(quick: bool, smoke: bool = False) -> Dict:
    if smoke:
        return dict(n=4, bs=[1], clusters=1, reps=3, steps=10, compute=0.1, straggler="pareto:1.5:0.05")
    if quick:
        return dict(n=4, bs=[0, 1, 2, 3], clusters=1, reps=3, steps=16, compute=0.1,
                    straggler="pareto:1.5:0.05")
    return dict(n=4, bs=[0, 1, 2, 3], clusters=3, reps=1, steps=60, compute=0.2,
                straggler="pareto:1.5:0.1")


def simulate_protocol(delay, n: int, workers: int, compute: float, start_step: int, num_steps: int):
    """Publish times of a zero-overhead replay of the protocol, with stragglers that finish.

    The order-statistic ideal assumes every worker starts every step afresh. In tf_backup (as in
    TF1) a late worker is not cancelled: it finishes its stale batch, pushes a gradient that is
    dropped, and only then starts on the current step, so a long stall keeps it out of the next
    steps too. This replays exactly that (`benchmarks.scale_sim.sync_steps`) with no communication
    cost. Returns {step: publish time}, time 0 = all workers start `start_step`.
    """
    steps = scale_sim.sync_steps(delay, workers, n, compute, comm=0.0, start_step=start_step)
    return {s.step: s.published for s in itertools.islice(steps, num_steps)}


def run(out_dir: str, quick: bool, argv: List[str], smoke: bool = False) -> Dict:
    import tf_backup  # pylint: disable=g-import-not-at-top
    from tf_backup.sim import stragglers  # pylint: disable=g-import-not-at-top
    from benchmarks import mlp_task  # pylint: disable=g-import-not-at-top
    from benchmarks import step_timing  # pylint: disable=g-import-not-at-top
    from benchmarks import tradeoff_workload  # pylint: disable=g-import-not-at-top

    s = settings(quick, smoke)
    n, seed, hidden = s["n"], 0, mlp_task.hidden_for_params(1e4)
    model = stragglers.parse(s["straggler"], seed=seed)
    policies = ["finish", "restart"]
    per_b = {(b, p): {"mean": [], "p90": [], "ideal_mean": [], "ideal_p90": [], "ratio": [], "ratio_p90": [],
                      "replay_mean": [], "ratio_replay": [], "dropped": [], "cancelled": []}
             for b in s["bs"] for p in policies}
    failures = []
    csv_rows = []
    for cluster in range(s["clusters"]):  # interleave b, so drifting machine load hits every b alike
        for b in s["bs"]:
            cfg = dict(num_backup_workers=b, hidden=hidden, compute=s["compute"],
                       straggler=s["straggler"], seed=seed, steps=s["steps"], reps=s["reps"],
                       policies=policies)
            out = common.attempt(
                NAME, f"b = {b}, cluster {cluster + 1} ({s['reps']} run(s) per policy)", failures,
                lambda: tf_backup.launch_local(tradeoff_workload.tf_backup_worker, n + b, args=(cfg,), timeout=600))
            if out is None:
                continue
            chief = out[0]
            for rep_index, rep in enumerate(chief["reps"]):
                all_in = max(o["reps"][rep_index]["first_batch"] or 0.0 for o in out)
                durations = step_timing.step_durations(chief["history"], rep["start_step"], s["steps"], all_in)
                steps = sorted(durations)
                if not steps:
                    failures.append(f"b = {b}, {rep['policy']}, cluster {cluster + 1}, rep {rep_index + 1}: "
                                    f"no steady steps (global steps {rep['start_step']} to {rep['end_step']})")
                    continue
                delays = model.delays(n + b, max(steps) + 1)[steps]
                ideal = stragglers.ideal_step_times(s["compute"] + delays, n)
                achieved = np.array([durations[k] for k in steps])
                pub = simulate_protocol(model.delay, n, n + b, s["compute"], rep["start_step"],
                                                  max(steps) - rep["start_step"] + 1)
                replay = np.array([pub[k] - pub[k - 1] for k in steps])
                reference = ideal if rep["policy"] == "restart" else replay
                r = per_b[b, rep["policy"]]
                r["mean"].append(achieved.mean())
                r["p90"].append(float(np.quantile(achieved, 0.9)))
                r["ideal_mean"].append(ideal.mean())
                r["ideal_p90"].append(float(np.quantile(ideal, 0.9)))
                r["ratio"].append(achieved.mean() / ideal.mean())
                r["ratio_p90"].append(r["p90"][-1] / r["ideal_p90"][-1])
                r["replay_mean"].append(replay.mean())
                r["ratio_replay"].append(achieved.mean() / reference.mean())
                csv_rows.append([b, n + b, rep["policy"], cluster + 1, rep_index + 1, len(steps), achieved.mean(),
                                 r["p90"][-1], ideal.mean(), r["ideal_p90"][-1], r["ratio"][-1],
                                 r["ratio_p90"][-1], replay.mean(), r["ratio_replay"][-1],
                                 sum(chief["stats"]["dropped"])])
                print(f"{NAME}: b = {b} {rep['policy']} run {len(r['mean'])}: mean {achieved.mean() * 1e3:.0f} ms "
                      f"(ideal {ideal.mean() * 1e3:.0f} ms), achieved/ideal {r['ratio'][-1]:.3f}", flush=True)
            per_b[b, "finish"]["dropped"].append(sum(chief["stats"]["dropped"]))
            per_b[b, "restart"]["cancelled"].append(sum(chief["stats"]["cancelled"]))
    runs = s["clusters"] * s["reps"]
    ms = lambda v: common.median_range([x * 1e3 for x in v], "{:.0f}")  # noqa: E731
    rows = []
    for b in s["bs"]:
        for p in policies:
            r = per_b[b, p]
            rows.append([b, n + b, p, ms(r["mean"]), ms(r["ideal_mean"]), common.median_range(r["ratio"], "{:.3f}"),
                         ms(r["p90"]), ms(r["ideal_p90"]), common.median_range(r["ratio_p90"], "{:.3f}"),
                         ms(r["replay_mean"]) if p == "finish" else "-",
                         common.median_range(r["ratio_replay"], "{:.3f}"), f"{len(r['mean'])}/{runs}"])

    def worst_of(policy, key):
        return max((statistics.median(per_b[b, policy][key]) for b in s["bs"] if per_b[b, policy][key]),
                   default=float("nan"))

    worst, worst_replay = worst_of("restart", "ratio"), worst_of("finish", "ratio_replay")
    worst_finish = worst_of("finish", "ratio")
    cancelled = sum(sum(per_b[b, "restart"]["cancelled"]) for b in s["bs"])
    dropped = sum(sum(per_b[b, "finish"]["dropped"]) for b in s["bs"])
    notes = [
        f"N = {n} gradients per step, b backup workers (N + b worker processes + 1 ps), a "
        f"{mlp_task.INPUT_DIM}-{hidden}-{hidden}-10 MLP ({mlp_task.mlp_params(hidden)} parameters), batch 32, SGD.",
        f"Each worker **sleeps** {s['compute']:g} s of simulated compute plus a straggler delay before each "
        f"batch (`{s['straggler']}`, {model.describe()}); the delay is a pure function of (seed, worker, "
        "global step), so every b sees the same delays. Sleeping instead of computing keeps the figures "
        "independent of how the processes share the cores.",
        "Achieved: time between consecutive global steps published by the chief (the first step of each "
        "timed fit, the steps that began before every worker had begun its fit's first batch, and the last "
        "step are left out; workers collect garbage between fits, see `benchmarks.pacing`). Ideal: per "
        "step, the N-th smallest of the N + b "
        f"workers' times ({s['compute']:g} s + delay), i.e. no communication, no real compute, no overhead.",
        f"A run is one timed fit of {s['steps']} batches per worker; {s['clusters']} fresh cluster(s) per b with "
        f"{s['reps']} timed fit(s) each (after a warm-up fit); median (min–max) over the runs.",
        "Straggler policy. **finish**: as in TF1 and the paper, a late worker finishes its stale batch "
        "(its gradient is dropped) before starting on the current step, so a long stall also keeps it out "
        "of the next steps. **restart**: the publish of the next step wakes a late worker during its sleep "
        "(`BackupWorkerStrategy.sleep_unless_superseded`); the worker pulls the new step's parameters at "
        "once (`restart_superseded`) and starts the same batch afresh on them, sleeping that step's delay: "
        "every step starts afresh, the model the ideal assumes. Both policies run in turn on the same "
        "cluster with the same delays.",
        "Reference: for **restart**, the ideal; for **finish**, a zero-overhead replay of the protocol with "
        "the same delays and stragglers that finish (`benchmarks.tradeoff.simulate_protocol`; ideal <= "
        "replay: replay/ideal is what not restarting costs). achieved/reference is tf_backup's own "
        "overhead: communication, the real Keras step, 2 shared cores.",
        f"Target: achieved/ideal (mean) within 1.15 for every b. Worst median here: {worst:.3f} with "
        f"restarted stragglers, {worst_finish:.3f} with stragglers that finish (whose worst "
        f"achieved/replay is {worst_replay:.3f}). Gradients dropped (finish): {dropped}; sleeps "
        f"cut short and restarted (restart): {cancelled}, over all runs.",
    ]
    columns = ["b", "workers", "stragglers", "mean step ms", "ideal mean ms", "achieved/ideal (mean)",
               "p90 step ms", "ideal p90 ms", "achieved/ideal (p90)", "replay mean ms",
               "achieved/reference (mean)", "runs ok"]
    csv_columns = ["b", "workers", "policy", "cluster", "rep", "steps", "mean_s", "p90_s", "ideal_mean_s",
                   "ideal_p90_s", "ratio_mean", "ratio_p90", "replay_mean_s", "ratio_reference_mean",
                   "dropped_total_in_cluster"]
    image = None
    if not smoke:
        import os  # pylint: disable=g-import-not-at-top
        path = os.path.join(out_dir, f"{NAME}.png")
        bs = [b for b in s["bs"] if per_b[b, "restart"]["mean"] and per_b[b, "finish"]["mean"]]

        def med(p, key, scale=1.0):
            return [statistics.median(per_b[b, p][key]) * scale for b in bs]

        if common.plot(path, [
                {"xlabel": "backup workers b (N = 4)", "ylabel": "step time (ms)", "series": [
                    ("achieved mean, restart", bs, med("restart", "mean", 1e3)),
                    ("achieved mean, finish", bs, med("finish", "mean", 1e3)),
                    ("ideal mean", bs, med("restart", "ideal_mean", 1e3)),
                    ("replay mean (finish)", bs, med("finish", "replay_mean", 1e3)),
                    ("achieved p90, restart", bs, med("restart", "p90", 1e3)),
                    ("ideal p90", bs, med("restart", "ideal_p90", 1e3))]},
                {"xlabel": "backup workers b (N = 4)", "ylabel": "achieved / ideal", "hline": 1.15, "series": [
                    ("mean, restart", bs, med("restart", "ratio")),
                    ("p90, restart", bs, med("restart", "ratio_p90")),
                    ("mean, finish", bs, med("finish", "ratio")),
                    ("mean, finish vs replay", bs, med("finish", "ratio_replay"))]}], TITLE):
            image = path
    lines = common.write_results(out_dir, NAME, TITLE, notes, columns, rows, csv_columns, csv_rows,
                                 failures, argv, image=image)
    return {"lines": lines, "per_b": per_b, "failures": failures, "worst_ratio": worst,
            "worst_finish_ratio": worst_finish, "worst_replay_ratio": worst_replay}
