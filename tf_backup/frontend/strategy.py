"""`BackupWorkerStrategy`: synchronous SGD with backup workers as a tf.distribute strategy."""

import atexit
import time
from typing import List, Optional, Union

import tensorflow as tf

from tf_backup import _checks
from tf_backup import cluster as cluster_lib
from tf_backup import memory
from tf_backup import topology
from tf_backup.frontend import _tf_internal
from tf_backup.frontend import arguments
from tf_backup.frontend import exchange as exchange_lib
from tf_backup.frontend import extended as extended_lib
from tf_backup.frontend import local_devices
from tf_backup.frontend import reports
from tf_backup.worker import metrics as metrics_lib


class BackupWorkerStrategy(reports.JobReports, _tf_internal.Strategy):
    """Synchronous data-parallel training with backup workers.

    The cluster has `N + b` workers and one or more `ps` tasks. Every worker
    runs the same program (as with `MultiWorkerMirroredStrategy`). Each step,
    every worker computes a gradient on its own batch at the current
    parameters; the step is applied as soon as the first `N` fresh gradients
    have arrived, and the late ones are dropped (Chen et al., "Revisiting
    Distributed Synchronous SGD", 2016). `b = num_backup_workers`.

    ```python
    strategy = tf_backup.BackupWorkerStrategy(
        cluster_resolver=tf.distribute.cluster_resolver.TFConfigClusterResolver(),
        num_backup_workers=1)
    with strategy.scope():
        model = build_model()
        model.compile(optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.SGD(0.1)),
                      loss=...)
    model.fit(strategy.distribute_dataset(dataset), epochs=..., steps_per_epoch=...)
    ```

    ps tasks run `tf_backup.serve()`. The chief is the `chief` task if the
    cluster names one, else worker 0; it runs the aggregator and owns the
    training state that checkpoints save.

    Inside one worker the strategy acts as `OneDeviceStrategy` (one replica,
    `num_replicas_in_sync == 1`): the batch a worker's dataset yields is that
    worker's batch, and one step averages `N` of them. A worker with several
    local devices acts as `MirroredStrategy` over them (`num_replicas_in_sync`
    is their number; the worker's batch is split over them and all-reduced in
    the host) and still makes one contribution per step. Give `fit` a dataset
    from `strategy.distribute_dataset(dataset)`, which shards it by worker.
    A dataset passed to Keras as it is (or arrays) is not sharded: each
    worker reads all of it, so `evaluate` and `predict` see the whole data.

    Args:
      cluster_resolver: a `tf.distribute.cluster_resolver.ClusterResolver`;
        default `TFConfigClusterResolver()` (the `TF_CONFIG` variable).
      num_backup_workers: b, the workers whose gradients a step does not wait
        for. 0 is fully synchronous SGD. `"auto"`: the chief chooses every
        step's N (adaptive N, `tf_backup.protocol.adaptive`), between
        `min_replicas_to_aggregate` and `max_replicas_to_aggregate`, to
        maximise the expected progress per second from the workers' measured
        compute times and the gradients' noise scale (docs/design.md,
        "Adaptive N"). The first steps wait for `max_replicas_to_aggregate`.
      min_replicas_to_aggregate, max_replicas_to_aggregate: (with `"auto"`
        only) the bounds of N; default 1 and every worker. With fewer live
        workers than the minimum, the job fails as with too many dead workers.
      asynchronous: asynchronous SGD on the same machinery: every gradient is
        applied as it arrives (`replicas_to_aggregate=1`), with no staleness
        check. `num_backup_workers` must then be 0.
      step_timeout: seconds a worker waits for the next step, and the chief
        for enough gradients, before failing with an error saying what it
        waited for.
      startup_timeout: seconds to wait for the ps tasks to accept connections
        and for the chief to start the job.
      chief_timeout: seconds of chief silence (no heartbeat) a worker accepts.
      poll_interval: the longest sleep between two polls of the shared state.
      worker_timeout: seconds of silence (no heartbeat) after which the chief
        declares a worker dead. Up to b dead workers are tolerated: steps go
        on with the others. With more, fewer than N gradients can come, and
        the chief fails at once with an error naming the missing workers
        (address, last step pushed), instead of waiting `step_timeout`. A
        dead worker that is restarted rejoins the job.
      max_steps: the global step at which training stops, for every worker
        and every `fit` (as Estimator's `max_steps`): a job resumed from a
        checkpoint trains to the same step. None: each `fit` ends when the
        first worker has run its epochs.
      checkpoint_dir: where the chief saves the training state (the master
        copy of the variables, the inner optimizer's state and the global
        step) with `tf.train.CheckpointManager`, and restores it from when the
        job starts again (one subdirectory per optimizer, `opt0`, ...). None:
        no checkpoints.
      checkpoint_every_steps: global steps between two checkpoints; one more
        is written when training ends, cleanly or not.
      ps_timeout: seconds one operation on a ps task may take before it fails
        with `PsUnavailableError`: how long a dead ps task goes unnoticed
        (gRPC retries a lost connection until this deadline).
      ps_restart_timeout: seconds to wait for a ps task that failed to
        answer again (a cluster manager restarts it). The chief then writes
        the shared state again from its master copy, at the step it had
        reached, and every worker carries on: no process restarts, no step is
        redone (`tf_backup.ps.recovery`). 0 (the default): a lost ps task ends the
        job (the chief saves a checkpoint of its step if it applies the update;
        with the update on the ps, the last periodic checkpoint is the one to
        resume from). Not with Embedding tables in
        `sparse_variables` yet.
      chief_rejoins: a chief that starts while its job still runs on the ps
        (it was restarted; the ps kept the state) rejoins that job: it restores
        its latest checkpoint and writes the state again at that step, and the
        workers carry on from there without restarting (docs/design.md, "A
        restarted chief"). False (the default): it starts a new job, and every
        worker exits (`ChiefUnavailableError`) to be restarted into it. Give
        every task the same value. Not with Embedding tables in
        `sparse_variables` yet.
      devices: this worker's local devices, one replica each (as
        `MirroredStrategy`); default: every local GPU, else every logical CPU
        device; on a host with TPU devices, the host's TPU cores (as
        `TPUStrategy`; not run on a TPU yet, see the README). With several,
        `num_replicas_in_sync` is their number, the batch a worker's dataset
        yields is split over them, and the worker still makes one
        contribution per step (N and b count workers).
      wire_dtype: what gradients and parameters cross the network in:
        "float32" (the default: the variables' own dtype), "bfloat16" or
        "float16" (half the bytes of every push, take, publish and pull). The
        sums, the chief's master copy and the inner optimizer's state stay in
        the variables' dtype, and a push's norm and one-hot stay exact; what
        the workers train on (and the model holds after `fit`) is the master
        copy rounded to `wire_dtype`. Give every task the same value.
      apply_on_ps: each ps task applies the update to its shard, where the
        gradients are summed, so no model-sized tensor goes through the chief
        (`tf_backup.ps.ps_update`): for `keras.optimizers.SGD` (with or without
        momentum) and `Adam`, without clipping, weight decay or EMA. The master
        copy and the optimizer's slots then live on the ps tasks; the chief
        reads them back for each checkpoint, so a lost ps task resumes the job
        from the last periodic checkpoint (False: the chief saves its master
        copy when the job ends, lost ps or not). True is refused with
        `ps_restart_timeout` or `chief_rejoins`. "auto" (the default): True
        where the inner optimizer allows it and neither restart in place is
        asked for, else False (the chief logs which). Give every task the same
        value.

    The strategy makes glibc malloc keep freed memory in this process
    (`tf_backup.tune_malloc`; `TF_BACKUP_TUNE_MALLOC=0` to leave glibc's
    defaults): every step feeds and fetches buffers the size of the model.

    Raises:
      NotImplementedError: on a TPU host, the worker is a group of several
        TPU hosts (`topology.with_ps(..., hosts_per_worker > 1)`).
      TypeError: an argument has the wrong type.
      ValueError: the cluster has no worker job or no ps job, this process is
        a ps task, or `num_backup_workers` is not below the number of workers.
      TimeoutError: a ps task did not accept connections within
        `startup_timeout`.
    """

    def __init__(self, cluster_resolver=None, *, num_backup_workers: Union[int, str] = 0,
                 min_replicas_to_aggregate: Optional[int] = None,
                 max_replicas_to_aggregate: Optional[int] = None,
                 adaptive_window: int = 50,
                 asynchronous: bool = False, step_timeout: float = 600.0,
                 startup_timeout: float = 300.0, chief_timeout: float = 120.0,
                 poll_interval: float = 0.01, worker_timeout: float = 30.0,
                 max_steps: Optional[int] = None, checkpoint_dir: Optional[str] = None,
                 checkpoint_every_steps: int = 100, ps_timeout: float = 60.0,
                 ps_restart_timeout: float = 0.0, chief_rejoins: bool = False, devices=None,
                 wire_dtype: str = "float32", apply_on_ps: Union[bool, str] = "auto"):
        args = arguments.StrategyArguments(
            num_backup_workers=num_backup_workers, min_replicas_to_aggregate=min_replicas_to_aggregate,
            max_replicas_to_aggregate=max_replicas_to_aggregate, adaptive_window=adaptive_window,
            asynchronous=asynchronous, step_timeout=step_timeout, startup_timeout=startup_timeout,
            chief_timeout=chief_timeout, poll_interval=poll_interval, worker_timeout=worker_timeout,
            max_steps=max_steps, checkpoint_dir=checkpoint_dir, checkpoint_every_steps=checkpoint_every_steps,
            ps_timeout=ps_timeout, ps_restart_timeout=ps_restart_timeout, chief_rejoins=chief_rejoins,
            wire_dtype=wire_dtype, apply_on_ps=apply_on_ps)
        if cluster_resolver is None:
            cluster_resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        info = topology.cluster_info(cluster_resolver)  # a TPU pod: one worker per host group
        # Before waiting for the cluster: this worker's devices, or its TPU cores.
        tpu = local_devices.local_tpu(cluster_resolver) if devices is None else None
        devices = None if tpu is not None else local_devices.resolve_devices(devices)
        if info.task.job == cluster_lib.PS_JOB:
            raise ValueError(
                f"This process is the ps task {info.task}: ps tasks run `tf_backup.serve()`, "
                "not a BackupWorkerStrategy."
            )
        config = args.protocol_config(info)
        self._cluster_resolver = cluster_resolver
        cluster_lib.wait_for_tasks(info.ps, args.startup_timeout, waiter=f"Worker {info.task}")
        memory.tune_malloc()  # every step feeds and fetches model-sized buffers (TF_BACKUP_TUNE_MALLOC=0: not)
        # The model trains on this worker's own device; the shared state is reached
        # through graph sessions on the ps tasks (tf_backup.ps.accumulators).
        kwargs = args.extended_kwargs()
        if tpu is not None:
            extended = extended_lib.TPUBackupWorkerExtended(self, tpu, info, config, **kwargs)
        elif len(devices) == 1:
            extended = extended_lib.BackupWorkerExtended(self, (devices[0],), info, config, **kwargs)
        else:
            extended = extended_lib.MultiDeviceBackupWorkerExtended(self, devices, info, config, **kwargs)
        super().__init__(extended)
        extended_lib.register(self.extended)
        # A failed step's tf_backup error out of `fit` by type (extended.raise_if_failed).
        _tf_internal.wrap_keras_train_functions(extended_lib.raising_train_function)
        atexit.register(self.extended.shutdown)

    # -- what the cluster is -------------------------------------------------------

    @property
    def cluster_resolver(self):
        return self._cluster_resolver

    # -- running -------------------------------------------------------------------

    def distribute_dataset(self, dataset: tf.data.Dataset, options=None, resume_input: bool = False):
        """Shards `dataset` by worker and distributes it to this worker's device.

        Each worker reads every `num_workers`-th element, starting at its
        `worker_index` (unless the dataset's `auto_shard_policy` is `OFF`).
        Shard after batching to give each worker whole batches of the
        dataset's batch size.

        With `resume_input`, this worker's shard then skips the
        `input_position` batches the job has already trained on (a restarted
        worker's predecessors', or the resumed checkpoint's): build the
        optimizer first (`optimizer.build(model.trainable_variables)` under
        the scope), so that the position is known.

        Raises:
          TypeError: `dataset` is not a `tf.data.Dataset`, `options` not a
            `tf.distribute.InputOptions` or None, or `resume_input` not a bool.
          ValueError: `resume_input` before any optimizer was built.
        """
        if not isinstance(dataset, tf.data.Dataset):
            raise TypeError(f"`dataset` must be a tf.data.Dataset. Received dataset={dataset!r}")
        if options is not None and not isinstance(options, tf.distribute.InputOptions):
            raise TypeError(f"`options` must be a tf.distribute.InputOptions or None. Received options={options!r}")
        _checks.check_bool("resume_input", resume_input)
        dataset = self.extended.shard(dataset)
        if resume_input:
            if not self.extended.bindings:
                raise ValueError(
                    "distribute_dataset(resume_input=True) needs this worker's input position, known once "
                    "the optimizer is built: call `optimizer.build(model.trainable_variables)` under "
                    "`strategy.scope()` first.")
            dataset = dataset.skip(self.input_position)
        return self.experimental_distribute_dataset(dataset, options)

    def run(self, fn, args=(), kwargs=None, options=None):
        """Runs `fn` on this worker's replica; adds the backup metrics to its logs.

        When `fn` applied a `SyncReplicasOptimizer` step and returns a dict
        (a Keras `train_step`), the dict gains `global_step`, `fresh_gradients`
        (gradients averaged into the latest step), `dropped_gradients`
        (stale gradients dropped so far, over all workers) and the other
        `tf_backup.worker.metrics.LOGGED` fields (N, the slow workers).

        A compiled `fn` (`tf.function(fn, jit_compile=True)`, a TPU program)
        leaves its gradient in buffers; the exchange with the ps runs here,
        after it. Called inside an XLA function itself (Keras's
        `jit_compile=True`), the exchange runs at the next batch fetch from the
        strategy's distributed dataset, and the metrics are those of the step
        before (`tf_backup.frontend.exchange`).

        Raises:
          ValueError: called inside an XLA function by something other than a
            Keras model, or by Keras on a worker with several local devices.
          tf_backup.errors.StepTimeoutError, WorkersLostError, ...: (run
            eagerly) the step failed with that error (`tf_backup.errors`). Inside
            a `tf.function`, the step's error is TensorFlow's `UnknownError`
            when the function runs.
        """
        model = getattr(fn, "__self__", None)
        if model is not None and hasattr(model, "stop_training"):
            self.extended.note_model(model)
        else:
            model = None
        try:
            with self.extended.tracing_step() as trace:
                outputs = self.extended.run_replicas(super().run, fn, args, kwargs, options)
            if trace.compiled and not exchange_lib.in_compiled_context():
                for binding in trace.compiled:  # the replica step was compiled: exchange outside it
                    binding.exchange()
        except tf.errors.OpError as e:  # run eagerly: a failed step's tf_backup error, by type
            self.extended.raise_if_failed(e)
            raise
        if trace.compiled and exchange_lib.in_compiled_context():
            if model is None:
                raise ValueError(
                    "BackupWorkerStrategy.run was called inside an XLA-compiled function: its step "
                    "exchanges gradients with the ps tasks, which XLA cannot compile. Compile the "
                    "replica function instead: `strategy.run(tf.function(fn, jit_compile=True), ...)` "
                    "inside a `tf.function` without jit_compile.")
            elif self.num_replicas_in_sync > 1:
                raise ValueError(
                    "Keras compiles every local replica of this worker into one XLA program, which "
                    f"XLA cannot run over {self.num_replicas_in_sync} devices (MirroredStrategy fails "
                    "the same way): compile the model with `jit_compile=False`, give each worker "
                    "process one device (`devices=[...]`), or compile the replica function in a custom "
                    "loop (`strategy.run(tf.function(fn, jit_compile=True), ...)`). Received "
                    "jit_compile=True")
            # else Keras's `jit_compile=True`: the next batch fetch runs the exchange (tf_backup.frontend.exchange).
        if trace.applied and isinstance(outputs, dict):
            outputs = dict(outputs)
            for name, var in self.extended.ensure_metric_vars().items():
                outputs[name] = tf.cast(var.read_value(), tf.float32) / metrics_lib.SCALES.get(name, 1)
        return outputs

    # -- the fit round -------------------------------------------------------------

    def wait_for_fit_end(self, timeout: Optional[float] = None) -> List[str]:
        """After `fit` returns: waits until every worker's last `fit` has ended too.

        A fit round ends for all workers when any worker's `fit` ends, but each
        worker leaves it at its own next step: one in a long sleep or a slow
        batch leaves late, and may still be in the old round while the others
        start their next `fit`. Call this between fits to start the next one
        together (the benchmarks do, so each timed fit measures its own steps).
        The chief's own `fit` already waits for the others before it returns.

        Args:
          timeout: the longest wait, seconds (default: `chief_timeout`).

        Returns:
          The tasks that had not ended the round in time (a warning names them);
          [] when every worker had. Workers that left or died are not waited for.
        """
        if timeout is not None:  # checked first: a bad value is refused before anything is read
            timeout = _checks.check_seconds("timeout", timeout, allow_zero=True)
        client = self.extended.latest_binding().client
        if timeout is None:
            timeout = client.config.chief_timeout
        return client.wait_for_round_end(client.round.number - 1, timeout)

    def sleep_unless_superseded(self, seconds: float) -> bool:
        """Sleeps up to `seconds` unless this worker's current batch becomes useless first.

        For simulated compute (the straggler models of `tf_backup.sim.stragglers`):
        the batch is useless once the global step passes the step of this
        worker's parameters, or the fit round stops. The chief's publish wakes
        the worker at once; the batch is then *cancelled*: its gradient is not
        pushed, and the worker moves to the new step (or, after
        `restart_superseded`, computes the same batch on the new step). That
        is a straggler that can be interrupted, the model behind the
        order-statistic ideal of `stragglers.ideal_step_times`; without it a
        late worker finishes its stale batch first (as in TF1). Cancelled
        batches are counted in `stats()["cancelled"]`. The last 3 ms of a
        sleep are slept locally, not on the ps (`wakeups.SLEEP_MARGIN`: a
        wait there that runs to its deadline returns 2-3 ms late): a publish
        in them does not cut the sleep short.

        Args:
          seconds: the longest sleep, >= 0.

        Returns:
          True if the sleep was cut short (the batch is cancelled); False if it
          lasted `seconds`, or no SyncReplicasOptimizer is built yet.
        """
        seconds = _checks.check_seconds("seconds", seconds, allow_zero=True)
        if not self.extended.bindings:
            time.sleep(seconds)
            return False
        return self.extended.latest_binding().client.sleep_unless_superseded(seconds)

    def restart_superseded(self) -> Optional[int]:
        """After `sleep_unless_superseded` returned True: starts this batch afresh on the current step.

        Pulls the parameters of the current global step into the model now, so
        the batch about to run is computed on them and pushed for that step,
        instead of being computed on the old step and cancelled (not pushed).
        A straggler simulation that calls this, then sleeps the new step's delay
        (which may be cut short again), models a straggler interrupted and
        restarted at once, the model of `stragglers.ideal_step_times`; the
        batch's data is used, not skipped. The batch still counts in
        `stats()["cancelled"]`. Call it from a callback's
        `on_train_batch_begin`, between batches, never inside a step.

        Returns:
          The global step of the parameters now in the model; None if no
          sleep was superseded (nothing pulled), the fit round has stopped
          (the batch then ends the fit at once: do not sleep again), or no
          SyncReplicasOptimizer is built yet.
        """
        if not self.extended.bindings:
            return None
        return self.extended.latest_binding().restart_superseded()

    def shutdown(self) -> None:
        """Ends this worker's part in the job (idempotent; also runs at exit).

        On the chief: stops the aggregator and marks the job done, so the ps
        tasks exit once every worker has left.
        """
        self.extended.shutdown()
