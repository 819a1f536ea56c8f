"""Item 4: TF1's `tf.compat.v1.train.SyncReplicasOptimizer` as the reference implementation.

The same b = 0 job (`benchmarks.tf1_workload`) in TF1 graph mode (between-graph replication,
`replica_device_setter`, `MonitoredTrainingSession` on localhost `tf.distribute.Server`s, 1 ps + W
workers) and in tf_backup (1 ps + W workers): same initial weights, same fixed data (worker i's
batch of step k is the same rows in both), SGD. Final weights are compared with each other and
with a float64 numpy computation of the same large-batch SGD; step time is the chief's.
"""

import statistics
from typing import Dict, List

import numpy as np

from benchmarks import common

NAME = "tf1_reference"
TITLE = "Reference: TF1 SyncReplicasOptimizer (graph mode) vs tf_backup, b = 0"
SKIP = 3  # leading steps left out of the step time (tracing, session start)


def settings(quick: bool, smoke: bool = False) -> Dict:
    if smoke:
        return dict(workers=[2], runs=3, steps=20, hidden=200, lr=0.1)
    if quick:
        return dict(workers=[2], runs=3, steps=30, hidden=200, lr=0.1)
    return dict(workers=[2, 4, 8], runs=3, steps=100, hidden=200, lr=0.1)


def _max_diff(a, b):
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()) for x, y in zip(a, b))


def run(out_dir: str, quick: bool, argv: List[str], smoke: bool = False) -> Dict:
    import tf_backup  # pylint: disable=g-import-not-at-top
    from benchmarks import launcher  # pylint: disable=g-import-not-at-top
    from benchmarks import tf1_workload as job  # pylint: disable=g-import-not-at-top

    s = settings(quick, smoke)
    failures, csv_rows, rows, result = [], [], [], {}
    params = job.INPUT_DIM * s["hidden"] + s["hidden"] + s["hidden"] * job.CLASSES + job.CLASSES
    for w in s["workers"]:
        cfg = dict(workers=w, steps=s["steps"], hidden=s["hidden"], lr=s["lr"], reps=s["runs"])
        ref = job.reference_weights(cfg)
        tf1, ours = [], []
        for i in range(s["runs"]):
            try:
                out = launcher.launch(job.tf1_task, {"ps": 1, "worker": w}, args=(cfg,), run_in=("worker-0",),
                                      timeout=300)
                tf1.append(out[0])
            except Exception as e:  # pylint: disable=broad-except
                msg = common.failure_reason(e)
                failures.append(f"TF1, {w} workers, run {i + 1}: {msg}")
        try:
            ours = tf_backup.launch_local(job.tf_backup_worker, w, args=(cfg,), timeout=300)[0]
        except Exception as e:  # pylint: disable=broad-except
            msg = common.failure_reason(e)
            failures.append(f"tf_backup, {w} workers ({s['runs']} runs in one cluster): {msg}")
        step = lambda r: float(np.median(np.diff(r["ends"])[SKIP:]))  # noqa: E731
        t_tf1, t_ours = [step(r) for r in tf1], [step(r) for r in ours]
        d_tf1_ref = [_max_diff(r["weights"], ref) for r in tf1]
        d_ours_ref = [_max_diff(r["weights"], ref) for r in ours]
        d_ours_tf1 = [_max_diff(a["weights"], b["weights"]) for a in ours for b in tf1]
        for name, runs, times, diffs in (("tf1", tf1, t_tf1, d_tf1_ref), ("tf_backup", ours, t_ours, d_ours_ref)):
            for i, (t, d) in enumerate(zip(times, diffs)):
                csv_rows.append([name, w, params, i + 1, len(runs[i]["ends"]), t, d])
        ratio = statistics.median(t_ours) / statistics.median(t_tf1) if t_tf1 and t_ours else None
        e = lambda v: f"{max(v):.1e}" if v else "failed"  # noqa: E731
        rows.append([w, f"{params:,}", s["steps"], common.median_range([t * 1e3 for t in t_ours], "{:.1f}"),
                     common.median_range([t * 1e3 for t in t_tf1], "{:.1f}"),
                     f"{ratio:.2f}" if ratio else "failed", e(d_ours_tf1), e(d_ours_ref), e(d_tf1_ref),
                     f"{len(t_ours)}/{s['runs']}, {len(t_tf1)}/{s['runs']}"])
        result[w] = {"ratio": ratio, "ours_vs_tf1": max(d_ours_tf1) if d_ours_tf1 else None}
        print(f"{NAME}: {w} workers: ours {t_ours}, TF1 {t_tf1}, max |ours - TF1| "
              f"{max(d_ours_tf1) if d_ours_tf1 else 'n/a'}", flush=True)
    notes = [
        f"A {job.INPUT_DIM}-{s['hidden']}-10 MLP (ReLU, softmax cross-entropy on logits), batch {job.BATCH} per "
        f"worker, SGD lr {s['lr']}, {s['steps']} steps, b = 0 (every step averages all W workers' gradients), "
        "no stragglers, no simulated compute.",
        "TF1: `tf.compat.v1.train.SyncReplicasOptimizer(GradientDescentOptimizer, replicas_to_aggregate=W, "
        "total_num_replicas=W)`, `replica_device_setter`, `MonitoredTrainingSession` with the optimizer's hook "
        "(`num_tokens=0`: with the default initial tokens a fast worker pushes twice for step 0 and a step can "
        "average one worker twice), each worker feeding the batch of the step its gradient is tagged with. Two "
        "TF1 waits had to be cut for it to finish in reasonable time: non-chief sessions poll for the model every "
        "30 s (`SessionManager` default, patched to 0.5 s) and closing the chief's session waits 120 s for the "
        "chief queue runner blocked in `take_grad` (`stop_grace_period_secs=2`); non-chief workers then block in "
        "the token queue and are killed.",
        f"Weights: the largest absolute difference over all variables after {s['steps']} steps; reference = "
        "float64 numpy large-batch SGD. Step time: median time between the chief's consecutive steps after "
        f"the first {SKIP}; TF1: {s['runs']} fresh clusters; tf_backup: {s['runs']} fresh models in one cluster.",
    ]
    columns = ["workers", "parameters", "steps", "tf_backup ms/step", "TF1 ms/step", "ratio ours / TF1",
               "max abs(ours - TF1)", "max abs(ours - numpy)", "max abs(TF1 - numpy)", "runs ok (ours, TF1)"]
    csv_columns = ["system", "workers", "parameters", "run", "chief_steps", "median_step_s", "max_abs_diff_vs_numpy"]
    lines = common.write_results(out_dir, NAME, TITLE, notes, columns, rows, csv_columns, csv_rows, failures, argv)
    return {"lines": lines, "result": result, "failures": failures}
