"""Programs of the fault tests: killed tasks (test_faults.py), a silent connection to a ps (test_recovery.py).

`train_through_faults` records every batch a step trains on (`input_log` reads it back).
"""

import glob
import os
import time

import numpy as np

from programs import common


def _input_recorder_class():
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    class InputRecorder(keras.layers.Layer):
        """Passes the features on without their last column (a batch's position), which it records."""

        def __init__(self, record, **kwargs):
            super().__init__(**kwargs)
            self._record = record

        def call(self, x):
            # A stateful op: it runs with every step (not in Keras's symbolic build, which only traces).
            tf.py_function(self._record, [x[:, -1]], [])
            return x[:, :-1]

        def compute_output_shape(self, input_shape):
            return input_shape[:-1] + (input_shape[-1] - 1,)

    return InputRecorder


def weights_log(progress_dir: str, task: str):
    """What `train_through_faults` recorded for `task`: per process in order, its (step, flat weights) pairs."""
    runs = {}
    with open(os.path.join(progress_dir, f"{task}.weights")) as f:
        for line in f:
            pid, step, *values = line.split()
            runs.setdefault(int(pid), []).append((int(step), [float(v) for v in values]))
    return list(runs.values())


def chief_state(progress_dir: str, step: int):
    """What the chief held when it saved its checkpoint of `step`: (master variables, inner optimizer variables).

    A chief killed between its save and the rename (`_record_chief_saves`) left its file under its
    pid: the checkpoint on disk is then that process's, the newest such file if several.
    """
    path = os.path.join(progress_dir, f"chief-state-{step}.npz")
    if not os.path.exists(path):
        pending = glob.glob(os.path.join(progress_dir, f"chief-state-{step}.*.npz"))
        path = max(pending, key=os.path.getmtime) if pending else path
    with np.load(path) as f:
        master = [f[f"master_{i}"] for i in range(int(f["num_master"]))]
        inner = [f[f"optimizer_{i}"] for i in range(len(f.files) - 1 - len(master))]
    return master, inner


def _record_chief_saves(progress_dir: str, optimizer) -> None:
    """Makes every checkpoint save of this process record what the chief holds in `chief_state`'s file.

    Read from the optimizer's own handles (not the checkpoint's list), in the aggregator's thread at
    the save, when the master copy and the slots are those of the step saved. Written before the
    save and renamed into place once it is done (a save skipped, of the step restored, writes
    nothing): the file of a step is that of its checkpoint on disk, the latest process's.
    """
    from tf_backup.chief import checkpoint  # pylint: disable=g-import-not-at-top

    original = checkpoint.Checkpoint.save

    def save(self, step, why, input_positions=None):
        saved_before = self.saved_step
        arrays = {f"master_{i}": v.numpy() for i, v in enumerate(optimizer.master_variables)}
        arrays.update({f"optimizer_{i}": v.numpy() for i, v in enumerate(optimizer.inner_optimizer.variables)})
        path = os.path.join(progress_dir, f"chief-state-{step}")
        np.savez(path + f".{os.getpid()}.npz", num_master=len(optimizer.master_variables), **arrays)
        original(self, step, why, input_positions=input_positions)
        if step != saved_before:
            os.replace(path + f".{os.getpid()}.npz", path + ".npz")
        else:
            os.remove(path + f".{os.getpid()}.npz")

    checkpoint.Checkpoint.save = save


def input_log(progress_dir: str, task: str):
    """What `train_through_faults` recorded for `task`: per process in order, its (position, step) pairs."""
    runs = {}
    with open(os.path.join(progress_dir, f"{task}.input")) as f:
        for line in f:
            pid, position, step = (int(v) for v in line.split())
            runs.setdefault(pid, []).append((position, step))
    return list(runs.values())


def train_through_faults(steps: int, num_backup_workers: int, progress_dir: str,
                         checkpoint_dir=None, checkpoint_every_steps: int = 5,
                         worker_timeout: float = 3.0, chief_timeout: float = 8.0,
                         compute_seconds: float = 0.05, ps_restart_timeout: float = 0.0,
                         chief_rejoins: bool = False, chief_dies_after_fit: str = "", apply_on_ps: bool = False):
    """The program of the fault-injection tests: trains to global step `steps`.

    A linear model with SGD + momentum (so the optimizer has state to
    checkpoint). After every batch, each worker writes its global step to
    `progress_dir/<task>.step`, which the test watches to pick kill moments.
    Its input resumes at `strategy.input_position` (`resume_input`); each
    batch trained on appends `<pid> <position> <step>` to
    `progress_dir/<task>.input` (its position in the worker's shard of
    batches, and the step of the parameters it was computed on), written by
    the model's first layer as the step runs (`input_log`). After every batch
    it appends `<pid> <step> <weights...>` to `progress_dir/<task>.weights`
    (the parameters it pulled, flat: `weights_log`), and the chief records what
    it holds at each checkpoint save (`chief_state`). A `fit` that raises
    `WorkersLostError` writes its message to `progress_dir/<task>.workers_lost`
    first. `chief_dies_after_fit`
    (a marker file's path): the chief's first process exits 1 once its fit
    returned (the last step done) and before the job is done.
    """
    import os  # pylint: disable=g-import-not-at-top
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top

    strategy = tf_backup.BackupWorkerStrategy(
        num_backup_workers=num_backup_workers, step_timeout=60.0, startup_timeout=60.0,
        chief_timeout=chief_timeout, worker_timeout=worker_timeout, max_steps=steps,
        checkpoint_dir=checkpoint_dir, checkpoint_every_steps=checkpoint_every_steps, ps_timeout=10.0,
        ps_restart_timeout=ps_restart_timeout, chief_rejoins=chief_rejoins, apply_on_ps=apply_on_ps)
    task = os.environ["TF_BACKUP_TASK"]
    InputRecorder = _input_recorder_class()  # pylint: disable=invalid-name
    x, y = common.regression_data(64)
    log_path = os.path.join(progress_dir, f"{task}.input")

    def record(positions):  # the position in the whole stream; this worker reads every num_workers-th batch
        position = (int(positions.numpy()[0]) - strategy.worker_index) // strategy.num_workers
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()} {position} {strategy.extended.latest_binding().client.step}\n")

    with strategy.scope():
        model = keras.Sequential([keras.Input((common.FEATURES + 1,)), InputRecorder(record),
                                  common.regression_model(keras)])
        optimizer = tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.05, momentum=0.9))
        model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
        if strategy.is_chief and checkpoint_dir:
            _record_chief_saves(progress_dir, optimizer)
        optimizer.build(model.trainable_variables)  # restores the checkpoint, joins the job
    initial_step = strategy.initial_step
    restored_optimizer = [v.numpy() for v in optimizer.inner_optimizer.variables]
    restored_master = [v.numpy() for v in optimizer.master_variables] if strategy.is_chief else None
    weights_path = os.path.join(progress_dir, f"{task}.weights")

    class Progress(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            time.sleep(compute_seconds)

        def on_train_batch_end(self, batch, logs=None):
            flat = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
            with open(weights_path, "a") as f:  # repr: a float32 read back exactly
                f.write(f"{os.getpid()} {strategy.counters().step} {' '.join(repr(float(v)) for v in flat)}\n")
            common.write_atomic(os.path.join(progress_dir, f"{task}.step"), str(int(logs["global_step"])))
            if strategy.is_chief:  # what the chief has seen of the workers so far, for a test to wait on
                common.write_atomic(os.path.join(progress_dir, "chief.events"),
                                    " ".join(f"{e.worker}:{e.event.value}" for e in strategy.worker_events()))

    def with_position(position, batch):  # the position as the features' last column
        features, labels = batch
        column = tf.fill([tf.shape(features)[0], 1], tf.cast(position, tf.float32))
        return tf.concat([features, column], axis=1), labels

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(common.BATCH).repeat().enumerate().map(with_position)
    # A worker that carries on through a chief's rejoin trains the redone steps too (up to
    # checkpoint_every_steps), and the batch it had computed for a step the rejoin took back is not
    # pushed (`restart.next_move`: PULL): up to checkpoint_every_steps + 1 batches more than `steps`.
    # (With only checkpoint_every_steps, a kill just before a checkpoint's save ended the workers'
    # fits one step short: [1-chief] of the slow suite, 59 of 60.) max_steps ends every fit at `steps`.
    spare = checkpoint_every_steps + 1 if chief_rejoins else 0
    try:
        model.fit(strategy.distribute_dataset(dataset, resume_input=True), epochs=1, steps_per_epoch=steps + spare,
                  verbose=0, callbacks=[Progress()])
    except tf_backup.errors.WorkersLostError as e:  # caught by type, as a user would: recorded, raised on
        common.write_atomic(os.path.join(progress_dir, f"{task}.workers_lost"), e.message)
        raise
    if chief_dies_after_fit and strategy.is_chief and not os.path.exists(chief_dies_after_fit):
        open(chief_dies_after_fit, "w").close()
        os._exit(1)  # the job reached its last step (FINISHED); its shutdown would have marked it done
    result = {"worker": strategy.worker_index, "initial_step": initial_step, "stats": strategy.stats(),
              "weights": [v.numpy() for v in model.trainable_variables],
              "input_position": strategy.input_position,
              "generation": strategy.counters().state_generation}
    if strategy.is_chief:
        result["state_rewrites"] = strategy.counters().state_rewrites
        result["events"] = [(e.worker, e.event, e.step, e.last_step) for e in strategy.worker_events()]
        result["contributions"] = [(r.step, r.contributions) for r in strategy.step_history()]
        result["restored_optimizer"] = restored_optimizer
        result["restored_master"] = restored_master
        result["master"] = [v.numpy() for v in optimizer.master_variables]
        result["wake_queue_sizes"] = strategy.extended.latest_binding().state.wake_queue_sizes()
    return result


def train_through_a_silent_connection(steps: int, silent_worker: int, silent_at: int, ps_restart_timeout: float):
    """`train_regression` (b = 1) in which one worker's connection to ps 0 goes silent at its batch `silent_at`
    (-1: after its last batch, so the first run to meet it is the end of the fit round's).

    That worker reaches ps 0 through a `tests.relay.Relay` (its TF_CONFIG names
    the relay), whose connections open at that batch stop forwarding: its runs
    meet their deadline (`ps_timeout`, 5 s) and new connections work.
    """
    import os  # pylint: disable=g-import-not-at-top
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top
    from tests.relay import relay_ps0_in_tf_config  # pylint: disable=g-import-not-at-top

    relay = relay_ps0_in_tf_config() if os.environ["TF_BACKUP_TASK"] == f"worker-{silent_worker}" else None
    strategy = tf_backup.BackupWorkerStrategy(
        num_backup_workers=1, step_timeout=60.0, ps_timeout=5.0, max_steps=steps,
        ps_restart_timeout=ps_restart_timeout)
    x, y = common.regression_data(steps * strategy.num_workers)
    with strategy.scope():
        model = common.regression_model(keras)
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)), loss="mse")

    class Silence(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            time.sleep(0.05)
            if relay is not None and batch == silent_at:
                relay.silence_all()

        def on_epoch_end(self, epoch, logs=None):  # before Keras ends the round (finalize_variable_values)
            if relay is not None and silent_at < 0:
                relay.silence_all()

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(common.BATCH).repeat()
    start = time.monotonic()
    error = message = None
    try:
        model.fit(strategy.distribute_dataset(dataset), epochs=1, steps_per_epoch=steps, verbose=0,
                  callbacks=[Silence()])
    except tf_backup.PsUnavailableError as e:
        error, message = type(e).__name__, e.message
    result = {"worker": strategy.worker_index, "error": error, "message": message,
              "seconds": time.monotonic() - start,
              "connections": None if relay is None else relay.connections}
    if error is None:
        counters = strategy.counters()
        result.update(stats=strategy.stats(), weights=[v.numpy() for v in model.trainable_variables],
                      generation=counters.state_generation, state_rewrites=counters.state_rewrites,
                      step=counters.step)
    if strategy.is_chief:
        result["events"] = [(e.worker, e.event) for e in strategy.worker_events()]
    return result
