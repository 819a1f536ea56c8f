r"""Trains a model with synchronous SGD and backup workers (tf_backup).

With no arguments: the offline default (a 1-D CNN on MNIST-1D, 4 + 1 workers,
exponential stragglers) on a local cluster of processes on this machine:

  tf-backup-train
  tf-backup-train --config=mnist1d --num_workers=6 --num_backup_workers=2 --straggler=pareto:1.5:0.02
  tf-backup-train --config=mnist --data_dir=~/tensorflow_datasets --mode=sync

On real hosts every task (ps, chief/worker 0, workers) runs the same command
with its own TF_CONFIG; a ps task serves until the job ends, then exits:

  TF_CONFIG='{"cluster": {...}, "task": {"type": "ps", "index": 0}}' tf-backup-train --config=cifar10
  TF_CONFIG='{"cluster": {...}, "task": {"type": "worker", "index": 0}}' tf-backup-train --config=cifar10

Every flag overrides the config's value. Usage errors exit with status 2.
"""

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Dict, Optional

from absl import app
from absl import flags
from absl import logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported: no start-up chatter

from trainers import config as config_lib

_CONFIG = flags.DEFINE_string(
    "config", "mnist1d", "A config of configs/ by name (mnist1d, mnist1d_mlp, mnist, cifar10, "
    "regression) or a path to a JSON file.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "Workers, N + b.", lower_bound=1)
_NUM_BACKUP_WORKERS = flags.DEFINE_string(
    "num_backup_workers", None, "Backup workers b: each step applies the first N = workers - b "
    "gradients and drops the rest. auto: the chief picks every step's N from the workers' measured "
    "compute times and the gradients' noise scale (adaptive N).")
_MIN_REPLICAS = flags.DEFINE_integer(
    "min_replicas_to_aggregate", None, "With --num_backup_workers=auto: the smallest N (default 1).",
    lower_bound=1)
_MAX_REPLICAS = flags.DEFINE_integer(
    "max_replicas_to_aggregate", None, "With --num_backup_workers=auto: the largest N (default: every "
    "worker).", lower_bound=1)
_NUM_PS = flags.DEFINE_integer("num_ps", None, "Parameter-server tasks.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", None, "Global steps to train (instead of --epochs).", lower_bound=1)
_EPOCHS = flags.DEFINE_integer("epochs", None, "Passes over the training set (instead of --steps).",
                               lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Examples per worker per step.", lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", None, "Learning rate of the inner optimizer.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", None, list(config_lib.OPTIMIZERS), "The inner Keras optimizer.")
_MODE = flags.DEFINE_enum(
    "mode", None, list(config_lib.MODES),
    "sync_backup: N of N + b gradients per step; sync: all workers (b = 0); async: every gradient "
    "applied as it comes, no staleness check.")
_STRAGGLER = flags.DEFINE_string(
    "straggler", None, "Injected delays: none, slow:WORKER:FACTOR, exp:MEAN, pareto:SHAPE:SCALE, "
    "trace:PATH, SPEC+SPEC (conditions at once), or phases:SPEC;STEP:SPEC[;...] (conditions that change at a "
    "step; quote the ;) "
    "(seconds; seeded by --seed).")
_CANCEL_STRAGGLERS = flags.DEFINE_boolean(
    "cancel_stragglers", None, "Cut an injected delay short once the global step moves past the "
    "worker's parameters: the batch is cancelled instead of finished and dropped (default: off, as in "
    "the paper).")
_RESTART_STRAGGLERS = flags.DEFINE_boolean(
    "restart_stragglers", None, "Cut an injected delay short as --cancel_stragglers does, then restart "
    "the batch on the new step after a fresh delay: it is pushed for that step, not skipped (the model "
    "of the order-statistic ideal).")
_SEED = flags.DEFINE_integer("seed", None, "Seeds initializers, shuffling and stragglers.", lower_bound=0)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
_LOCAL_CLUSTER = flags.DEFINE_boolean(
    "local_cluster", None, "Spawn the ps and worker tasks on this machine (tf_backup.launch_local). "
    "Default: on, unless TF_CONFIG names a cluster.")
_RESTART_FAILED = flags.DEFINE_boolean(
    "restart_failed", False, "With --local_cluster: restart any task that exits non-zero (up to "
    "--max_restarts times each), as a cluster manager would; a restarted chief resumes from the "
    "latest checkpoint, and the job finishes with nothing for a person to do.")
_PS_RESTART_TIMEOUT = flags.DEFINE_float(
    "ps_restart_timeout", None, "Seconds to wait for a ps task that failed to come back (restarted by "
    "--restart_failed or a cluster manager); the chief then writes the shared state again and "
    "training goes on, nothing redone. 0: a lost ps ends the job (resume it from the checkpoint). "
    "Default: 60 with --restart_failed (without --apply_on_ps), else 0. Give every task the same value.",
    lower_bound=0.0)
_CHIEF_REJOINS = flags.DEFINE_boolean(
    "chief_rejoins", None, "A restarted chief rejoins its running job from its latest checkpoint and the "
    "workers carry on (at most --checkpoint_every steps redone, no batch read twice); off: it starts a "
    "new job and every worker restarts into it. Default: on with --restart_failed (without --apply_on_ps). "
    "Give every task "
    "the same value.")
_WIRE_DTYPE = flags.DEFINE_enum(
    "wire_dtype", "float32", ["float32", "bfloat16", "float16"],
    "What gradients and parameters cross the network in; sums, the master copy and the optimizer's "
    "state stay float32. Give every task the same value.")
_APPLY_ON_PS = flags.DEFINE_boolean(
    "apply_on_ps", None, "Each ps task applies the update to its shard (SGD, momentum, Adam only): no "
    "model-sized transfer through the chief; a lost task resumes the job from its last checkpoint. Not "
    "with --ps_restart_timeout or --chief_rejoins. Default: on for sgd, momentum and adam unless a "
    "restart in place is asked for (--ps_restart_timeout, --chief_rejoins, or --restart_failed's "
    "defaults of them). Give every task the same value.")
_MAX_RESTARTS = flags.DEFINE_integer(
    "max_restarts", 5, "With --restart_failed: how many times each task may be restarted.", lower_bound=1)
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Checkpoints, TensorBoard logs, task logs and the config (default: a new "
    "directory under /tmp/tf_backup_runs).")
_SUMMARY_JSON = flags.DEFINE_string("summary_json", None, "Also write the end-of-run summary here.")
_LOG_EVERY = flags.DEFINE_integer("log_every", None, "Global steps between progress lines.", lower_bound=1)
_TIMEOUT = flags.DEFINE_float("timeout", 3600.0, "Seconds the whole local run may take.", lower_bound=1.0)
_STARTUP_TIMEOUT = flags.DEFINE_float(
    "startup_timeout", 300.0, "Seconds to wait for the ps tasks and the chief at start-up.", lower_bound=1.0)
_STEP_TIMEOUT = flags.DEFINE_float(
    "step_timeout", 600.0, "Seconds a worker waits for one global step.", lower_bound=1.0)
_WORKER_TIMEOUT = flags.DEFINE_float(
    "worker_timeout", 30.0, "Seconds without a heartbeat after which the chief declares a worker "
    "dead: up to b dead workers are tolerated, with more the job stops with a checkpoint.",
    lower_bound=1.0)
_CHIEF_TIMEOUT = flags.DEFINE_float(
    "chief_timeout", 120.0, "Seconds without the chief's heartbeat after which workers give up.",
    lower_bound=1.0)
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 100, "Global steps between checkpoints in --model_dir/checkpoints (one is "
    "also written at the end). Running the same command again resumes from the latest.",
    lower_bound=1)

_JIT_COMPILE = flags.DEFINE_enum(
    "jit_compile", "auto", ["auto", "true", "false"],
    "XLA for the replica step (Keras's compile(jit_compile=...)); the exchange with the ps runs on the "
    "host either way. auto: Keras's choice (off under a distribution strategy).")


def _finite(value) -> bool:
    return value is None or math.isfinite(value)


# absl's bounds let NaN through (no comparison with it is true) and infinity past a lower bound: such a
# value would reach the tasks and fail there, after the cluster started.
for _holder in (_LEARNING_RATE, _PS_RESTART_TIMEOUT, _TIMEOUT, _STARTUP_TIMEOUT, _STEP_TIMEOUT, _WORKER_TIMEOUT,
                _CHIEF_TIMEOUT):
    flags.register_validator(_holder, _finite, message="must be a finite number")

_OVERRIDES = {
    "num_workers": _NUM_WORKERS, "num_ps": _NUM_PS,
    "min_replicas_to_aggregate": _MIN_REPLICAS, "max_replicas_to_aggregate": _MAX_REPLICAS,
    "steps": _STEPS, "epochs": _EPOCHS, "batch_size": _BATCH_SIZE, "learning_rate": _LEARNING_RATE,
    "optimizer": _OPTIMIZER, "mode": _MODE, "straggler": _STRAGGLER,
    "cancel_stragglers": _CANCEL_STRAGGLERS,
    "restart_stragglers": _RESTART_STRAGGLERS, "seed": _SEED,
    "data_dir": _DATA_DIR, "log_every": _LOG_EVERY,
}
PROG = "tf-backup-train"
# Where runs go without --model_dir: not /tmp/tf_backup, whose empty parent would shadow the package
# (`import tf_backup` from /tmp would find a namespace package there).
RUNS_DIR = "tf_backup_runs"


def default_model_dir(now: Optional[float] = None) -> str:
    """A new directory for a run without --model_dir: /tmp/tf_backup_runs/<date-time>."""
    return os.path.join(tempfile.gettempdir(), RUNS_DIR, time.strftime("%Y%m%d-%H%M%S", time.localtime(now)))


def resolve_config() -> config_lib.TrainConfig:
    """The config named by --config with every given flag applied; validated."""
    base = config_lib.TrainConfig.from_dict(config_lib.read(_CONFIG.value))
    return base.replace(num_backup_workers=backup_workers_flag(_NUM_BACKUP_WORKERS.value),
                        **{name: flag.value for name, flag in _OVERRIDES.items()})


def backup_workers_flag(value):
    """--num_backup_workers: None (not given), an integer, or "auto"."""
    if value is None or value == config_lib.AUTO:
        return value
    if not value.strip().isdecimal():
        raise config_lib.ConfigError(
            f'--num_backup_workers must be an integer >= 0 or "auto". Received num_backup_workers={value!r}')
    return int(value)


def check_inputs(config: config_lib.TrainConfig) -> None:
    """Checks what can fail before any process starts: straggler spec, dataset."""
    from tf_backup.sim import stragglers  # pylint: disable=g-import-not-at-top
    from trainers import data  # pylint: disable=g-import-not-at-top

    try:
        stragglers.parse(config.straggler, seed=config.seed)
    except ValueError as e:
        raise config_lib.ConfigError(f"--straggler={config.straggler}: {e}") from e
    try:
        data.load(config.dataset, split="test", batch_size=config.batch_size, data_dir=config.data_dir)
    except ValueError as e:
        raise config_lib.ConfigError(f"--config/dataset={config.dataset}: {e}") from e


def make_optimizer(name: str, learning_rate: float):
    import keras  # pylint: disable=g-import-not-at-top

    return {
        "sgd": lambda: keras.optimizers.SGD(learning_rate),
        "momentum": lambda: keras.optimizers.SGD(learning_rate, momentum=0.9),
        "adam": lambda: keras.optimizers.Adam(learning_rate),
        "rmsprop": lambda: keras.optimizers.RMSprop(learning_rate),
        "adamw": lambda: keras.optimizers.AdamW(learning_rate),
    }[name]()


def keras_jit_compile(flag: str):
    """The --jit_compile flag as Keras's `compile(jit_compile=...)` takes it."""
    return {"auto": "auto", "true": True, "false": False}[flag]


def train_task(config_values: Dict[str, Any], model_dir: str, strategy_args: Dict[str, Any],
               jit_compile="auto") -> Dict[str, Any]:
    """Runs one worker's part of the job (every worker process runs this).

    Returns:
      On every worker its own counts; on the chief also `summary`, the
      end-of-run summary of the whole job.
    """
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    import tf_backup  # pylint: disable=g-import-not-at-top
    from tf_backup.sim import stragglers  # pylint: disable=g-import-not-at-top
    from tf_backup.protocol import slow_workers  # pylint: disable=g-import-not-at-top
    from trainers import data  # pylint: disable=g-import-not-at-top
    from trainers import models  # pylint: disable=g-import-not-at-top
    from trainers import progress  # pylint: disable=g-import-not-at-top

    config = config_lib.TrainConfig.from_dict(config_values)
    _, info = data.load(config.dataset, split="test", batch_size=config.batch_size, data_dir=config.data_dir)
    epochs, steps_per_epoch = config.schedule(info.num_train)
    total = total_steps(config, epochs, steps_per_epoch)
    strategy = tf_backup.BackupWorkerStrategy(
        **config.strategy_args(), max_steps=total, checkpoint_dir=os.path.join(model_dir, "checkpoints"),
        **strategy_args)
    w, num_workers = strategy.worker_index, strategy.num_workers
    keras.utils.set_random_seed(config.seed)
    train, _ = data.load(config.dataset, split="train", batch_size=config.batch_size,
                            num_shards=num_workers, shard_index=w, shuffle_seed=config.seed + w,
                            repeat=True, data_dir=config.data_dir)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    train = train.with_options(options)  # data.load already gave this worker its own shard
    classifier = info.num_classes > 1
    with strategy.scope():
        model = models.build(config.model["kind"], info.input_shape, info.num_classes, seed=config.seed,
                             **{k: v for k, v in config.model.items() if k != "kind"})
        optimizer = tf_backup.SyncReplicasOptimizer(make_optimizer(config.optimizer, config.learning_rate))
        model.compile(optimizer=optimizer,
                      loss="sparse_categorical_crossentropy" if classifier else "mse",
                      metrics=["accuracy"] if classifier else [], jit_compile=jit_compile)
        # Built now, not at the first step: the chief restores the latest checkpoint
        # here and every worker learns the global step the job starts from.
        optimizer.build(model.trainable_variables)
    initial_step = strategy.initial_step
    # Batches this worker's predecessors (or the checkpoint's job) trained on: the fit reads on from there
    # (`resume_input` below).
    input_position = strategy.input_position
    # A resumed job (or a restarted worker) starts its fit at the epoch it is in;
    # the chief stops every worker at global step `total` (max_steps) either way.
    global_per_epoch = steps_per_epoch * (num_workers if config.mode == "async" else 1)
    initial_epoch = min(initial_step // global_per_epoch, epochs - 1)
    model_spec = stragglers.parse(config.straggler, seed=config.seed)
    cut = config.cancel_stragglers or config.restart_stragglers
    delays = stragglers.StragglerCallback(model_spec, w, cancel=strategy if cut else None,
                                          restart=config.restart_stragglers)
    callbacks = [delays]
    if strategy.is_chief:
        if initial_step:
            print(f"{PROG}: resumed from the checkpoint of global step {initial_step} in "
                  f"{model_dir}/checkpoints; training to step {total}", flush=True)
        callbacks.append(progress.ProgressLine(config.log_every, total_steps=total, initial_step=initial_step))
        # Every `log_every` batches too: the step metrics (N among them) as they change, not only per epoch.
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(model_dir, "tensorboard"),
                                                     update_freq=config.log_every))
    start = time.monotonic()
    # A worker that carries on through a chief's rejoin also trains the redone steps: one spare epoch
    # (max_steps ends every fit at step `total` all the same).
    spare = int(strategy_args.get("chief_rejoins", False))
    # shuffle=False: data.load shuffles (seeded); Keras warns that it ignores its default shuffle=True
    # for a dataset.
    history = model.fit(strategy.distribute_dataset(train, resume_input=True), epochs=epochs + spare,
                        initial_epoch=initial_epoch, shuffle=False,
                        steps_per_epoch=steps_per_epoch, verbose=2 if strategy.is_chief else 0,
                        callbacks=callbacks)
    wall = time.monotonic() - start
    result = {"worker": w, "local_batches": len(delays.delays), "straggler_delay_seconds": delays.total_delay,
              "restarted": delays.restarted, "input_position": input_position}
    if not strategy.is_chief:
        return result
    stats = strategy.stats()
    test, _ = data.load(config.dataset, split="test", batch_size=256, data_dir=config.data_dir)
    evaluation = model.evaluate(test, verbose=0, return_dict=True)
    model.save(os.path.join(model_dir, "model.keras"))
    result["summary"] = {
        "config": config.to_dict(),
        "dataset_reference": info.reference,
        "model_dir": model_dir,
        "mode": config.mode,
        "num_workers": num_workers,
        "num_backup_workers": config.num_backup_workers,
        "replicas_to_aggregate": config.replicas_to_aggregate,
        "straggler": model_spec.describe(),
        "jit_compile": bool(model.jit_compile),
        "update_on_ps": optimizer.update_on_ps,  # apply_on_ps as the strategy resolved it for this optimizer
        "test_loss": float(evaluation["loss"]),
        "test_accuracy": float(evaluation["accuracy"]) if classifier else None,
        "steps": stats["global_step"],
        "resumed_from_step": initial_step,
        "wall_seconds": wall,
        "steps_per_second": (stats["global_step"] - initial_step) / wall if wall > 0 else 0.0,
        "worker_events": [dataclasses.asdict(e) for e in strategy.worker_events()],
        "gradients": {k: stats[k] for k in ("pushed", "taken", "dropped", "cancelled")},
        "input_batches": stats["batches"],  # per worker, batches of its shard finished with in this job
        "state_rewrites": strategy.counters().state_rewrites,  # after a ps restart (ps_restart_timeout)
        "history": {k: [float(x) for x in v] for k, v in history.history.items()},
        "replicas_per_step": replicas_per_step(strategy.step_history()) if config.adaptive else None,
        "slow_workers": [s._asdict() for s in slow_workers.spans(
            [(r.step, r.slow_workers) for r in strategy.step_history()])],
    }
    return result


def replicas_per_step(records) -> Dict[str, Any]:
    """Adaptive N over the chief's steps: min, median, max, the last, how many steps had each N, and the
    last noise-scale estimate (in worker batches). The record holds the newest 100,000 steps
    (`tf_backup.chief.aggregator.HISTORY_LIMIT`): a longer job's summary covers those."""
    import numpy as np  # pylint: disable=g-import-not-at-top

    n = [r.replicas for r in records]
    if not n:
        return {"min": None, "median": None, "max": None, "last": None, "steps_with": {}, "noise_scale": None}
    noise = records[-1].noise_scale
    return {"min": min(n), "median": float(np.median(n)), "max": max(n), "last": n[-1],
            "steps_with": {str(k): n.count(k) for k in sorted(set(n))},
            "noise_scale": None if noise is None or not np.isfinite(noise) else float(noise)}


def total_steps(config: config_lib.TrainConfig, epochs: int, steps_per_epoch: int) -> int:
    """The global step the job trains to (in async mode every worker's gradient is a step)."""
    if config.steps is not None:
        return config.steps
    return epochs * steps_per_epoch * (config.num_workers if config.mode == "async" else 1)


def merge(results) -> Dict[str, Any]:
    """The chief's summary plus what each worker measured itself (local runs).

    A worker whose process was lost (None) is listed with its counts from the ps.
    """
    summary = dict(next(r["summary"] for r in results if r and "summary" in r))
    results = [r or {"worker": w, "local_batches": None, "straggler_delay_seconds": 0.0, "restarted": None,
                     "input_position": None, "lost": True}
               for w, r in enumerate(results)]
    summary["workers"] = [
        {"worker": r["worker"], "local_batches": r["local_batches"],
         "straggler_delay_seconds": round(r["straggler_delay_seconds"], 3),
         "restarted": r["restarted"],
         "input_position": r["input_position"],  # where its last process's input began
         **{k: summary["gradients"][k][r["worker"]] for k in ("pushed", "taken", "dropped", "cancelled")},
         **({"lost": True} if r.get("lost") else {})}
        for r in results
    ]
    return summary


def format_summary(summary: Dict[str, Any]) -> str:
    g = summary["gradients"]
    accuracy = summary["test_accuracy"]
    lines = [
        "summary | mode: {mode} | workers: {num_workers} (N = {replicas_to_aggregate}, b = {num_backup_workers})"
        " | straggler: {straggler}".format(**summary) if not summary.get("replicas_per_step") else
        "summary | mode: {mode} | workers: {num_workers} (N = auto, b = auto) | straggler: {straggler}".format(
            **summary),
        f"summary | test_accuracy: {accuracy:.4f} | test_loss: {summary['test_loss']:.4f}"
        if accuracy is not None else f"summary | test_loss: {summary['test_loss']:.6f}",
        f"summary | steps: {summary['steps']} | wall: {summary['wall_seconds']:.1f} s | "
        f"steps/s: {summary['steps_per_second']:.2f}"
        + {True: " | update: on the ps tasks", False: " | update: on the chief"}.get(summary.get("update_on_ps"), ""),
        f"summary | gradients pushed: {sum(g['pushed'])} | taken: {sum(g['taken'])} | "
        f"dropped: {sum(g['dropped'])}" + (f" | cancelled: {sum(g['cancelled'])}" if sum(g["cancelled"]) else ""),
    ]
    chosen = summary.get("replicas_per_step")
    if chosen and chosen["last"] is not None:
        counts = ", ".join(f"N = {k}: {v}" for k, v in chosen["steps_with"].items())
        noise = "unknown" if chosen["noise_scale"] is None else f"{chosen['noise_scale']:.1f} worker batches"
        lines.append(f"summary | adaptive N: min {chosen['min']}, median {chosen['median']:g}, max {chosen['max']}, "
                     f"last {chosen['last']} | steps with {counts} | noise scale: {noise}")
    for w, (p, t, d, c) in enumerate(zip(g["pushed"], g["taken"], g["dropped"], g["cancelled"])):
        lines.append(f"summary | worker {w}: pushed {p}, taken {t}, dropped {d}" + (f", cancelled {c}" if c else ""))
    if summary.get("resumed_from_step"):
        lines.append(f"summary | resumed from the checkpoint of step {summary['resumed_from_step']}")
    starts = [w.get("input_position") for w in summary.get("workers", [])]
    if any(starts):
        lines.append("summary | input resumed at batch " + ", ".join(
            f"{'?' if p is None else p} (worker {w})" for w, p in enumerate(starts)))
    if summary.get("state_rewrites"):
        lines.append(f"summary | the chief wrote the shared state again after a ps restart: "
                     f"{summary['state_rewrites']}x (nothing redone)")
    if summary.get("task_restarts"):
        lines.append("summary | restarted by the supervisor: "
                     + ", ".join(f"{name} {count}x" for name, count in summary["task_restarts"].items()))
    for s in summary.get("slow_workers", []):
        lines.append(f"summary | worker {s['worker']} was slow from step {s['since_step']} to {s['last_step']}: "
                     f"up to {s['factor']:.2f}x the typical worker's compute time")
    for e in summary.get("worker_events", []):
        lines.append(f"summary | worker {e['worker']} {e['task']} {e['event']} at global step {e['step']} "
                     f"(last gradient for step {e['last_step']})")
    lines.append(f"summary | reference: {summary['dataset_reference']}")
    lines.append(f"summary | model_dir: {summary['model_dir']}")
    return "\n".join(lines)


def write_summary(summary: Dict[str, Any], paths) -> None:
    for path in paths:
        if not path:
            continue
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(path + ".tmp", path)


def check_cluster(config: config_lib.TrainConfig, resolver) -> None:
    """Checks a TF_CONFIG cluster against the config before anything starts: --num_workers must be its workers.

    Raises:
      ConfigError: --num_workers differs from the cluster's workers (the schedule and N would be wrong).
      ValueError: the cluster itself is not valid (`tf_backup.topology.cluster_info`).
    """
    from tf_backup import topology  # pylint: disable=g-import-not-at-top

    info = topology.cluster_info(resolver)
    if info.num_workers != config.num_workers:
        raise config_lib.ConfigError(
            f"--num_workers={config.num_workers} but TF_CONFIG's cluster has {info.num_workers} workers "
            f"({', '.join(t.job + '/' + str(t.index) for t in info.workers)}): set --num_workers to the number "
            f"of its chief and worker tasks. Received num_workers={config.num_workers}")


def _in_tf_config_cluster() -> bool:
    value = os.environ.get("TF_CONFIG") or "{}"
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise config_lib.ConfigError(
            f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos}): {value[:300]!r}") from e
    if not isinstance(parsed, dict):
        raise config_lib.ConfigError(f"TF_CONFIG must be a JSON object. Received TF_CONFIG={value[:300]!r}")
    return bool(parsed.get("cluster"))


def ps_restart_timeout() -> float:
    """--ps_restart_timeout, or its default: 60 s under --restart_failed (a ps that dies comes back), else 0."""
    if _PS_RESTART_TIMEOUT.value is not None:
        return _PS_RESTART_TIMEOUT.value
    return 60.0 if _RESTART_FAILED.value and not _APPLY_ON_PS.value else 0.0


def main(argv) -> int:
    if len(argv) > 1:
        raise config_lib.ConfigError(f"Unexpected arguments {argv[1:]}: every option is a --flag.")
    config = resolve_config()
    if _APPLY_ON_PS.value and config.optimizer not in ("sgd", "momentum", "adam"):
        raise config_lib.ConfigError(  # tf_backup.ps.ps_update has kernels for these only
            f"--apply_on_ps supports --optimizer=sgd, momentum or adam. Received optimizer={config.optimizer!r}")
    local = _LOCAL_CLUSTER.value if _LOCAL_CLUSTER.value is not None else not _in_tf_config_cluster()
    # BackupWorkerStrategy arguments from flags (every worker gets the same).
    strategy_args = {"startup_timeout": _STARTUP_TIMEOUT.value, "step_timeout": _STEP_TIMEOUT.value,
                     "worker_timeout": _WORKER_TIMEOUT.value, "chief_timeout": _CHIEF_TIMEOUT.value,
                     "checkpoint_every_steps": _CHECKPOINT_EVERY.value,
                     "ps_restart_timeout": ps_restart_timeout(),
                     "chief_rejoins": (_RESTART_FAILED.value and not _APPLY_ON_PS.value if _CHIEF_REJOINS.value is None
                                       else _CHIEF_REJOINS.value),
                     "wire_dtype": _WIRE_DTYPE.value,
                     "apply_on_ps": "auto" if _APPLY_ON_PS.value is None else _APPLY_ON_PS.value}
    model_dir = _MODEL_DIR.value or default_model_dir()
    if _RESTART_FAILED.value and not local:
        raise config_lib.ConfigError(
            "--restart_failed supervises the tasks of a --local_cluster; under a TF_CONFIG cluster, "
            "let the cluster manager restart failed tasks (e.g. restartPolicy: OnFailure).")
    if local:
        check_inputs(config)
        os.makedirs(model_dir, exist_ok=True)
        write_summary(config.to_dict(), [os.path.join(model_dir, "config.json")])
        import tf_backup  # pylint: disable=g-import-not-at-top

        print(f"{PROG}: {config.num_workers} workers (N = {config.replicas_to_aggregate}), "
              f"{config.num_ps} ps, mode {config.mode}, dataset {config.dataset}, straggler "
              f"{config.straggler}; logs in {model_dir}/logs", flush=True)
        cluster = tf_backup.LocalCluster(
            train_task, config.num_workers, num_ps=config.num_ps,
            args=(config.to_dict(), model_dir, strategy_args, keras_jit_compile(_JIT_COMPILE.value)),
            log_dir=os.path.join(model_dir, "logs"),
            serve_kwargs={"ps_restart_timeout": strategy_args["ps_restart_timeout"],
                          "chief_rejoins": strategy_args["chief_rejoins"]})
        with cluster:
            cluster.start()
            results = cluster.wait(_TIMEOUT.value, echo="worker-0", max_failed_workers=config.tolerated_failures,
                                   max_restarts=_MAX_RESTARTS.value if _RESTART_FAILED.value else 0)
        summary = merge(results)
        summary["task_restarts"] = {name: count for name, count in cluster.restarts().items() if count}
    else:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        import tf_backup  # pylint: disable=g-import-not-at-top

        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        if resolver.task_type == "ps":
            tf_backup.serve(resolver, startup_timeout=_STARTUP_TIMEOUT.value,
                            ps_restart_timeout=strategy_args["ps_restart_timeout"],
                            chief_rejoins=strategy_args["chief_rejoins"])
            _exit_without_teardown(0)
        check_cluster(config, resolver)
        check_inputs(config)
        try:
            result = train_task(config.to_dict(), model_dir, strategy_args, keras_jit_compile(_JIT_COMPILE.value))
        except BaseException:
            tf_backup.frontend.extended.shutdown_all(failed=True)  # the chief aborts the job for everyone
            raise
        tf_backup.frontend.extended.shutdown_all()  # leave the job now, not at exit: the exit skips teardown
        if "summary" in result:
            summary = merge([result])
            print(format_summary(summary), flush=True)
            write_summary(summary, [os.path.join(model_dir, "summary.json"), _SUMMARY_JSON.value])
        _exit_without_teardown(0)
    print(format_summary(summary), flush=True)
    write_summary(summary, [os.path.join(model_dir, "summary.json"), _SUMMARY_JSON.value])
    return 0


def _exit_without_teardown(code: int) -> None:
    """Ends a TF_CONFIG task, skipping the interpreter's teardown, as `tf_backup.local._task` does.

    A task whose ps tasks exited first may still hold a session closing towards one (a daemon thread,
    `Endpoint.close`), and TensorFlow aborts a process torn down under such a call: exit -6, which a
    cluster manager would restart (seen on a worker of a TFJob's TF_CONFIG, 1 run in 6).
    """
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)


def _main(argv):
    try:
        return main(argv)
    except config_lib.ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError, ValueError) as e:  # LocalClusterError is a RuntimeError
        print(f"{PROG}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def run():
    """Console-script entry point (`tf-backup-train`)."""
    app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
