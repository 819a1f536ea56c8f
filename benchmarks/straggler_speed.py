r"""Steps per second with one persistently slow worker: b = 1 vs b = 0 (issue 3's benchmark).

Every worker's compute is simulated by a sleep of --compute seconds per step on
top of a real MLP step (so the figures do not depend on how 6 processes share
this machine's cores); the slow worker sleeps --factor times as long. Cases,
each run --runs times on a fresh localhost cluster:

  4 workers, b = 0, no straggler        the speed to match
  4 + 1 workers, b = 1, no straggler    the cost of one more worker
  4 + 1 workers, b = 1, one 5x slower   backup workers hide the straggler
  5 workers, b = 0, one 5x slower       synchronous SGD waits for it

Steps/s is measured by the chief between its 5th and last global step (start-up
excluded). Writes benchmarks/results/straggler_speed.md.

  python -m benchmarks.straggler_speed --runs=3
"""

import statistics
import time

from absl import app
from absl import flags

from benchmarks import common

_RUNS = flags.DEFINE_integer("runs", 3, "Runs per case.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 40, "Global steps per run.", lower_bound=10)
_COMPUTE = flags.DEFINE_float("compute", 0.1, "Simulated compute seconds per step.", lower_bound=0.0)
_FACTOR = flags.DEFINE_float("factor", 5.0, "How many times slower the straggler is.", lower_bound=1.0)
_OUT = flags.DEFINE_string("out", "benchmarks/results/straggler_speed.md", "Markdown table to write.")
WARMUP = 5


def worker(num_backup_workers: int, steps: int, compute: float, slow_worker: int, factor: float):
    """One worker of one run; the chief returns its steady-state steps/s."""
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=num_backup_workers, step_timeout=300.0)
    seconds = compute * (factor if strategy.worker_index == slow_worker else 1.0)

    class SimulatedCompute(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            time.sleep(seconds)

    model, x, y = common.synthetic_mlp(strategy, rows=1024, hidden=100)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[SimulatedCompute()])
    if not strategy.is_chief:
        return None
    ends = [r.end_time for r in strategy.step_history()]
    stats = strategy.stats()
    return {"steps_per_second": (len(ends) - WARMUP) / (ends[-1] - ends[WARMUP - 1]),
            "global_step": stats["global_step"], "dropped": stats["dropped"]}


def run_case(num_workers: int, b: int, slow: bool):
    import tf_backup  # pylint: disable=g-import-not-at-top

    try:
        out = tf_backup.launch_local(
            worker, num_workers, args=(b, _STEPS.value, _COMPUTE.value, num_workers - 1 if slow else -1,
                                       _FACTOR.value), timeout=600)
        return out[0]
    except tf_backup.LocalClusterError as e:
        print(f"run failed: {str(e).splitlines()[0]}", flush=True)
        return None


def main(argv):
    del argv
    factor = f"{_FACTOR.value:g}x"
    cases = [("4 workers, b = 0, no straggler", 4, 0, False),
             ("4 + 1 workers, b = 1, no straggler", 5, 1, False),
             (f"4 + 1 workers, b = 1, worker 4 {factor} slower", 5, 1, True),
             (f"5 workers, b = 0, worker 4 {factor} slower", 5, 0, True)]
    results = {name: [] for name, *_ in cases}
    dropped = {name: [] for name, *_ in cases}
    failed = {name: 0 for name, *_ in cases}
    for run in range(_RUNS.value):  # interleave the cases, so drifting machine load hits all alike
        for name, workers, b, slow in cases:
            r = run_case(workers, b, slow)
            if r is None:
                failed[name] += 1
                continue
            results[name].append(r["steps_per_second"])
            dropped[name].append(r["dropped"])
            print(f"run {run + 1}: {name}: {r['steps_per_second']:.2f} steps/s, "
                  f"dropped per worker {r['dropped']}", flush=True)
    base = statistics.median(results[cases[0][0]]) if results[cases[0][0]] else float("nan")
    rows = []
    for name, *_ in cases:
        v = results[name]
        rows.append([name, common.median_range(v), f"{statistics.median(v) / base:.2f}" if v else "failed",
                     f"{1 / statistics.median(v) * 1000:.0f}" if v else "failed",
                     str(dropped[name][-1]) if dropped[name] else "-", f"{len(v)}/{_RUNS.value}"])
    lines = common.header("Steps per second with a persistently slow worker") + [
        f"Simulated compute {_COMPUTE.value:g} s per step on every worker (the straggler: "
        f"{_FACTOR.value:g}x), a 40-100-100-10 MLP, batch 32, {_STEPS.value} global steps, 1 ps; "
        f"steps/s measured by the chief after {WARMUP} warm-up steps; median (min–max) of the runs.",
        "",
    ] + common.table(["case", "steps/s", "vs 4 workers b = 0", "ms/step", "dropped per worker (last run)",
                      "runs ok"], rows)
    common.write_markdown(_OUT.value, lines)


if __name__ == "__main__":
    app.run(main)
