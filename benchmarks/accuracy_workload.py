"""The time-to-accuracy worker program (also the adaptive and MWMS-straggler benchmarks'): the
default job's task (MNIST-1D, CNN) under tf_backup or MWMS, with snapshots evaluated at the end.
"""

import math
import time
from typing import Any, Callable, Dict, NamedTuple, Optional

import numpy as np

from benchmarks import mwms_patches
from benchmarks import pacing


class _AccuracyRun(NamedTuple):
    """What `accuracy_worker` needs of the system under test (tf_backup or MWMS)."""
    strategy: Any
    worker: int
    is_chief: bool
    dataset: Any  # the input `fit` gets (distributed by the strategy)
    plain_batch: Any  # MWMS: one (x, y) batch of the same shapes, undistributed (Keras' build)
    wrap: Callable  # the Keras optimizer -> what `compile` gets
    global_step: Callable  # (batch index in this fit, logs) -> the global step after that batch
    barrier: Callable  # every worker waits here at each run's first batch
    fit_end: Callable  # after each fit, before the next run starts
    info: Any  # the dataset's `trainers.data.DatasetInfo`


def _tf_backup_accuracy_run(cfg, data, tf) -> _AccuracyRun:
    import tf_backup  # pylint: disable=g-import-not-at-top
    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=cfg.get("num_backup_workers", 0),
                                              asynchronous=cfg["mode"] == "async", step_timeout=300.0,
                                              ps_restart_timeout=cfg.get("ps_restart_timeout", 0.0))
    w = strategy.worker_index
    ds, info = data.load("mnist1d", split="train", batch_size=cfg["batch_size"], num_shards=strategy.num_workers,
                         shard_index=w, shuffle_seed=cfg["seed"] + w, repeat=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = ds.with_options(options)
    barrier = []

    def wait():
        if not barrier:
            barrier.append(pacing.FitBarrier(strategy))
        barrier[0].wait()

    return _AccuracyRun(strategy, w, strategy.is_chief, strategy.distribute_dataset(ds), None,
                        tf_backup.SyncReplicasOptimizer, lambda batch, logs: int(logs["global_step"]), wait,
                        strategy.wait_for_fit_end, info)


def _mwms_accuracy_run(cfg, data, tf) -> _AccuracyRun:
    """MWMS on the same task: each worker reads its own shard, `batch_size` rows per worker and step."""
    from tf_backup import memory  # pylint: disable=g-import-not-at-top
    if cfg["mode"] != "sync" or math.isfinite(cfg.get("seconds", math.inf)):
        raise ValueError("MWMS runs synchronous fits of a fixed length (every worker must stop at the same "
                         f"step): mode='sync' and no `seconds`. Received: mode={cfg['mode']!r}, "
                         f"seconds={cfg.get('seconds')!r}")
    mwms_patches.patch_keras_for_multi_worker_mirrored()
    memory.tune_malloc()  # as `overhead_worker` does: both systems with the same allocator settings
    strategy = mwms_patches.multi_worker_mirrored()
    w, workers = strategy.cluster_resolver.task_id, strategy.num_replicas_in_sync

    def shard(ctx=None):
        return data.load("mnist1d", split="train", batch_size=cfg["batch_size"], num_shards=workers,
                         shard_index=w, shuffle_seed=cfg["seed"] + w, repeat=True)

    def wait():
        # One scalar all-reduce: returns once every worker has reached it.
        strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)

    ds, info = shard()
    return _AccuracyRun(strategy, w, w == 0, strategy.distribute_datasets_from_function(lambda ctx: shard()[0]),
                        next(iter(ds)), lambda optimizer: optimizer, lambda batch, logs: batch + 1, wait,
                        lambda: None, info)


def accuracy_worker(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """One worker of the time-to-accuracy benchmark on the offline default task (MNIST-1D, CNN).

    cfg: system ("tf_backup", the default, or "mwms": MultiWorkerMirroredStrategy, whose runs need
    mode "sync" and `stop_step` instead of `seconds`), mode ("async", "sync", "sync_backup"),
    num_backup_workers, seconds (the wall-time budget of a run: the chief's fit stops at the first
    batch end past it, which ends the round for every worker), steps (batches per worker per run,
    at most), reps (runs, each from a fresh model and optimizer), every_seconds (wall time between
    snapshots), straggler, seed, and the default config's model/optimizer fields; optionally
    straggler_seeds (per run, the straggler draws' seed; default `seed` for every run), compute
    (seconds every worker sleeps before each batch besides the straggler delay; `slow` models
    multiply it), stop_step (the run also ends once the global step reaches it) and mark_steps
    (global steps whose first batch end's wall time is recorded: the straggler phases' ends). Every
    run starts at a barrier of all workers in its first batch. The chief keeps its weights every
    `every_seconds` with the wall time since that barrier and the global step, and after training
    evaluates every snapshot on the test split (not timed). Returns, on the chief, `runs`: per run a
    list of (seconds, global step, test accuracy); `marks`: per run the seconds at which each of
    `mark_steps` was reached (None: not reached); `replicas`, `noise_scale`: per run the N of every
    step and the adaptive rule's noise-scale estimate after it (None: a fixed N; empty for MWMS);
    `change_points`: per run, per step, the workers whose compute times changed (`StepRecord`);
    `expected_seconds`: per run, per step, the step times the rule expected for each N when it chose
    the next one (`StepRecord.expected_seconds`); `periods`: per run, per step, the chief's seconds
    from the previous publish to this one;
    `weights`: per run the final weights.
    """
    pacing.keep_garbage()
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from trainers import data  # pylint: disable=g-import-not-at-top
    from trainers import models  # pylint: disable=g-import-not-at-top
    from trainers import train  # pylint: disable=g-import-not-at-top

    mwms = cfg.get("system", "tf_backup") == "mwms"
    run = (_mwms_accuracy_run if mwms else _tf_backup_accuracy_run)(cfg, data, tf)
    strategy, w = run.strategy, run.worker
    info = run.info
    model_args = {k: v for k, v in cfg["model"].items() if k != "kind"}

    def global_step():
        if mwms:
            return None  # the sleep callback counts batches: each is a global step
        try:
            return strategy.stats()["global_step"]
        except ValueError:
            return None

    class Snapshots(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.points, self.start, self.next_at = [], None, 0

        def on_train_begin(self, logs=None):
            self.start = time.monotonic()
            self.base = global_step() or 0
            self.points = [(0.0, 0, [v.copy() for v in self.model.get_weights()])]
            self.next_at = cfg["every_seconds"]
            self.marks = {m: None for m in cfg.get("mark_steps", ())}
            self.step = 0

        def on_train_batch_end(self, batch, logs=None):
            elapsed = time.monotonic() - self.start
            self.step = step = run.global_step(batch, logs) - self.base
            for m in self.marks:
                if self.marks[m] is None and step >= m:
                    self.marks[m] = elapsed
            if elapsed >= self.next_at:
                self.points.append((elapsed, step, [v.copy() for v in self.model.get_weights()]))
                self.next_at += cfg["every_seconds"] * (1 + int((elapsed - self.next_at) // cfg["every_seconds"]))
            if not mwms and (elapsed >= cfg["seconds"] or step >= cfg.get("stop_step", math.inf)):
                self.model.stop_training = True  # the budget is spent: the round ends for everybody

    runs, marks, replicas, noise, changes, expected, periods = [], [], [], [], [], [], []

    def start_together(snaps):
        # At each run's first batch (after Keras made the run's input iterator): every worker waits
        # for the others; the chief's clock starts after that.
        run.barrier()
        snaps.start = time.monotonic()

    steps = min(cfg["steps"], cfg["stop_step"]) if mwms else cfg["steps"]
    seeds = cfg.get("straggler_seeds") or [cfg["seed"]] * cfg["reps"]
    if len(seeds) != cfg["reps"]:
        raise ValueError(f"`straggler_seeds` needs one seed per run (reps={cfg['reps']}). Received {seeds!r}")
    for rep in range(cfg["reps"]):
        with strategy.scope():
            model = models.build(cfg["model"]["kind"], info.input_shape, info.num_classes, seed=cfg["seed"],
                                 **model_args)
            model.compile(optimizer=run.wrap(train.make_optimizer(cfg["optimizer"], cfg["learning_rate"])),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=False)
            if mwms:
                mwms_patches.build_for_multi_worker_mirrored(model, run.plain_batch)
        sleeper = pacing.make_sleep_callback(keras, w, cfg.get("compute", 0.0), cfg["straggler"], seeds[rep],
                                             global_step)
        snaps = Snapshots()
        sleeper.gate = lambda snaps=snaps: start_together(snaps)
        callbacks = ([sleeper, snaps] if run.is_chief else [sleeper]) + ([mwms_patches.malloc_keeper(keras)] if mwms else [])
        model.fit(run.dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=callbacks)
        run.fit_end()  # the next run starts together (a late worker may still be asleep)
        if run.is_chief:
            end_step = snaps.step if mwms else strategy.stats()["global_step"] - snaps.base
            end = (time.monotonic() - snaps.start, end_step, [v.copy() for v in model.get_weights()])
            runs.append(snaps.points + [end])
            marks.append([snaps.marks[m] for m in cfg.get("mark_steps", ())])
            history = [] if mwms else strategy.step_history()
            replicas.append([r.replicas for r in history])
            noise.append([r.noise_scale for r in history])
            changes.append([list(r.change_points) for r in history])
            expected.append([list(r.expected_seconds) for r in history])
            periods.append([r.wait_seconds + r.apply_seconds for r in history])
    if not run.is_chief:
        return None
    test, _ = data.load("mnist1d", split="test", batch_size=500)
    batches = [(x.numpy(), y.numpy()) for x, y in test]
    x_test, y_test = np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])
    evaluator = models.build(cfg["model"]["kind"], info.input_shape, info.num_classes, seed=cfg["seed"], **model_args)
    predict = tf.function(lambda x: tf.argmax(evaluator(x, training=False), axis=-1), jit_compile=False)
    out = []
    for points in runs:
        curve = []
        for seconds, step, weights in points:
            evaluator.set_weights(weights)
            accuracy = float(np.mean(predict(x_test).numpy() == y_test.reshape(-1)))
            curve.append((seconds, step, accuracy))
        out.append(curve)
    return {"runs": out, "marks": marks, "replicas": replicas, "noise_scale": noise, "change_points": changes,
            "expected_seconds": expected, "periods": periods, "weights": [points[-1][2] for points in runs]}
