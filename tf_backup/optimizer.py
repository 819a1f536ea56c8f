"""`SyncReplicasOptimizer`: a Keras 3 optimizer wrapper for backup-worker training."""

import dataclasses
import os
from typing import List, Optional, Sequence

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tf_backup import local_devices
from tf_backup import protocol
from tf_backup import sparse
from tf_backup import strategy as strategy_lib

# Keywords of keras.optimizers.Optimizer that belong to the inner optimizer.
_INNER_KEYWORDS = (
    "learning_rate", "weight_decay", "clipnorm", "clipvalue", "global_clipnorm",
    "use_ema", "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
    "gradient_accumulation_steps",
)


def _check_optional_count(name: str, value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be a positive integer or None. Received {name}={value!r}")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received {name}={value!r}")
    return int(value)


@keras.saving.register_keras_serializable(package="tf_backup")
class SyncReplicasOptimizer(keras.optimizers.Optimizer):
    """Synchronous SGD with backup workers, wrapping any Keras optimizer.

    The TF2/Keras 3 counterpart of `tf.compat.v1.train.SyncReplicasOptimizer`.
    Use it under a `tf_backup.BackupWorkerStrategy`, on every worker:

    ```python
    with strategy.scope():
        model = build_model()
        model.compile(
            optimizer=tf_backup.SyncReplicasOptimizer(keras.optimizers.Adam(1e-3)),
            loss="sparse_categorical_crossentropy", jit_compile=False)
    model.fit(strategy.distribute_dataset(dataset), epochs=5, steps_per_epoch=100)
    ```

    Each step, on every worker (replica):
      1. compute the gradient of the local batch at the parameters of global
         step `s` (Keras does this);
      2. push it to the conditional accumulators on the ps tasks, tagged with
         `s` (`local_step`); a gradient tagged below the accumulator's global
         step is dropped;
      3. wait until the global step passes `s`, then pull the new parameters
         into the model's variables.

    On the chief, the aggregator thread, each step:
      1. wait until the accumulators hold `replicas_to_aggregate` fresh
         gradients (`take_grad` averages all that arrived by then, at least N);
      2. apply their average with the inner optimizer to the chief's master
         copy of the variables (the inner optimizer's slots live there);
      3. publish the new parameters and increment `global_step`.

    `replicas_to_aggregate` (N) must not exceed `total_num_replicas` (N + b),
    which is the number of workers: unlike TF1, a worker contributes at most
    one gradient per step. When the fit of any worker ends, the round ends for
    all: the others stop at their next step and `fit` returns on every worker
    with the same final weights.

    Args:
      optimizer: the inner `keras.optimizers.Optimizer` that applies the
        averaged gradients (SGD, Adam, ...). Learning rate, clipping and weight
        decay are its settings.
      replicas_to_aggregate: N. Default: from the strategy
        (`num_workers - num_backup_workers`).
      total_num_replicas: N + b, checked against the strategy's number of
        workers. Default: the strategy's.
      sparse_variables: the variables that go by rows (their gradients are
        `IndexedSlices`, e.g. read with `tf.gather`): each step pushes,
        applies, publishes and pulls only the rows it touched, through a
        sparse conditional accumulator (`tf_backup.sparse`). None (default):
        the tables of `keras.layers.Embedding`. Else a list of variables or
        variable paths (`"my_layer/table"`, or the path's last components), or
        a callable from a variable to bool; `[]` sends every variable through the dense accumulators. An
        `IndexedSlices` gradient of any other variable is densified.
      name: the optimizer's name.

    Raises:
      TypeError: `optimizer` is not a Keras optimizer, a count is not an
        integer, or `sparse_variables` is not a list or a callable.
      ValueError: a count is below 1, `replicas_to_aggregate >
        total_num_replicas`, the inner optimizer uses EMA, or a keyword that
        belongs to the inner optimizer is passed here.
    """

    def __init__(self, optimizer, replicas_to_aggregate=None, total_num_replicas=None,
                 sparse_variables=None, name=None, **kwargs):
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "`optimizer` must be a keras.optimizers.Optimizer instance. "
                f"Received optimizer={optimizer!r}"
            )
        if isinstance(optimizer, SyncReplicasOptimizer):
            raise TypeError("`optimizer` is already a SyncReplicasOptimizer: wrap the inner one once.")
        for key in kwargs:
            if key in _INNER_KEYWORDS:
                raise ValueError(
                    f"SyncReplicasOptimizer does not take `{key}`: set `{key}` on the inner "
                    "`optimizer`."
                )
        if kwargs:
            raise TypeError(f"SyncReplicasOptimizer got unexpected arguments: {sorted(kwargs)}")
        replicas_to_aggregate = _check_optional_count("replicas_to_aggregate", replicas_to_aggregate)
        total_num_replicas = _check_optional_count("total_num_replicas", total_num_replicas)
        if (replicas_to_aggregate is not None and total_num_replicas is not None
                and replicas_to_aggregate > total_num_replicas):
            raise ValueError(
                "`replicas_to_aggregate` must not exceed `total_num_replicas` (each worker "
                "contributes at most one gradient per step). Received "
                f"replicas_to_aggregate={replicas_to_aggregate}, total_num_replicas={total_num_replicas}"
            )
        if optimizer.use_ema:
            raise ValueError(
                "SyncReplicasOptimizer does not support an inner optimizer with `use_ema=True` "
                "yet. Received optimizer with use_ema=True"
            )
        if sparse_variables is not None and not callable(sparse_variables):
            if isinstance(sparse_variables, (str, bytes)) or not isinstance(sparse_variables, (list, tuple)):
                raise TypeError("`sparse_variables` must be None, a list of variables or variable paths, "
                                f"or a callable. Received sparse_variables={sparse_variables!r}")
            sparse_variables = list(sparse_variables)
        super().__init__(learning_rate=0.0, name=name)
        self.sparse_variables = sparse_variables
        self.inner_optimizer = optimizer
        self.replicas_to_aggregate = replicas_to_aggregate
        self.total_num_replicas = total_num_replicas
        self._binding = None
        self._sparse = None  # sparse.SparseBinding of the Embedding tables, if any

    # -- Keras optimizer interface ---------------------------------------------------

    def build(self, var_list):
        strategy = tf.distribute.get_strategy()
        if isinstance(strategy, strategy_lib.BackupWorkerStrategy):
            var_list = list(var_list)
            dense_ids, sparse_ids = sparse.split(var_list, self.sparse_variables)  # tables go by rows
            self._binding = _Binding(self, strategy, [var_list[i] for i in dense_ids])
            if sparse_ids:
                self._sparse = sparse.SparseBinding(self, strategy, self._binding, var_list, dense_ids,
                                                    sparse_ids)
        else:
            # Built outside a BackupWorkerStrategy (e.g. by keras.models.load_model):
            # the optimizer holds its state but cannot train.
            self.inner_optimizer.build(var_list)
        super().build(var_list)

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        if self._binding is None:
            raise ValueError(
                "SyncReplicasOptimizer was built outside a BackupWorkerStrategy: create and "
                "compile the model under `strategy.scope()` of a tf_backup.BackupWorkerStrategy."
            )
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        if self._sparse is not None:
            return self._sparse.apply(list(grads), list(trainable_variables))
        self._binding.apply(list(grads), list(trainable_variables))

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise ValueError("SyncReplicasOptimizer has no stateless apply: it updates shared state.")

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        """Called by Keras when `fit` ends: ends the round, pulls the final weights."""
        if self._binding is not None:
            if self._sparse is not None:
                var_list = [list(var_list)[i] for i in self._sparse.dense_ids]
            self._binding.end_round(list(var_list))
            if self._sparse is not None:
                self._sparse.end_round()

    def get_config(self):
        # Not super().get_config(): the base keywords belong to the inner optimizer.
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "replicas_to_aggregate": self.replicas_to_aggregate,
            "total_num_replicas": self.total_num_replicas,
            # Paths only: a callable or variables do not serialize.
            **({"sparse_variables": [x if isinstance(x, str) else sparse.path(x) for x in self.sparse_variables]}
               if isinstance(self.sparse_variables, list) else {}),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)

    # -- tf_backup ---------------------------------------------------------------------

    @property
    def master_variables(self) -> Optional[List]:
        """The chief's master copy of the trained variables (None elsewhere)."""
        if self._binding is None or self._binding.master is None:
            return None
        if self._sparse is None:
            return self._binding.master
        out = [None] * self._sparse.num_vars
        for i, m in zip(self._sparse.dense_ids, self._binding.master):
            out[i] = m
        for i, m in zip(self._sparse.sparse_ids, self._sparse.master):
            out[i] = m
        return out


class _Checkpoint:
    """The chief's training state on disk: master variables, inner optimizer, global step.

    `tf.train.CheckpointManager` writes a checkpoint's files first and then
    replaces its `checkpoint` state file atomically, so a process killed
    during a save leaves the previous checkpoint as the latest one.
    """

    def __init__(self, directory: str, master: List, inner, every_steps: int):
        self.directory = directory
        self.every_steps = every_steps
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self._objects = {"master": list(master), "optimizer": list(inner.variables),
                         "global_step": self._step}
        self._make()
        self.saved_step = None
        self.restored_step = None

    def _make(self) -> None:
        self._ckpt = tf.train.Checkpoint(**self._objects)
        self._manager = tf.train.CheckpointManager(self._ckpt, self.directory, max_to_keep=3)

    def add(self, **variables) -> int:
        """Adds more state (lists of variables, by name) before the first save.

        Restores the latest checkpoint again, now with the added state, and
        returns its global step (the Embedding tables of `tf_backup.sparse`).
        """
        if self.saved_step not in (None, self.restored_step):  # a save since the restore
            raise ValueError("State can only be added to a checkpoint before its first save.")
        self._objects.update({name: list(value) for name, value in variables.items()})
        self._make()
        return self.restore()

    def restore(self) -> int:
        """Restores the latest checkpoint, if any; returns its global step (0: none)."""
        path = self._manager.latest_checkpoint
        self.restored_step = 0
        if path is None:
            return 0
        try:
            self._ckpt.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            raise ValueError(
                f"The checkpoint {path} does not match this model and optimizer (was "
                f"`checkpoint_dir` used by another job?): {e}".splitlines()[0]
            ) from e
        self.saved_step = self.restored_step = int(self._step.numpy())
        logging.info("tf_backup: restored %s at global step %d", path, self.saved_step)
        return self.saved_step

    def maybe_save(self, step: int) -> None:
        if step % self.every_steps == 0:
            self.save(step, why="periodic")

    def save(self, step: int, why: str) -> None:
        if step == self.saved_step:
            return
        self._step.assign(step)
        path = self._manager.save(checkpoint_number=step)
        self.saved_step = step
        logging.info("tf_backup: saved %s at global step %d (%s)", path, step, why)


class _Binding:
    """One SyncReplicasOptimizer attached to the shared state of its strategy."""

    def __init__(self, optimizer: SyncReplicasOptimizer, strategy, var_list: List):
        ext = strategy.extended
        info = ext.cluster
        self.config = self._resolve_config(optimizer, strategy)
        self.layout = protocol.Layout(var_list, len(info.ps))
        self.worker_index, self.num_workers = info.worker_index, info.num_workers
        self._keys = [optimizer._var_key(v) for v in var_list]  # pylint: disable=protected-access
        self._densified = set()  # variables warned about: IndexedSlices gradients densified
        self._ext = ext
        self._optimizer = optimizer
        inner = optimizer.inner_optimizer
        captured = getattr(inner, "_distribution_strategy", strategy)
        if captured is not strategy:
            raise ValueError(
                "The inner optimizer was created outside `strategy.scope()` of this "
                "BackupWorkerStrategy: create it (and the SyncReplicasOptimizer) inside the scope."
            )
        job_id = ext.join_job()
        self.state = protocol.SharedState(
            f"tf_backup/{job_id}/opt{len(ext.bindings)}", self.layout, info.ps, info.num_workers
        )
        self.master = None
        self.aggregator = None
        self._checkpoint = None
        step = 0
        if info.is_chief:
            with tf.init_scope():
                self.master = [
                    keras.Variable(tf.convert_to_tensor(v), dtype=v.dtype, trainable=True,
                                   name=f"master_{v.name}")
                    for v in var_list
                ]
                inner.build(self.master)
                if ext.checkpoint_dir is not None:
                    self._checkpoint = _Checkpoint(
                        os.path.join(ext.checkpoint_dir, f"opt{len(ext.bindings)}"), self.master, inner,
                        ext.checkpoint_every_steps)
                    step = self._checkpoint.restore()
                self.state.create(self.layout.pack([tf.convert_to_tensor(v) for v in self.master]), step=step)
            self.aggregator = protocol.Aggregator(
                self.state, self.config, info, self._make_apply_fn(inner), step=step,
                max_steps=ext.max_steps, liveness=ext.liveness(),
                on_publish=None if self._checkpoint is None else self._checkpoint.maybe_save,
            )
        self.client = protocol.WorkerClient(
            self.state, self.config, info, ext.monitor, chief_error=self.aggregator_error,
            dead_workers=self._dead_workers,
            local_params=None if self.aggregator is None else self.aggregator.published,
        )
        if self.aggregator is not None:
            self.aggregator.start()
        else:
            inner.build(var_list)
            self.client.wait_until_ready()
        self.client.on_stop.append(ext.stop_models)
        flats, _ = self.client.pull()
        self.initial_step = self.client.step
        self._var_list = list(var_list)
        self._assign(var_list, flats)
        self.metric_vars = ext.ensure_metric_vars()
        ext.bindings.append(self)

    @staticmethod
    def _resolve_config(optimizer, strategy) -> protocol.ProtocolConfig:
        config = strategy.extended.config
        workers = strategy.num_workers
        total = optimizer.total_num_replicas
        if total is not None and total != workers:
            raise ValueError(
                "`total_num_replicas` must equal the number of workers of the "
                f"BackupWorkerStrategy ({workers}). Received total_num_replicas={total}"
            )
        n = optimizer.replicas_to_aggregate
        if n is None:
            return config
        if n > workers:
            raise ValueError(
                f"`replicas_to_aggregate` must not exceed the number of workers ({workers}). "
                f"Received replicas_to_aggregate={n}"
            )
        if strategy.asynchronous and n != 1:
            raise ValueError(
                "An asynchronous BackupWorkerStrategy applies every gradient: "
                f"`replicas_to_aggregate` must be 1 or None. Received replicas_to_aggregate={n}"
            )
        return dataclasses.replace(config, replicas_to_aggregate=n)

    def _make_apply_fn(self, inner):
        layout, master = self.layout, self.master

        @tf.function(jit_compile=False, autograph=False)
        def apply_fn(flat_grads):
            inner.apply(layout.unpack(flat_grads), master)
            return layout.pack([v.value for v in master])

        return apply_fn

    def _dead_workers(self):
        return () if self.aggregator is None else self.aggregator.liveness.dead

    def aggregator_error(self) -> Optional[str]:
        return None if self.aggregator is None else self.aggregator.error

    def close(self, failed: bool = False) -> None:
        """Stops the aggregator; the chief saves a last checkpoint (also after a failure)."""
        self.client.close()
        if self.aggregator is not None:
            self.aggregator.stop()
            if self._checkpoint is not None and not self.aggregator.is_alive():
                # The master's step: a ps that died between an apply and its publish leaves the
                # master one step ahead of the last published step (and the inner optimizer's count).
                self._checkpoint.save(self.aggregator.master_step, why="failed" if failed else "end")

    def _assign(self, var_list: Sequence, flats: Sequence) -> List:
        return [v.assign(x) for v, x in zip(var_list, self.layout.unpack(flats))]

    def restart_superseded(self) -> Optional[int]:
        """Pulls the current step into the model after a superseded sleep (`WorkerClient.restart_superseded`).

        Returns the new step of the parameters; None if no sleep was superseded
        or the fit round has stopped (the batch then ends the fit).
        """
        if self._optimizer._sparse is not None:  # pylint: disable=protected-access
            # Its tables' rows are pulled inside each step, from the step of the last one: a restart
            # between steps would move the dense variables to the new step and leave the rows behind.
            raise ValueError(
                "restart_superseded() does not support a SyncReplicasOptimizer with `sparse_variables` "
                "yet: cancel the batch instead (do not call it after sleep_unless_superseded).")
        flats = self.client.restart_superseded()
        if flats is None:
            return None
        self._assign(self._var_list, flats)
        return None if self.client.round_stopped else self.client.step

    def _sync(self, *flats):
        new_flats, metrics = self.client.sync(flats)
        if metrics[3] and not list(self._ext._models):  # pylint: disable=protected-access
            # Stopped, and no Keras model to stop: end a custom loop like an exhausted dataset.
            raise tf.errors.OutOfRangeError(None, None, "tf_backup: the training round has ended.")
        return [*new_flats, tf.constant(metrics)]

    def apply(self, grads: List, variables: List) -> None:
        """The graph part of one step on this worker: push, wait, pull, assign."""
        layout = self.layout
        replica_ctx = local_devices.several_replicas()
        if replica_ctx is not None:  # one contribution per host: reduce, then push once
            return local_devices.apply_once_per_host(
                replica_ctx, self.apply, grads, variables, layout.shapes, layout.dtypes)
        keys = [self._optimizer._var_key(v) for v in variables]  # pylint: disable=protected-access
        if keys != self._keys:
            raise ValueError(
                "SyncReplicasOptimizer.apply() received variables that differ from the "
                f"{layout.num_vars} it was built with: apply to the same trainable variables "
                "every step."
            )
        dense = []
        for i, (grad, name, shape) in enumerate(zip(grads, layout.names, layout.shapes)):
            if grad is None:
                grad = tf.zeros(shape, layout.dtypes[i])
            elif isinstance(grad, tf.IndexedSlices):
                if name not in self._densified:
                    self._densified.add(name)
                    logging.warning(
                        "tf_backup: variable `%s` gets IndexedSlices gradients; it goes through the dense "
                        "accumulators, densified. Name it in SyncReplicasOptimizer(sparse_variables=[...]) "
                        "to push and pull only the rows a step touches.", name)
                grad = tf.convert_to_tensor(grad)
            grad = tf.convert_to_tensor(grad)
            if not grad.shape.is_compatible_with(shape):
                raise ValueError(
                    f"The gradient of variable `{name}` has shape {tuple(grad.shape)} but the "
                    f"variable has shape {shape}."
                )
            dense.append(grad)
        onehot = tf.one_hot(self.worker_index, self.num_workers, dtype=layout.dtype)
        flats = [tf.concat([flat, onehot], 0) for flat in layout.pack(dense)]
        outs = tf.py_function(
            self._sync, flats, Tout=[layout.dtype] * len(flats) + [tf.int64], name="tf_backup_sync"
        )
        new_flats = [tf.ensure_shape(o, [size]) for o, size in zip(outs[:-1], layout.shard_sizes)]
        metrics = tf.ensure_shape(outs[-1], [4])
        assigns = self._assign(variables, new_flats)
        with tf.control_dependencies(assigns):
            self.metric_vars["global_step"].assign(metrics[0])
            self.metric_vars["fresh_gradients"].assign(metrics[1])
            self.metric_vars["dropped_gradients"].assign(metrics[2])
            self._optimizer.iterations.assign(tf.cast(metrics[0], self._optimizer.iterations.dtype))
        self._ext._step_applied = True  # pylint: disable=protected-access

    def end_round(self, var_list: List) -> None:
        self._assign(var_list, self.client.end_round(wait_for_others=self.aggregator is not None))
