"""`Binding`: one `SyncReplicasOptimizer` attached to the shared state of its strategy.

It makes the optimizer's shared state (the chief creates it, the others wait
for it), every worker's `WorkerClient` and, on the chief, the chief's part
(`tf_backup.chief.chief.ChiefState`: master copy, checkpoint, `Aggregator`);
and it builds the graph part of one step:
the gradients packed into shards with their squared norms and the worker's
one-hot (`pushes.push_tail`), a `tf.py_function`
that runs `WorkerClient.sync` (a tf_backup error it raises is kept on the
strategy, `raise_if_failed`), and the new parameters assigned to the model. A
compiled step (XLA, TPU) only writes the gradient into the binding's
`exchange.StepBuffers`; `Binding.exchange` runs the rest outside the program.
"""

import dataclasses
from typing import List, Optional, Sequence

from absl import logging
import tensorflow as tf

from tf_backup import errors
from tf_backup import memory
from tf_backup.chief import chief as chief_lib
from tf_backup.chief import update_on_ps
from tf_backup.frontend import arguments
from tf_backup.frontend import exchange as exchange_lib
from tf_backup.frontend import local_devices
from tf_backup.protocol import adaptive as adaptive_lib
from tf_backup.protocol import config as config_lib
from tf_backup.ps import shared_state
from tf_backup.ps.layout import Layout
from tf_backup.worker import chief_link
from tf_backup.worker import client as worker_lib
from tf_backup.worker import metrics as metrics_lib


def resolve_config(optimizer, config: config_lib.ProtocolConfig) -> config_lib.ProtocolConfig:
    """The strategy's protocol settings `config`, with the optimizer's own N if it names one.

    `apply_on_ps="auto"` becomes True where the ps tasks have the inner
    optimizer's rule (`update_on_ps.unsupported`), else False: every task
    decides the same from its own optimizer.

    Raises:
      ValueError: the optimizer's counts do not fit the strategy: `total_num_replicas`
        is not its number of workers, or `replicas_to_aggregate` is set under adaptive
        N, exceeds the workers, or is not 1 in asynchronous mode.
    """
    workers = config.num_workers
    total = optimizer.total_num_replicas
    if total is not None and total != workers:
        raise ValueError(
            "`total_num_replicas` must equal the number of workers of the "
            f"BackupWorkerStrategy ({workers}). Received total_num_replicas={total}"
        )
    inner = optimizer.inner_optimizer
    if config.apply_on_ps == arguments.AUTO:
        config = dataclasses.replace(config, apply_on_ps=update_on_ps.unsupported(inner) is None)
    if config.adaptive is not None:  # what one more gradient is worth depends on the inner optimizer
        factor = adaptive_lib.noise_factor_for(type(inner).__name__, float(getattr(inner, "momentum", 0.0) or 0.0))
        config = dataclasses.replace(config, adaptive=dataclasses.replace(config.adaptive, noise_factor=factor))
    n = optimizer.replicas_to_aggregate
    if n is None:
        return config
    if config.adaptive is not None:
        raise ValueError(
            "This BackupWorkerStrategy chooses N every step (num_backup_workers='auto'): leave the "
            f"optimizer's `replicas_to_aggregate` unset. Received replicas_to_aggregate={n}")
    if n > workers:
        raise ValueError(
            f"`replicas_to_aggregate` must not exceed the number of workers ({workers}). "
            f"Received replicas_to_aggregate={n}"
        )
    if not config.staleness_check and n != 1:  # asynchronous
        raise ValueError(
            "An asynchronous BackupWorkerStrategy applies every gradient: "
            f"`replicas_to_aggregate` must be 1 or None. Received replicas_to_aggregate={n}"
        )
    return dataclasses.replace(config, replicas_to_aggregate=n)


class Binding:
    """One SyncReplicasOptimizer attached to the shared state of its strategy.

    Build it, attach the Embedding tables (`sparse`), then `start()`: the
    chief's aggregator must have its step hooks before it runs.

    Attributes:
      layout, state: the dense variables' shards and shared state.
      client: this worker's `WorkerClient`.
      chief: the chief's part (`tf_backup.chief.chief.ChiefState`; None elsewhere).
      master, aggregator, checkpoint, on_ps: the chief's part's (None elsewhere).
      sparse: the `tf_backup.frontend.sparse.SparseBinding` of the tables, if any.
      initial_step: the global step of the first pull.
      initial_input_position: this worker's input position then (`WorkerClient.input_position`).
    """

    def __init__(self, optimizer, strategy, var_list: List, has_tables: bool = False):
        ext = strategy.extended
        info = ext.cluster
        self.config = resolve_config(optimizer, ext.config)
        self.layout = Layout(var_list, len(info.ps))
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
        rule = update_on_ps.rule_for(inner) if self.config.apply_on_ps else None  # a ValueError before joining
        if info.is_chief and ext.config.apply_on_ps == arguments.AUTO:
            name = type(inner).__name__
            logging.info("apply_on_ps='auto': %s", f"each ps task applies {name} to its shard" if rule is not None else
                         f"the chief applies {name} (the ps tasks apply SGD and Adam only, without clipping, "
                         "weight decay, EMA or AMSGrad)")
        job_id = ext.join_job()
        self.index = len(ext.bindings)
        self.state = shared_state.SharedState(
            f"tf_backup/{job_id}/opt{self.index}", self.layout, info.ps, info.num_workers, ext.endpoints,
            wire_dtype=self.config.wire_dtype, rule=rule, nesterov=bool(getattr(inner, "nesterov", False)))
        self.sparse = None
        self.chief: Optional[chief_lib.ChiefState] = None
        if info.is_chief:
            self.chief = chief_lib.ChiefState(
                inner=inner, rule=rule, state=self.state, layout=self.layout, config=self.config, info=info,
                var_list=var_list, index=self.index, checkpoint_dir=ext.checkpoint_dir,
                checkpoint_every_steps=ext.checkpoint_every_steps, monitor=ext.monitor, max_steps=ext.max_steps,
                make_liveness=ext.liveness, has_tables=has_tables)
        chief = self.chief
        self.master, self.checkpoint, self.on_ps, self.aggregator = (
            (None,) * 4 if chief is None else (chief.master, chief.checkpoint, chief.on_ps, chief.aggregator))
        self.client = worker_lib.WorkerClient(
            self.state, self.config, info, ext.monitor, on_stop=ext.stop_models,
            chief=chief_link.NONE if self.aggregator is None else chief_link.ChiefLink(
                failure=self.aggregator_failure, dead_workers=self._dead_workers,
                # The chief's worker takes what its aggregator published, unless the ps tasks applied it.
                published=None if self.on_ps is not None else self.aggregator.published),
        )
        if self.aggregator is None:
            inner.build(var_list)
            self.client.wait_until_ready()
        else:
            self.client.resume()  # its input position, from the checkpoint
        flats, _ = self.client.pull()
        self.initial_step = self.client.step
        self.initial_input_position = self.client.input_position
        self._var_list = list(var_list)
        self._assign(var_list, flats)
        self.metric_vars = ext.ensure_metric_vars()
        with strategy.scope():  # several local replicas: one buffer copy each (tf_backup.frontend.exchange)
            self.buffers = exchange_lib.StepBuffers(self.layout.shard_sizes, self.layout.dtype, ext._device)  # pylint: disable=protected-access
        ext.bindings.append(self)

    def start(self) -> None:
        """Starts the chief's aggregator (nothing elsewhere)."""
        if self.chief is not None:
            self.chief.start()

    def _dead_workers(self):
        return () if self.chief is None else self.chief.dead_workers()

    def aggregator_failure(self) -> Optional[BaseException]:
        """Why the chief's aggregator stopped, if it failed (None elsewhere)."""
        return None if self.aggregator is None else self.aggregator.failure

    def close(self, failed: bool = False) -> None:
        """Stops the aggregator; the chief saves a last checkpoint (also after a failure)."""
        self.client.close()
        if self.chief is not None:
            self.chief.close(failed)
        self.state.close()  # last: the final checkpoint above may read from every ps task

    def _assign(self, var_list: Sequence, flats: Sequence) -> List:
        return [v.assign(x) for v, x in zip(var_list, self.layout.unpack(flats))]

    def restart_superseded(self) -> Optional[int]:
        """Pulls the current step into the model after a superseded sleep (`WorkerClient.restart_superseded`).

        Returns the new step of the parameters; None if no sleep was superseded
        or the fit round has stopped (the batch then ends the fit).
        """
        if self.sparse is not None:
            # Its tables' rows are pulled inside each step, from the step of the last one: a restart
            # between steps would move the dense variables to the new step and leave the rows behind.
            raise ValueError(
                "restart_superseded() does not support a SyncReplicasOptimizer with `sparse_variables` "
                "yet: cancel the batch instead (do not call it after sleep_unless_superseded).")
        flats = self.client.restart_superseded()
        if flats is None:
            return None
        # A compiled step's gradient still in the buffers was computed on the old step: it is the
        # cancelled batch, and must not be pushed tagged with the new one.
        self.buffers.clear()
        self._assign(self._var_list, flats)
        return None if self.client.round_stopped else self.client.step

    def _sync(self, *parts):
        """(py_function.) `parts`: per shard, the gradient's body (wire dtype) then its exact tail, or one tensor.

        Returns the pulled parameters per variable (wire dtype), then the step's metrics.
        """
        memory.reapply()  # tf.data's iterators reset glibc's mmap threshold (tf_backup.memory)
        new_flats, metrics = self.client.sync(list(zip(parts[0::2], parts[1::2])) if self.state.tail else list(parts))
        if metrics.stopped and not self._ext.has_models():
            # Stopped, and no Keras model to stop: end a custom loop like an exhausted dataset.
            raise tf.errors.OutOfRangeError(None, None, "tf_backup: the training round has ended.")
        # Per variable, views of the pulled shards: the graph assigns them without cutting the shards.
        return [*self.layout.unpack_arrays(new_flats), tf.constant(metrics.as_array())]

    def dense_gradients(self, grads: List) -> List[tf.Tensor]:
        """The gradients as dense tensors of the variables' shapes (None: zeros)."""
        layout, dense = self.layout, []
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
            if not grad.shape.is_compatible_with(shape):
                raise ValueError(
                    f"The gradient of variable `{name}` has shape {tuple(grad.shape)} but the "
                    f"variable has shape {shape}."
                )
            dense.append(grad)
        return dense

    def apply(self, grads: List, variables: List) -> None:
        """The graph part of one step on this worker.

        Not compiled: push, wait, pull, assign, here. Inside an XLA or TPU
        program: write the gradient into the step buffers; the strategy runs
        the exchange outside the program (`tf_backup.frontend.exchange`).
        """
        layout = self.layout
        compiled = self.split_step()
        replica_ctx = local_devices.several_replicas()
        if replica_ctx is not None and not compiled:  # one contribution per host: reduce, then push once
            return local_devices.apply_once_per_host(
                replica_ctx, self.apply, grads, variables, layout.shapes, layout.dtypes)
        keys = [self._optimizer._var_key(v) for v in variables]  # pylint: disable=protected-access
        if keys != self._keys:
            raise ValueError(
                "SyncReplicasOptimizer.apply() received variables that differ from the "
                f"{layout.num_vars} it was built with: apply to the same trainable variables "
                "every step."
            )
        dense = self.dense_gradients(grads)
        if compiled:  # each local replica writes its own copy; the exchange's read sums them
            self.buffers.write(layout.pack(dense))
            self._ext.mark_compiled_step(self)
        else:
            self._exchange(self._wire_parts(dense=dense), variables)
        self._ext.mark_step_applied()

    def split_step(self) -> bool:
        """(While tracing.) Whether this step writes buffers for an exchange outside it (compiled)."""
        return exchange_lib.in_compiled_context() or self._ext.always_split

    def exchange(self) -> tf.Tensor:
        """(Host, graph or eager.) The exchange of the gradient a compiled step left in the buffers, if any.

        Returns whether there was one (a bool tensor).
        """
        buffers = self.buffers

        def run():
            done = self._exchange(self._wire_parts(packed=buffers.read()), self._var_list,
                                  pending=buffers.pending.read_value())
            with tf.control_dependencies([done]):
                buffers.clear()
            return tf.constant(True)

        try:
            return tf.cond(buffers.pending.read_value() > 0, run, lambda: tf.constant(False))
        except tf.errors.OpError as e:  # run eagerly (the end of a fit, a batch fetched eagerly): by type
            self._ext.raise_if_failed(e)
            raise

    def _wire_parts(self, dense: Optional[List[tf.Tensor]] = None, packed: Optional[List[tf.Tensor]] = None):
        """What a push feeds, per shard, from the `dense` gradients or their `packed` shards.

        The tail is the gradient's squared norm (read by adaptive N's noise scale only: otherwise 0,
        which spares a read of the whole gradient) and the one-hot of this worker. With a narrower
        wire dtype: the body cast to it, then the exact tail. In float32: one tensor, body and tail,
        made from `dense` by the shard's one concatenation (`Layout.pack`), not by a second copy.
        """
        layout, wire = self.layout, self.state.wire
        onehot = tf.one_hot(self.worker_index, self.num_workers, dtype=layout.dtype)

        def tail(parts):
            if self.config.adaptive is None:
                sq = tf.zeros([1], layout.dtype)
            else:
                sq = tf.reshape(tf.add_n([tf.reduce_sum(tf.square(p)) for p in parts]), [1])
            return tf.concat([sq, onehot], 0)

        if not self.state.tail and dense is not None:
            return layout.pack(dense, tail=tail)
        packed = layout.pack(dense) if packed is None else packed
        if not self.state.tail:
            return [tf.concat([flat, tail([flat])], 0) for flat in packed]
        return [x for flat in packed for x in (tf.cast(flat, wire), tail([flat]))]

    def _exchange(self, parts: List[tf.Tensor], variables: List, pending=None):
        """Push, wait, pull (one tf.py_function), then assign the parameters and the step metrics.

        `parts`: what the push feeds (`_wire_parts`). `pending`: the buffers' count, for a compiled
        step's exchange (`_sync_pending`). Returns the last assignment.
        """
        layout, wire = self.layout, self.state.wire
        fn, inputs = (self._sync, parts) if pending is None else (self._sync_pending, [pending, *parts])
        outs = tf.py_function(self.keeping_failures(fn), inputs, Tout=[wire] * layout.num_vars + [metrics_lib.DTYPE],
                              name="tf_backup_sync")
        metrics = tf.ensure_shape(outs[-1], [metrics_lib.SIZE])
        assigns = [v.assign(tf.cast(tf.ensure_shape(o, shape), dtype))
                   for v, o, shape, dtype in zip(variables, outs[:-1], layout.shapes, layout.dtypes)]
        with tf.control_dependencies(assigns):
            for name, var in self.metric_vars.items():  # the StepMetrics fields of the same names
                var.assign(metrics[metrics_lib.StepMetrics.index(name)])
            step = metrics[metrics_lib.StepMetrics.index("global_step")]
            return self._optimizer.iterations.assign(tf.cast(step, self._optimizer.iterations.dtype))

    def keeping_failures(self, fn):
        """`fn`, a step's `tf.py_function` body, keeping the tf_backup error it raises on the strategy.

        The train function (`fit`) or `run` raises it by type once TensorFlow's
        `UnknownError` is out (`extended.raise_if_failed`).
        """
        return self._ext.keeping_failures(fn)

    def _sync_pending(self, pending, *parts):
        if int(pending) > 1:
            raise errors.ExchangeError(
                f"{int(pending)} compiled steps wrote their gradient before one exchange: "
                f"{int(pending) - 1} were never pushed. Fetch each batch from the strategy's "
                "distributed dataset (its iterator runs the exchange of the previous step).")
        if self.sparse is None:
            return self._sync(*parts)
        self.sparse.push_buffered()  # before the dense push, as in a step that is not compiled
        out = self._sync(*parts)
        self.sparse.pull_into_tables()
        return out

    def end_round(self, var_list: List) -> None:
        self.exchange()  # a compiled fit's last step (tf_backup.frontend.exchange)
        self._assign(var_list, self.client.end_round(wait_for_others=self.aggregator is not None))
        if self.on_ps is not None:  # the round is closed: its master copy and slots, as the ps tasks hold them
            self.on_ps.refresh()

    def counters(self) -> "Counters":
        """This worker's protocol counters (for tests and benchmarks)."""
        return Counters(
            missed_wakeups=self.client.missed_wakeups + (self.aggregator.missed_wakeups if self.aggregator else 0),
            local_pulls=self.client.local_pulls,
            unsent=self.client.unsent,
            step=self.client.step,
            dense_elements=sum(self.layout.shard_sizes),
            sparse_tables=None if self.sparse is None else [t.shape for t in self.sparse.tables],
            state_generation=self.client.generation,
            state_rewrites=self.aggregator.recovery.recoveries if self.aggregator else 0,
        )


@dataclasses.dataclass(frozen=True)
class Counters:
    """What one worker's binding counted.

    Attributes:
      missed_wakeups: waits that ran to their deadline although what they
        waited for had happened (a wake-up token lost or never sent); the
        chief's include its aggregator's.
      local_pulls: steps whose parameters the chief's worker took from its own
        aggregator instead of the ps.
      unsent: gradients this worker found late just before their push, and did not send
        (counted as pushed and dropped all the same).
      step: the global step of the parameters in the model.
      dense_elements: elements in the dense flat shards.
      sparse_tables: the shapes of the tables that go by rows (None: none).
      state_generation: the generation of the shared state this worker is in
        (how many times the chief wrote it again after a ps restart).
      state_rewrites: (the chief) times its aggregator wrote the state again
        (`tf_backup.ps.recovery`); 0 elsewhere.
    """

    missed_wakeups: int
    local_pulls: int
    unsent: int
    step: int
    dense_elements: int
    sparse_tables: Optional[List[List[int]]]
    state_generation: int = 0
    state_rewrites: int = 0
