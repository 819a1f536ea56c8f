"""The stall at the end of each `fit`: TensorFlow's iterator destructor, with and without the reaper.

    python -m benchmarks.fit_end_stall [--rounds=3] [--fits=4] [--steps=8] [--params=1e7]

Each worker of a local cluster (4 workers, b = 0, 2 ps tasks with `apply_on_ps`, the bandwidth
benchmark's MLP, a batch of 4 rows and a 100 ms sleep per batch) runs a warm-up fit of 2 steps,
then `--fits` fits of `--steps` steps, with Python's garbage collector on, as a user's program
has it. Per fit it stamps `on_train_end` and `fit`'s return: the gap is the time Keras's drop of
the fit's iterator held the worker (`tf_backup.frontend.iterator_reaper`). Two modes, alternating
within each round, each on a cluster of its own: `reaper` (the code as it is: the iterator's
TensorFlow parts are dropped on the strategy's reaper thread) and `in_place` (the worker removes
`ExchangingIterator.__del__` first, so Keras's own thread destroys the iterator, as before).
Printed per mode: every fit's largest gap over the workers, and the seconds from worker 0's first
`fit` call to its last return.
"""

import argparse
import statistics
import time
from typing import Any, Dict, List

MODES = ("reaper", "in_place")


def stall_worker(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """One worker: the fits, and per fit (`on_train_end`, return) as `time.time()` stamps."""
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    import tf_backup  # pylint: disable=g-import-not-at-top
    from benchmarks import mlp_task  # pylint: disable=g-import-not-at-top
    from tf_backup.frontend import exchange  # pylint: disable=g-import-not-at-top

    if cfg["mode"] == "in_place":
        del exchange.ExchangingIterator.__del__  # Keras's thread destroys the iterator, as before the reaper
    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=0, apply_on_ps=True, step_timeout=300.0)
    x, y = mlp_task.random_data(strategy.worker_index)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(cfg["batch"], drop_remainder=True)
    with strategy.scope():
        model = mlp_task.build_mlp(keras, cfg["hidden"], seed=0, depth=cfg["depth"])
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.01)),
                      loss="sparse_categorical_crossentropy")
    ends: List[float] = []

    class Stamps(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            time.sleep(cfg["compute"])

        def on_train_end(self, logs=None):
            ends.append(time.time())

    model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0, callbacks=[Stamps()])  # warm-up: traces
    ends.clear()
    calls, returns = [], []
    for _ in range(cfg["fits"]):
        calls.append(time.time())
        model.fit(dataset, epochs=1, steps_per_epoch=cfg["steps"], verbose=0, callbacks=[Stamps()])
        returns.append(time.time())
    return {"ends": ends, "calls": calls, "returns": returns,
            "reaped": strategy.extended.iterator_reaper.dropped}


def run_mode(mode: str, args) -> Dict[str, Any]:
    """One cluster in `mode`: per fit the largest gap over the workers, worker 0's wall, iterators reaped."""
    import tf_backup  # pylint: disable=g-import-not-at-top
    from benchmarks import bandwidth  # pylint: disable=g-import-not-at-top
    from benchmarks import mlp_task  # pylint: disable=g-import-not-at-top

    cfg = dict(mode=mode, hidden=mlp_task.hidden_for_params(args.params, bandwidth.DEPTH), depth=bandwidth.DEPTH,
               batch=bandwidth.BATCH, compute=bandwidth.COMPUTE, fits=args.fits, steps=args.steps)
    out = tf_backup.launch_local(stall_worker, args.workers, num_ps=2, args=(cfg,), timeout=900)
    gaps = [max(r["returns"][i] - r["ends"][i] for r in out) for i in range(args.fits)]
    return {"gaps": gaps, "wall": out[0]["returns"][-1] - out[0]["calls"][0],
            "reaped": [r["reaped"] for r in out]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every mode once, alternating")
    parser.add_argument("--fits", type=int, default=4, help="timed fits per cluster")
    parser.add_argument("--steps", type=int, default=8, help="steps per timed fit")
    parser.add_argument("--params", type=float, default=1e7, help="the MLP's parameters")
    parser.add_argument("--workers", type=int, default=4, help="workers (b = 0)")
    args = parser.parse_args()
    results: Dict[str, List[Dict[str, Any]]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else reversed(MODES):
            got = run_mode(mode, args)
            results[mode].append(got)
            print(f"round {r} {mode}: largest gap per fit {[round(g, 2) for g in got['gaps']]} s, "
                  f"worker 0's fits {got['wall']:.1f} s, iterators reaped per worker {got['reaped']}", flush=True)
    print("\n| mode | largest gap per fit, s (every fit of every round) | median gap, s | worker 0's fits, s (median) |")
    print("|---|---|---|---|")
    for mode in MODES:
        gaps = [g for got in results[mode] for g in got["gaps"]]
        walls = [got["wall"] for got in results[mode]]
        print(f"| {mode} | {', '.join(f'{g:.2f}' for g in gaps)} | {statistics.median(gaps):.2f} | "
              f"{statistics.median(walls):.1f} ({', '.join(f'{w:.1f}' for w in walls)}) |")


if __name__ == "__main__":
    main()
