r"""Step time of a worker with 1, 2 and 4 local devices (issue 7's benchmark row).

A localhost cluster of 1 ps and --workers workers, b = 0; every worker splits its
CPU into R logical devices (R = 1, 2, 4) and runs one replica per device, so a
host batch of --host_batch rows is split into R per-replica batches, all-reduced
in the host, and pushed once per step. The model is a 40-256-256-10 MLP. Step
time is measured by the chief between its 5th and last global step (start-up
excluded). Logical CPU devices share the same cores: this measures the cost of
the in-host replication machinery, not a speed-up (that needs real GPUs).
Writes benchmarks/results/local_devices.md.

  python -m benchmarks.local_devices --runs=3
"""

import os
import statistics

from absl import app
from absl import flags

from benchmarks import common

_RUNS = flags.DEFINE_integer("runs", 3, "Runs per case.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 40, "Global steps per run.", lower_bound=10)
_WORKERS = flags.DEFINE_integer("workers", 2, "Workers (hosts).", lower_bound=1)
_HOST_BATCH = flags.DEFINE_integer("host_batch", 256, "Rows per host per step.", lower_bound=4)
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4"], "Local device counts to compare.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/local_devices.md", "Markdown table to write.")
WARMUP = 5


def worker(local_devices: int, steps: int, host_batch: int):
    """One worker of one run; the chief returns its steady-state ms per step."""
    from tf_backup.frontend import local_devices as local_devices_lib  # pylint: disable=g-import-not-at-top
    local_devices_lib.set_logical_cpus(local_devices)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(step_timeout=300.0)
    assert strategy.num_replicas_in_sync == local_devices
    model, x, y = common.synthetic_mlp(strategy, rows=4096, hidden=256)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(host_batch).repeat()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    if not strategy.is_chief:
        return None
    ends = [r.end_time for r in strategy.step_history()]
    return {"ms_per_step": 1000 * (ends[-1] - ends[WARMUP - 1]) / (len(ends) - WARMUP),
            "pushed": strategy.stats()["pushed"]}


def main(argv):
    del argv
    import tf_backup  # pylint: disable=g-import-not-at-top

    counts = [int(d) for d in _DEVICES.value]
    load_before = os.getloadavg()
    results = {r: [] for r in counts}
    pushed = {}
    for run in range(_RUNS.value):  # interleaved, so drifting machine load hits all cases alike
        for r in counts:
            try:
                out = tf_backup.launch_local(worker, _WORKERS.value, args=(r, _STEPS.value, _HOST_BATCH.value),
                                             timeout=600)
            except tf_backup.LocalClusterError as e:
                print(f"run failed: {str(e).splitlines()[0]}", flush=True)
                continue
            results[r].append(out[0]["ms_per_step"])
            pushed[r] = out[0]["pushed"]
            print(f"run {run + 1}: {r} local devices: {out[0]['ms_per_step']:.1f} ms/step, pushed {pushed[r]}",
                  flush=True)
    base = statistics.median(results[counts[0]]) if results[counts[0]] else float("nan")
    rows = [[r, common.median_range(results[r], "{:.1f}"),
             f"{statistics.median(results[r]) / base:.2f}" if results[r] else "failed",
             f"{_HOST_BATCH.value // r}", str(pushed.get(r, "-")), f"{len(results[r])}/{_RUNS.value}"]
            for r in counts]
    lines = common.header("Step time with 1, 2, 4 local devices per worker") + [
        f"{_WORKERS.value} workers (b = 0) + 1 ps on this machine; each worker's CPU split into R logical "
        f"devices, one replica each; host batch {_HOST_BATCH.value} rows split over the replicas; "
        f"40-256-256-10 MLP, SGD; {_STEPS.value} global steps, ms/step measured by the chief after "
        f"{WARMUP} warm-up steps; median (min–max) of the runs. Logical devices share the same cores, "
        "so this is the cost of in-host replication, not a GPU speed-up. `pushed` (one contribution "
        "per host per step) shows N counts hosts.",
        "",
        f"Load average (1 min) at start {load_before[0]:.1f}, at end {os.getloadavg()[0]:.1f} (the machine is "
        "shared: other load shows in the min–max spread).",
        "",
    ] + common.table(["local devices R", "ms/step", "vs R = 1", "rows per replica",
                      "pushed per worker (last run)", "runs ok"], rows)
    common.write_markdown(_OUT.value, lines)


if __name__ == "__main__":
    app.run(main)
