"""`SyncReplicasOptimizer`: a Keras 3 optimizer wrapper for backup-worker training."""

from typing import List, Optional

import keras
import tensorflow as tf

from tf_backup import _checks
from tf_backup.frontend import binding as binding_lib
from tf_backup.frontend import sparse
from tf_backup.frontend import strategy as strategy_lib

# Keywords of keras.optimizers.Optimizer that belong to the inner optimizer.
_INNER_KEYWORDS = (
    "learning_rate", "weight_decay", "clipnorm", "clipvalue", "global_clipnorm",
    "use_ema", "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
    "gradient_accumulation_steps",
)


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
            loss="sparse_categorical_crossentropy")
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
        sparse conditional accumulator (`tf_backup.frontend.sparse`). None (default):
        the tables of `keras.layers.Embedding`. Else a list of variables or
        variable paths (`"my_layer/table"`, or the path's last components), or
        a callable from a variable to bool; `[]` sends every variable through the dense accumulators. An
        `IndexedSlices` gradient of any other variable is densified.
      name: the optimizer's name.

    Raises:
      TypeError: `optimizer` is not a Keras optimizer, a count is not an
        integer, `sparse_variables` is not a list or a callable, or `name` is
        not a string.
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
        replicas_to_aggregate = _checks.check_optional_int(
            "replicas_to_aggregate", replicas_to_aggregate, 1, kind="a positive integer")
        total_num_replicas = _checks.check_optional_int(
            "total_num_replicas", total_num_replicas, 1, kind="a positive integer")
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
        if name is not None and not isinstance(name, str):
            raise TypeError(f"`name` must be a string or None. Received name={name!r}")
        super().__init__(learning_rate=0.0, name=name)
        self.sparse_variables = sparse_variables
        self.inner_optimizer = optimizer
        self.replicas_to_aggregate = replicas_to_aggregate
        self.total_num_replicas = total_num_replicas
        self._binding: Optional[binding_lib.Binding] = None

    # -- Keras optimizer interface ---------------------------------------------------

    def build(self, var_list):
        strategy = tf.distribute.get_strategy()
        if isinstance(strategy, strategy_lib.BackupWorkerStrategy):
            var_list = list(var_list)
            dense_ids, sparse_ids = sparse.split(var_list, self.sparse_variables)  # tables go by rows
            self._binding = binding_lib.Binding(self, strategy, [var_list[i] for i in dense_ids],
                                                has_tables=bool(sparse_ids))
            if sparse_ids:
                self._binding.sparse = sparse.SparseBinding(
                    self, strategy, self._binding, var_list, dense_ids, sparse_ids)
            self._binding.start()
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
        if self._binding.sparse is not None:
            return self._binding.sparse.apply(list(grads), list(trainable_variables))
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
            tables = self._binding.sparse
            if tables is not None:
                var_list = [list(var_list)[i] for i in tables.dense_ids]
            self._binding.end_round(list(var_list))
            if tables is not None:
                tables.end_round()

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
    def update_on_ps(self) -> Optional[bool]:
        """Whether each ps task applies this optimizer's update (`apply_on_ps`, resolved); None before `build`."""
        return None if self._binding is None else bool(self._binding.config.apply_on_ps)

    @property
    def master_variables(self) -> Optional[List]:
        """The chief's master copy of the trained variables (None elsewhere).

        With the update on the ps tasks (`apply_on_ps`), the chief's copy (and the inner
        optimizer's slots) is read back from them at each checkpoint and when a fit ends.
        """
        if self._binding is None or self._binding.master is None:
            return None
        tables = self._binding.sparse
        if tables is None:
            return self._binding.master
        out = [None] * tables.num_vars
        for i, m in zip(tables.dense_ids, self._binding.master):
            out[i] = m
        for i, m in zip(tables.sparse_ids, tables.master):
            out[i] = m
        return out
