"""Item 3: overhead without stragglers, tf_backup (b = 0) against MultiWorkerMirroredStrategy.

Both run as real multi-process localhost clusters on this machine with the same Keras MLP, the same
per-worker batch (32 rows of the worker's own data) and plain SGD, no straggler and no simulated
compute: the step time is the framework's own cost plus the (small) real step. tf_backup runs under
`tf_backup.launch_local` (1 ps + W workers); MWMS under `benchmarks.launcher` (W workers, TF_CONFIG
per process, collective all-reduce over gRPC).
"""

import os
import statistics
from typing import Dict, List

import numpy as np

from benchmarks import common

NAME = "overhead"
TITLE = "Overhead without stragglers: tf_backup (b = 0) vs MultiWorkerMirroredStrategy"
COMPUTE_FOR_DERIVED = 0.1  # seconds of per-step compute for the derived ratio column


def settings(quick: bool, smoke: bool = False) -> Dict:
    if smoke:
        return dict(workers=[2], params=[1e4], clusters=1, reps=3, steps=15)
    if quick:
        return dict(workers=[2, 4], params=[1e4, 1e5], clusters=1, reps=3, steps=30)
    return dict(workers=[2, 4, 8], params=[1e4, 1e5, 1e6], clusters=3, reps=1, steps=60)


def run(out_dir: str, quick: bool, argv: List[str], smoke: bool = False) -> Dict:
    from benchmarks import mlp_task  # pylint: disable=g-import-not-at-top
    from benchmarks import overhead_workload  # pylint: disable=g-import-not-at-top
    from tf_backup import memory  # pylint: disable=g-import-not-at-top

    s = settings(quick, smoke)
    hiddens = [mlp_task.hidden_for_params(p) for p in s["params"]]
    systems = ["tf_backup", "mwms"]
    times = {(sys_, w, h): [] for sys_ in systems for w in s["workers"] for h in hiddens}
    cpus = {key: [] for key in times}  # CPU ms per step, all the cluster's processes
    failures, csv_rows = [], []
    for cluster in range(s["clusters"]):
        for w in s["workers"]:
            for system in systems:
                cfg = dict(system=system, hiddens=hiddens, steps=s["steps"], reps=s["reps"])
                out = common.attempt(
                    NAME, f"{system}, {w} workers, cluster {cluster + 1} ({s['reps']} run(s) of each size)",
                    failures, lambda: overhead_workload.launch_overhead(system, w, cfg))
                if out is None:
                    continue
                for h in hiddens:
                    cpu_reps = out[0].get(("cpu", h)) or [None] * len(out[0][h])
                    for rep, (steps, cpu) in enumerate(zip(out[0][h], cpu_reps)):
                        mean = float(np.mean(steps))
                        times[(system, w, h)].append(mean)
                        cpu_ms = 1e3 * sum(cpu.values()) if cpu else float("nan")
                        if cpu:
                            cpus[(system, w, h)].append(cpu_ms)
                        csv_rows.append([system, w, mlp_task.mlp_params(h), cluster + 1, rep + 1, len(steps), mean,
                                         float(np.quantile(steps, 0.9)), cpu_ms])
                    print(f"{NAME}: {system} {w} workers {mlp_task.mlp_params(h)} params: "
                          f"{[round(x * 1e3, 1) for x in times[(system, w, h)]]} ms", flush=True)
    runs = s["clusters"] * s["reps"]
    rows, ratios = [], {}
    for w in s["workers"]:
        for h in hiddens:
            ours, ref = times[("tf_backup", w, h)], times[("mwms", w, h)]
            if ours and ref:
                ratio = statistics.median(ours) / statistics.median(ref)
                derived = (statistics.median(ours) + COMPUTE_FOR_DERIVED) / (statistics.median(ref) + COMPUTE_FOR_DERIVED)
                ratios[(w, h)] = ratio
                rtxt, dtxt = f"{ratio:.2f}", f"{derived:.2f}"
            else:
                rtxt = dtxt = "failed"
            ms = lambda v: common.median_range([x * 1e3 for x in v], "{:.1f}")  # noqa: E731
            cpu_ours, cpu_ref = cpus[("tf_backup", w, h)], cpus[("mwms", w, h)]
            cpu_txt = (f"{statistics.median(cpu_ours):.1f} / {statistics.median(cpu_ref):.1f}"
                       if cpu_ours and cpu_ref else "n/a")
            rows.append([w, f"{mlp_task.mlp_params(h):,}", ms(ours), ms(ref), rtxt, cpu_txt, dtxt,
                         f"{len(ours)}/{runs}, {len(ref)}/{runs}"])
    notes = [
        f"A {mlp_task.INPUT_DIM}-h-h-10 MLP (h = {', '.join(str(h) for h in hiddens)}), batch 32 per worker, "
        "SGD(0.01), no stragglers, **no simulated compute**: step time = the framework's cost + a small real "
        "step. tf_backup: `BackupWorkerStrategy(num_backup_workers=0)` + `SyncReplicasOptimizer`, 1 ps task; "
        "MWMS: `tf.distribute.MultiWorkerMirroredStrategy` (collective all-reduce), one process per worker, "
        "`TF_CONFIG` per process. All processes share this machine's cores. " + (
            "Every process of both systems starts with the same glibc malloc settings "
            "(`tf_backup.memory.malloc_env()`: freed memory stays in the process; WORKSPACE_NOTES, "
            "\"Memory allocation\")." if memory.enabled() else
            "`TF_BACKUP_TUNE_MALLOC=0`: every process runs with glibc's default malloc settings."),
        "Step time: mean time between worker 0's consecutive batch ends in one timed fit of "
        f"{s['steps']} batches (first and last left out), after a warm-up fit; {s['clusters']} cluster(s) per cell "
        f"with {s['reps']} timed fit(s) each; median (min–max) over the runs. Ratio = median / median.",
        "CPU: user + system time of every process of the cluster (workers, and our ps) over the same batches "
        "of each timed fit, from /proc, per batch; median over the runs. With every process on 2 cores, step "
        "time follows it.",
        f"The last ratio column is derived, not measured: (ours + {COMPUTE_FOR_DERIVED:g} s) / (MWMS + "
        f"{COMPUTE_FOR_DERIVED:g} s), the ratio if each step also had {COMPUTE_FOR_DERIVED * 1e3:.0f} ms of "
        "compute (the per-step overheads added to it unchanged).",
        "Keras 3.15's `fit` fails on a multi-worker MWMS twice (its symbolic build reduces a PerReplica "
        "batch; its train step reduces scalar logs with axis=0): `benchmarks.mwms_patches` builds the model "
        "itself and reduces logs with \"first\" (one scalar all-reduce less per step for MWMS).",
        "Target: at most 1.25x at 4 workers.",
    ]
    columns = ["workers", "parameters", "tf_backup ms/step", "MWMS ms/step", "ratio",
               "CPU ms/step, all processes (ours / MWMS)", "ratio with 100 ms compute (derived)", "runs ok (ours, MWMS)"]
    csv_columns = ["system", "workers", "parameters", "cluster", "rep", "steps", "mean_step_s", "p90_step_s",
                   "cpu_ms_per_step"]
    image = None
    if not smoke:
        path = os.path.join(out_dir, f"{NAME}.png")
        series = []
        for h in hiddens:
            ws = [w for w in s["workers"] if (w, h) in ratios]
            series.append((f"{mlp_task.mlp_params(h):,} params", ws, [ratios[(w, h)] for w in ws]))
        if common.plot(path, [{"xlabel": "workers", "ylabel": "step time ratio tf_backup / MWMS",
                               "hline": 1.25, "series": series}], TITLE):
            image = path
    lines = common.write_results(out_dir, NAME, TITLE, notes, columns, rows, csv_columns, csv_rows, failures,
                                 argv, image=image)
    return {"lines": lines, "times": times, "ratios": ratios, "failures": failures}
