"""The extended classes of `BackupWorkerStrategy`: what a worker holds for the job.

`BackupWorkerExtended` is `OneDeviceStrategy`'s extended,
`MultiDeviceBackupWorkerExtended` `MirroredStrategy`'s, over this worker's
devices, and `TPUBackupWorkerExtended` `TPUStrategy`'s, over its TPU cores,
each with `_BackupWorkerMixin`: the strategy's endpoints to the ps
tasks, its membership of the job (`job.JobMonitor`), the optimizers bound to
the shared state (`binding.Binding`), the Keras models it stops, the failure
a step kept for the caller to raise, and input sharding by worker. What a
step did while `BackupWorkerStrategy.run` traced it is a `StepTrace` that the
`run` call owns (`tracing_step`).
"""

import contextlib
import dataclasses
import functools
import threading
import weakref
from typing import Callable, Iterator, List, Optional

import tensorflow as tf

from tf_backup import cluster as cluster_lib
from tf_backup import errors
from tf_backup.frontend import _tf_internal
from tf_backup.frontend import exchange as exchange_lib
from tf_backup.frontend import iterator_reaper
from tf_backup.protocol import config as config_lib
from tf_backup.ps import endpoint as endpoint_lib
from tf_backup.ps import job as job_lib
from tf_backup.worker import metrics as metrics_lib

# The one process-wide registry, kept on purpose: a task launcher (`tf_backup.local._task`, the
# trainer) does not own the strategies the user's function made, and must shut them down
# (aborting the job if it failed) before it ends the process with os._exit.
_LIVE = weakref.WeakSet()


def register(extended) -> None:
    """Adds a strategy's extended to the registry `shutdown_all` shuts down."""
    _LIVE.add(extended)


def shutdown_all(failed: bool = False) -> None:
    """Shuts down every BackupWorkerStrategy of this process (see `shutdown`)."""
    for extended in list(_LIVE):
        extended.shutdown(failed=failed)


@dataclasses.dataclass
class StepTrace:
    """What the function of one `BackupWorkerStrategy.run` did, seen while it was traced (or ran eagerly).

    `run` owns it (`_BackupWorkerMixin.tracing_step`) and reads it once the
    replica function has run; a `SyncReplicasOptimizer` step records into it
    through the extended, since the step's own return value goes to Keras's
    `train_step`, not back to `run`.

    Attributes:
      applied: a SyncReplicasOptimizer step is part of the function: `run` adds the step metrics.
      compiled: the bindings whose compiled step left a gradient in their buffers: `run` exchanges them.
    """

    applied: bool = False
    compiled: List = dataclasses.field(default_factory=list)

    def add_compiled(self, binding) -> None:
        if binding not in self.compiled:
            self.compiled.append(binding)


class _BackupWorkerMixin:
    """The implementation of `BackupWorkerStrategy`, over a local strategy's extended.

    Inside a worker it behaves as `OneDeviceStrategy` on the worker's device
    (`BackupWorkerExtended`), or as `MirroredStrategy` over its local devices
    (`MultiDeviceBackupWorkerExtended`); between workers, `SyncReplicasOptimizer`
    runs the protocol of `tf_backup.protocol` against the shared state on the
    ps tasks, one contribution per worker (host) per step.
    """

    def __init__(self, container_strategy, base_args: tuple, info: cluster_lib.ClusterInfo,
                 config: config_lib.ProtocolConfig, worker_timeout: float = 30.0,
                 max_steps: Optional[int] = None, checkpoint_dir: Optional[str] = None,
                 checkpoint_every_steps: int = 100, ps_timeout: float = endpoint_lib.DEFAULT_TIMEOUT,
                 chief_rejoins: bool = False):
        super().__init__(container_strategy, *base_args)  # the local strategy's extended
        self.cluster = info
        self.config = config
        self.worker_timeout = worker_timeout
        self.max_steps = max_steps
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every_steps = checkpoint_every_steps
        self.endpoints = endpoint_lib.Endpoints(ps_timeout)  # this strategy's sessions to the ps tasks
        self.job_var = job_lib.job_variable(self.endpoints.of(info.ps[0]), info.num_workers)
        self.monitor = job_lib.JobMonitor(self.job_var, info, config.startup_timeout, config.chief_timeout)
        self.bindings: List = []  # tf_backup.frontend.binding.Binding, one per SyncReplicasOptimizer built
        self.metric_vars: Optional[dict] = None
        self._models = weakref.WeakSet()
        self._trace: Optional[StepTrace] = None  # the step `run` traces now, if any (`tracing_step`)
        # A test-only setting, not per-step state: split every step as a compiled one is, compiled or
        # not, to test that path where XLA cannot compile it (several logical CPU devices share one XLA
        # device). Read by `Binding.split_step`.
        self.always_split = False
        self._shut_down = False
        # The dataset iterators this strategy made are destroyed on this thread, not where they are
        # dropped: TensorFlow's destructor can block for up to a minute (`iterator_reaper`).
        self.iterator_reaper = iterator_reaper.IteratorReaper()
        self._failure_lock = threading.Lock()  # guards `_failure`
        self._failure: Optional[BaseException] = None  # the first tf_backup error of a step, not raised yet
        if info.is_chief:
            self.monitor.start(rejoin=chief_rejoins)

    # -- running -------------------------------------------------------------------

    def run_replicas(self, run, fn, args, kwargs, options):
        """Runs `fn` on this worker's replicas: `run` is `Strategy.run` (the TPU variant compiles instead)."""
        return run(fn, args, kwargs, options)

    # -- job -------------------------------------------------------------------

    def join_job(self) -> int:
        """The job id; non-chief workers wait for the chief to start the job."""
        return self.monitor.join()

    def liveness(self) -> job_lib.Liveness:
        """The chief's watch over the other workers' heartbeats."""
        return job_lib.Liveness(self.job_var, self.cluster, self.worker_timeout, self.config.startup_timeout)

    def latest_binding(self):
        """The `tf_backup.frontend.binding.Binding` of the latest SyncReplicasOptimizer built under this strategy.

        Raises:
          ValueError: none has been built yet.
        """
        if not self.bindings:
            raise ValueError("No SyncReplicasOptimizer has been built under this strategy yet.")
        return self.bindings[-1]

    def shutdown(self, failed: bool = False) -> None:
        """Leaves the job; on the chief, stops the aggregators and marks the job done.

        Args:
          failed: the program failed; on the chief this aborts the job for all.
        """
        if self._shut_down:
            return
        self._shut_down = True
        self.iterator_reaper.close()
        for binding in self.bindings:
            binding.close(failed=failed)
        chief_failed = None
        if self.cluster.is_chief:
            chief_failed = failed or any(b.aggregator_failure() is not None for b in self.bindings)
        self.monitor.leave(chief_failed=chief_failed)

    # -- failures ------------------------------------------------------------------

    def keeping_failures(self, fn: Callable) -> Callable:
        """`fn`, a step's `tf.py_function` body, keeping the tf_backup error it raises for `raise_if_failed`.

        TensorFlow turns an error raised inside a `tf.py_function` into an
        `UnknownError`; the error is kept here (the first one, until it is
        raised) and raised again, by type, once TensorFlow's error is out.
        """
        @functools.wraps(fn)
        def body(*args):
            try:
                return fn(*args)
            except errors.ALL as e:
                with self._failure_lock:
                    if self._failure is None:
                        self._failure = e
                raise

        return body

    def raise_if_failed(self, cause: BaseException) -> None:
        """Raises the failure a step kept, if any, from `cause` (TensorFlow's error that ended the step).

        The one place a tf_backup error that crossed a `tf.py_function` reaches
        the caller (as TensorFlow's `ClusterCoordinator._raise_if_error`): the
        Keras train function (`raising_train_function`) and `run` call it when
        a step fails. The failure is forgotten once raised: a later step that
        fails keeps its own.
        """
        with self._failure_lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure from cause

    # -- Keras integration ---------------------------------------------------------

    def note_model(self, model) -> None:
        self._models.add(model)

    def stop_models(self) -> None:
        for model in list(self._models):
            model.stop_training = True

    def has_models(self) -> bool:
        """Whether a Keras model runs its steps here (else a custom loop does)."""
        return bool(list(self._models))

    @contextlib.contextmanager
    def tracing_step(self) -> Iterator[StepTrace]:
        """(`run`.) A new `StepTrace` that the steps traced inside the block record into."""
        outer, self._trace = self._trace, StepTrace()
        try:
            yield self._trace
        finally:
            self._trace = outer

    def mark_step_applied(self) -> None:
        """(While tracing `run`'s function.) A SyncReplicasOptimizer step is part of it: `run` adds the metrics."""
        if self._trace is not None:  # else no `run` reads it (an apply outside `strategy.run`)
            self._trace.applied = True

    def mark_compiled_step(self, binding) -> None:
        """(While tracing `run`'s function.) A compiled step wrote `binding`'s buffers: `run` exchanges them.

        Outside `run`, the next batch fetch exchanges them (`exchange_pending`).
        """
        if self._trace is not None:
            self._trace.add_compiled(binding)

    def exchange_pending(self) -> None:
        """Runs the exchange of every gradient a compiled step left in its buffers (`tf_backup.frontend.exchange`)."""
        for binding in self.bindings:
            binding.exchange()

    def ensure_metric_vars(self) -> dict:
        if self.metric_vars is None:
            with tf.init_scope(), tf.device(self._device):
                self.metric_vars = {
                    name: tf.Variable(0, dtype=metrics_lib.DTYPE, trainable=False, name=f"tf_backup_{name}")
                    for name in metrics_lib.LOGGED
                }
        return self.metric_vars

    # -- input -----------------------------------------------------------------

    def shard(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        policy = dataset.options().experimental_distribute.auto_shard_policy
        if policy == tf.data.experimental.AutoShardPolicy.OFF or self.cluster.num_workers == 1:
            return dataset
        return dataset.shard(self.cluster.num_workers, self.cluster.worker_index)

    def _experimental_distribute_dataset(self, dataset, options):
        # Its iterators run a compiled step's deferred exchange before each batch (tf_backup.frontend.exchange).
        return exchange_lib.exchanging(super()._experimental_distribute_dataset(dataset, options))

    def _distribute_datasets_from_function(self, dataset_fn, options):
        context = tf.distribute.InputContext(
            num_input_pipelines=self.cluster.num_workers,
            input_pipeline_id=self.cluster.worker_index,
            num_replicas_in_sync=self._num_replicas_in_sync,
        )
        return exchange_lib.exchanging(_tf_internal.get_distributed_datasets_from_function(
            dataset_fn, self._input_workers_with_options(options), [context],
            self._container_strategy(), options=options,
        ))

    # -- roles -----------------------------------------------------------------

    @property
    def should_checkpoint(self):
        return self.cluster.is_chief

    @property
    def should_save_summary(self):
        return self.cluster.is_chief


def raising_train_function(model, train_function: Callable) -> Callable:
    """(Keras's `make_train_function`.) The train function of `model`, raising a failed step's tf_backup error.

    A model of another strategy keeps its function as it is. Wrapped once:
    Keras keeps the function it made until the next `compile`.
    """
    extended = model.distribute_strategy.extended
    if not isinstance(extended, _BackupWorkerMixin) or getattr(train_function, "tf_backup_raising", False):
        return train_function

    @functools.wraps(train_function)
    def raising(*args, **kwargs):
        try:
            return train_function(*args, **kwargs)
        except tf.errors.OpError as e:
            extended.raise_if_failed(e)
            raise

    raising.tf_backup_raising = True
    return raising


class BackupWorkerExtended(_BackupWorkerMixin, _tf_internal.OneDeviceExtended):
    """A worker with one device: `OneDeviceStrategy` inside the worker."""


class MultiDeviceBackupWorkerExtended(_BackupWorkerMixin, _tf_internal.MirroredExtended):
    """A worker with several local devices: `MirroredStrategy` inside the worker.

    One replica per device; Keras all-reduces the gradients inside the host and
    `SyncReplicasOptimizer` pushes one contribution per step (`tf_backup.frontend.local_devices`).
    """

    def __init__(self, container_strategy, devices, info, config, **kwargs):
        # MirroredStrategy's class attribute: the base of its collective keys.
        if not hasattr(container_strategy, "_collective_key_base"):
            container_strategy._collective_key_base = 0  # pylint: disable=protected-access
        super().__init__(container_strategy, (tuple(devices),), info, config, **kwargs)
        self._device = self._devices[0]  # where the step metrics live (mirrored anyway)


class TPUBackupWorkerExtended(_BackupWorkerMixin, _tf_internal.TPUExtended):
    """A worker that is one TPU host: `TPUStrategy` over the host's TPU cores inside the worker.

    `run_replicas` compiles the replica function into the TPU program (`tpu_run`, as
    `TPUStrategy.run`); its SyncReplicasOptimizer step writes the gradient buffers there, and
    `BackupWorkerStrategy.run` exchanges them on the host CPU after the program
    (`tf_backup.frontend.exchange`). The buffers synchronize on read, so the host's read sums the cores'
    gradients. Written against TensorFlow's TPUExtended; it has not run on a TPU (README).
    """

    def __init__(self, container_strategy, tpu_resolver, info, config, **kwargs):
        super().__init__(container_strategy, (tpu_resolver,), info, config, **kwargs)
        self._device = self._host_device  # the step metrics and the exchange: the host CPU

    def _input_workers_with_options(self, options=None):
        return self._get_input_workers(options)

    def run_replicas(self, run, fn, args, kwargs, options):
        with self._container_strategy().scope():
            return self.tpu_run(_tf_internal.autograph_convert(fn), args, kwargs or {},
                                options or tf.distribute.RunOptions())
