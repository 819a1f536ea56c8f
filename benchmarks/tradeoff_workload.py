"""The trade-off benchmark's worker program: timed fits of the MLP with stragglers, under each
straggler policy in turn.
"""

import time
from typing import Any, Dict, Optional

from benchmarks import mlp_task
from benchmarks import pacing


def tf_backup_worker(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """One worker of a tf_backup run: a warm-up fit, then `reps` timed fits of `steps` batches.

    cfg: num_backup_workers, asynchronous, hidden, batch, compute, straggler, seed, steps, reps,
    warmup, policies (straggler policies, each run `reps` times in turn: "finish", a late worker
    finishes its stale batch; "cancel", its sleep is cut short when the step moves on and the batch
    is not pushed; "restart", the same batch starts afresh on the new step). The chief
    returns, per rep, the policy, the global steps it covered and its wall time, the step history
    (step, taken, end_time) and the gradient counts.
    """
    pacing.keep_garbage()
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(num_backup_workers=cfg.get("num_backup_workers", 0),
                                              asynchronous=cfg.get("asynchronous", False),
                                              step_timeout=300.0)
    w = strategy.worker_index

    def global_step():
        try:
            return strategy.stats()["global_step"]
        except ValueError:
            return None

    x, y = mlp_task.random_data(w)
    with strategy.scope():
        model = mlp_task.build_mlp(keras, cfg["hidden"], seed=cfg.get("seed", 0))
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.01)),
                      loss="sparse_categorical_crossentropy", jit_compile=False)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(cfg.get("batch", 32)).repeat()
    sleeper = pacing.make_sleep_callback(keras, w, cfg.get("compute", 0.0), cfg.get("straggler"),
                                  cfg.get("seed", 0), global_step, strategy=strategy)
    sleeper.active = False
    model.fit(dataset, epochs=1, steps_per_epoch=cfg.get("warmup", 3), verbose=0, callbacks=[sleeper])
    strategy.wait_for_fit_end()
    # Each timed fit starts at a barrier in its first batch: every worker then starts its first
    # sleep within milliseconds of the others.
    sleeper.gate = pacing.FitBarrier(strategy).wait
    sleeper.active = True
    reps = []
    for _ in range(cfg["reps"]):
        for policy in cfg.get("policies", ["finish"]):
            sleeper.cancel = policy if policy in ("cancel", "restart") else False
            start_step = global_step()
            start, cpu = time.monotonic(), time.process_time()
            model.fit(dataset, epochs=1, steps_per_epoch=cfg["steps"], verbose=0, callbacks=[sleeper])
            strategy.wait_for_fit_end()  # a worker late in its long sleep must not run into the next rep
            reps.append({"policy": policy, "start_step": start_step, "end_step": global_step(),
                         "wall": time.monotonic() - start, "cpu": time.process_time() - cpu,
                         "first_batch": sleeper.first_batch})
    if not strategy.is_chief:
        return {"reps": reps}
    history = [(r.step, r.taken, r.end_time) for r in strategy.step_history()]
    return {"reps": reps, "history": history, "stats": strategy.stats()}
