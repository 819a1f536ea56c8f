r"""Embedding gradients: cost per step against vocabulary size (issue 7's sparse benchmark).

Two measurements, for each --vocab size (an Embedding of --dim columns):

1. `model.fit` on a localhost cluster (1 ps, 2 workers, b = 0) of an Embedding
   -> average pooling -> Dense model, batch 64 x 8 tokens (at most 512 rows of
   the table touched per worker per step), through the sparse path (rows
   pushed, applied, published and pulled) and, for comparison, with the table
   densified into the flat shards (`SyncReplicasOptimizer(sparse_variables=[])`).
   Reported: chief ms/step (after 5 warm-up steps) and the chief's peak RSS.
2. `accumulators.SparseConditionalAccumulator` on an in-process server: 2 pushes
   of 512 rows each + 1 take, what one step of a sparse push costs; it should
   not depend on the vocabulary.

Writes benchmarks/results/sparse_embedding.md.

  python -m benchmarks.sparse_embedding --runs=3
"""

import os
import resource
import statistics
import time

from absl import app
from absl import flags
import numpy as np

from benchmarks import common

_RUNS = flags.DEFINE_integer("runs", 3, "Runs per case.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 20, "Global steps per cluster run.", lower_bound=10)
_VOCAB = flags.DEFINE_list("vocab", ["1000", "10000", "100000", "1000000"], "Vocabulary sizes.")
_DIM = flags.DEFINE_integer("dim", 16, "Embedding columns.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "benchmarks/results/sparse_embedding.md", "Markdown table to write.")
WARMUP = 5
BATCH, TOKENS = 64, 8


def worker(vocab: int, dim: int, steps: int, sparse_path: bool):
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(step_timeout=600.0)
    rng = np.random.default_rng(strategy.worker_index)
    x = rng.integers(0, vocab, size=(BATCH * 16, TOKENS)).astype(np.int32)
    y = rng.normal(size=(BATCH * 16, 1)).astype(np.float32)
    with strategy.scope():
        model = keras.Sequential([keras.Input((TOKENS,), dtype="int32"), keras.layers.Embedding(vocab, dim),
                                  keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)])
        # sparse_variables=[]: every variable through the dense shards, the table densified.
        optimizer = tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1),
                                                    sparse_variables=None if sparse_path else [])
        model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat(), epochs=1,
              steps_per_epoch=steps, verbose=0)
    if not strategy.is_chief:
        return None
    ends = [r.end_time for r in strategy.step_history()]
    return {"ms_per_step": 1000 * (ends[-1] - ends[WARMUP - 1]) / (len(ends) - WARMUP),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def sparse_push_take_ms(vocab: int, dim: int, run: int, repeats: int = 20) -> float:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tf_backup.ps import accumulators  # pylint: disable=g-import-not-at-top
    from tf_backup.ps import endpoint  # pylint: disable=g-import-not-at-top

    server = sparse_push_take_ms.server = getattr(sparse_push_take_ms, "server", None) or \
        tf.distribute.Server.create_local_server()
    where = endpoint.Endpoint(server.target, "/job:localhost/replica:0/task:0/device:CPU:0")
    acc = accumulators.SparseConditionalAccumulator(f"bench/{vocab}/{run}", tf.float32, [vocab, dim], 2, where)
    rng = np.random.default_rng(0)
    times = []
    for step in range(repeats):
        rows = [rng.integers(0, vocab, BATCH * TOKENS) for _ in range(2)]
        values = rng.normal(size=(BATCH * TOKENS, dim)).astype(np.float32)
        start = time.perf_counter()
        for w in range(2):
            acc.apply_grad(rows[w], values, local_step=step, worker=w)
        acc.take_grad(2)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def main(argv):
    del argv
    import tf_backup  # pylint: disable=g-import-not-at-top

    vocabs = [int(v) for v in _VOCAB.value]
    load_before = os.getloadavg()
    modes = (True, False)
    fit = {(v, m): [] for v in vocabs for m in modes}
    rss = {(v, m): [] for v in vocabs for m in modes}
    push = {v: [] for v in vocabs}
    for run in range(_RUNS.value):
        for v in vocabs:
            push[v].append(sparse_push_take_ms(v, _DIM.value, run))
            for m in modes:
                try:
                    out = tf_backup.launch_local(worker, 2, args=(v, _DIM.value, _STEPS.value, m), timeout=900)
                except tf_backup.LocalClusterError as e:
                    print(f"run failed: {str(e).splitlines()[0]}", flush=True)
                    continue
                fit[v, m].append(out[0]["ms_per_step"])
                rss[v, m].append(out[0]["peak_rss_mb"])
                print(f"run {run + 1}: vocab {v} {'sparse' if m else 'densified'}: {fit[v, m][-1]:.1f} ms/step, "
                      f"chief peak RSS {rss[v, m][-1]:.0f} MB", flush=True)
    rows = [[f"{v:,}", f"{v * _DIM.value * 4 / 2**20:.1f}", common.median_range(fit[v, True], "{:.1f}"),
             common.median_range(fit[v, False], "{:.1f}"), common.median_range(rss[v, True], "{:.0f}"),
             common.median_range(rss[v, False], "{:.0f}"), common.median_range(push[v], "{:.2f}"),
             f"{len(fit[v, True])}+{len(fit[v, False])}/{2 * _RUNS.value}"] for v in vocabs]
    lines = common.header("Embedding gradients against vocabulary size") + [
        f"Embedding({{vocab}}, {_DIM.value}) -> average pooling -> Dense(1), SGD; batch {BATCH} x {TOKENS} "
        f"tokens (at most {BATCH * TOKENS} table rows touched per worker per step); 1 ps + 2 workers, b = 0, "
        f"{_STEPS.value} steps, ms/step measured by the chief after {WARMUP} warm-up steps. `sparse push+take`: "
        f"2 pushes of {BATCH * TOKENS} rows and one take on a `SparseConditionalAccumulator` (in-process "
        "server). Median (min–max) of the runs.",
        "",
        "`sparse`: tf_backup's path for Embedding tables (rows pushed, taken, applied, published, pulled). "
        "`densified`: the table sent through the dense flat shards (`SyncReplicasOptimizer(sparse_variables=[])`).",
        "",
        f"Load average (1 min) at start {load_before[0]:.1f}, at end {os.getloadavg()[0]:.1f}.",
        "",
    ] + common.table(["vocab", "table MB", "fit ms/step sparse", "fit ms/step densified",
                      "chief peak RSS MB sparse", "chief peak RSS MB densified", "accumulator push+take ms",
                      "runs ok"], rows)
    common.write_markdown(_OUT.value, lines)


if __name__ == "__main__":
    app.run(main)
