"""Sparse gradients: Embedding tables pushed, applied, published and pulled by rows.

A variable of a `keras.layers.Embedding` (its `embeddings`, rank 2) gets an
`IndexedSlices` gradient: the rows of the tokens in the batch (as does any
variable read with `tf.gather`; name those in
`SyncReplicasOptimizer(sparse_variables=[...])`). Densifying it
makes every step cost O(vocabulary) in the push, the take, the publish and the
pull. Here such a table is kept out of the flat shards of `tf_backup.ps.layout.Layout`
and has its own shared state on a ps task (`<prefix>/sparse/<k>/...`):

* `table`: the published rows; `version`: per row, the global step that last
  wrote it (int64);
* `acc`: an `accumulators.SparseConditionalAccumulator` (rows + per-worker
  count rows), with the same staleness check as the dense accumulators.

Each step, on every worker, in the same traced train step as the dense
protocol: push the table's gradient rows tagged with the step `s` of the
parameters (before the dense push, so the chief finds them when it finds the
dense ones), then -- after the dense sync pulled step `s'` -- pull only the rows
whose version is above the step the worker last pulled, and scatter them into
the local table. The chief, in an aggregator step hook (after the dense take and apply):
take the sparse accumulators, average by their own counts, apply the inner
optimizer (a copy of the user's, over a chief-local master of the tables) to
`IndexedSlices`, and publish the rows it changed with version `s + 1`, before
the aggregator publishes step `s + 1`. A worker that reads rows of `s + 1`
early is harmless: its next push (tagged `s`) is stale, since the take already
moved the accumulators, and it pulls those rows again at `s + 1`.

Costs per step are O(rows touched) in transfer and chief work; the ps scans
the version vector (O(vocabulary) int64 compares, in C++) for each pull. An
inner optimizer that updates rows no gradient touched (Keras 3 Adam's moments
are dense) changes every row, so the pull is dense again: use SGD (with or
without momentum on the touched rows only: Keras 3 SGD without momentum is
sparse) or Adagrad-like optimizers for large tables. The inner optimizer's
copy for the tables (its slots) is not part of the saved optimizer state.
"""

import contextlib
import threading
from typing import List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from tf_backup import _checks
from tf_backup import errors
from tf_backup.chief import chief as chief_lib
from tf_backup.frontend import exchange as exchange_lib
from tf_backup.frontend import local_devices
from tf_backup.protocol import pushes
from tf_backup.ps import accumulators
from tf_backup.ps import recovery as ps_recovery
from tf_backup.ps.endpoint import Endpoint
from tf_backup.ps.layout import largest_first


def path(variable) -> str:
    """A variable's Keras path (`"dense/kernel"`), or its TF name without the `:0`."""
    return (getattr(variable, "path", None) or getattr(variable, "name", "")).split(":")[0]


def is_embedding_table(variable) -> bool:
    """Whether `variable` is a `keras.layers.Embedding` table (its gradients are IndexedSlices)."""
    return path(variable).split("/")[-1] == "embeddings" and len(variable.shape) == 2


def split(var_list: Sequence, chosen=None) -> Tuple[List[int], List[int]]:
    """(dense positions, sparse positions) of `var_list`.

    Args:
      var_list: the trainable variables.
      chosen: which go by rows (`SyncReplicasOptimizer(sparse_variables=)`):
        None for the Embedding tables; a list of variables or paths; or a
        callable from a variable to bool.

    Raises:
      ValueError: a listed variable or path is not in `var_list`, or a chosen
        variable is a scalar.
    """
    if chosen is None:
        pick = is_embedding_table
    elif callable(chosen):
        pick = lambda v: bool(chosen(v))  # noqa: E731
    else:
        paths = {path(v) for v in var_list}
        wanted = set()
        for item in chosen:
            name = item if isinstance(item, str) else path(item)
            # A path or its last components: "lookup/table" names "sequential/lookup/table".
            matches = {p for p in paths if p == name or p.endswith("/" + name)}
            if not matches:
                raise ValueError(
                    f"`sparse_variables` names `{name}`, which is not a trainable variable of this model "
                    f"(its variables: {', '.join(sorted(paths))}). Received sparse_variables={chosen!r}")
            wanted |= matches
        pick = lambda v: path(v) in wanted  # noqa: E731
    sparse = [i for i, v in enumerate(var_list) if pick(v)]
    for i in sparse:
        if len(var_list[i].shape) < 1:
            raise ValueError(f"A variable that goes by rows needs rank >= 1; `{path(var_list[i])}` is a "
                             "scalar. Leave it out of `sparse_variables`.")
    return [i for i in range(len(var_list)) if i not in sparse], sparse


class SparseTable:
    """One table's shared state on its ps task: published rows, row versions, accumulator."""

    def __init__(self, prefix: str, shape, dtype, num_workers: int, where: Endpoint):
        self.prefix = prefix
        self.shape = [int(d) for d in shape]
        self.dtype = tf.as_dtype(dtype)
        self.endpoint = where
        self._np_dtype = self.dtype.as_numpy_dtype
        rows, row_shape = self.shape[0], self.shape[1:]

        def ops():
            table = tf.raw_ops.VarHandleOp(dtype=self.dtype, shape=self.shape, shared_name=f"{prefix}/table",
                                           container="")
            version = tf.raw_ops.VarHandleOp(dtype=tf.int64, shape=[rows], shared_name=f"{prefix}/version",
                                             container="")
            value = tf.compat.v1.placeholder(self.dtype, self.shape)
            indices = tf.compat.v1.placeholder(tf.int64, [None])
            updates = tf.compat.v1.placeholder(self.dtype, [None] + row_shape)
            step = tf.compat.v1.placeholder(tf.int64, [])
            versions = tf.raw_ops.ReadVariableOp(resource=version, dtype=tf.int64)
            changed = tf.reshape(tf.where(versions > step), [-1])
            publish = tf.group(
                tf.raw_ops.ResourceScatterUpdate(resource=table, indices=indices, updates=updates),
                tf.raw_ops.ResourceScatterUpdate(resource=version, indices=indices,
                                                 updates=tf.fill(tf.shape(indices), step)))
            return dict(
                value=value, indices=indices, updates=updates, step=step,
                create=tf.group(tf.raw_ops.AssignVariableOp(resource=table, value=value)),
                create_version=tf.raw_ops.AssignVariableOp(resource=version, value=tf.zeros([rows], tf.int64)),
                ready=tf.raw_ops.VarIsInitializedOp(resource=version),
                read=tf.raw_ops.ReadVariableOp(resource=table, dtype=self.dtype),
                changed=(changed, tf.raw_ops.ResourceGather(resource=table, indices=changed, dtype=self.dtype)),
                publish=publish,
            )

        self._ops = where.build(ops)
        self.acc = accumulators.SparseConditionalAccumulator(
            f"{prefix}/acc", self.dtype, self.shape, num_workers, where)

    def _run(self, name, feed=None):
        return self.endpoint.run(self._ops[name], feed, what=f"{name} of `{self.prefix}`")

    def create(self, value) -> None:
        """Chief: initial rows, then versions (which mark the table ready), accumulator at step 0."""
        self._run("create", {self._ops["value"]: np.asarray(value, self._np_dtype)})
        self.acc.set_global_step(0)
        self._run("create_version")

    def ready(self) -> bool:
        return bool(self._run("ready"))

    def read(self) -> np.ndarray:
        return self._run("read")

    def changed_since(self, step: int):
        """(indices, rows) of the rows some step after `step` wrote."""
        return self._run("changed", {self._ops["step"]: int(step)})

    def publish(self, step: int, indices, rows) -> None:
        self._run("publish", {self._ops["indices"]: np.asarray(indices, np.int64),
                              self._ops["updates"]: np.asarray(rows, self._np_dtype),
                              self._ops["step"]: int(step)})


class SparseBinding:
    """The Embedding tables of one `SyncReplicasOptimizer`, beside its dense `_Binding`.

    Args:
      optimizer: the SyncReplicasOptimizer.
      strategy: its BackupWorkerStrategy.
      dense: the optimizer's `binding.Binding` of the other variables (already
        built: the job is joined, the dense state exists; its aggregator starts
        after this registered its step hook).
      var_list: every trainable variable; `dense_ids`, `sparse_ids`: positions.
    """

    def __init__(self, optimizer, strategy, dense, var_list: Sequence, dense_ids: List[int],
                 sparse_ids: List[int]):
        info = strategy.extended.cluster
        self.dense = dense
        self.dense_ids, self.sparse_ids = dense_ids, sparse_ids
        self.num_vars = len(var_list)
        self.variables = [var_list[i] for i in sparse_ids]
        self.worker_index = info.worker_index
        sizes = [int(np.prod(v.shape)) for v in self.variables]
        where = largest_first(sizes, dense.layout.shard_sizes)
        self.ps_of_table = where
        self.tables = [
            SparseTable(f"{dense.state.prefix}/sparse/{k}", v.shape, v.dtype, info.num_workers,
                        strategy.extended.endpoints.of(info.ps[where[k]]))
            for k, v in enumerate(self.variables)
        ]
        self._lock = threading.Lock()
        self.pulled_step = 0
        self.master = None
        self._row_buffers: Optional[List[tf.Variable]] = None  # a compiled step's rows (tf_backup.frontend.exchange)
        if info.is_chief:
            inner = optimizer.inner_optimizer
            self.inner = type(inner).from_config(inner.get_config())  # its own slots, same settings
            self.master = chief_lib.make_master(self.variables)
            with tf.init_scope():
                self.inner.build(self.master)
                checkpoint = dense.checkpoint
                if checkpoint is not None:  # the tables and their slots go in the same checkpoint
                    step = checkpoint.add(tables=self.master, tables_optimizer=self.inner.variables)
                    if step != dense.initial_step:
                        raise ValueError(
                            f"The checkpoint in {checkpoint.directory} changed while it was restored "
                            f"(global step {dense.initial_step}, then {step}).")
            for table, m in zip(self.tables, self.master):
                table.create(m.numpy())
            self._apply_rows = self._make_apply_fn()
            # As many rows as the dense take had gradients: N, or more that came with them.
            dense.aggregator.add_step_hook(lambda new_step, taken: self._take_apply_publish(taken, new_step))
        else:
            self._wait_until_ready(dense.config.startup_timeout)
        for var, table in zip(self.variables, self.tables):
            var.assign(table.read())
        self.pulled_step = dense.client.step

    def _wait_until_ready(self, timeout: float) -> None:
        _checks.poll_until(
            lambda: all(t.ready() for t in self.tables), timeout=timeout, first=0.05, longest=0.05,
            on_timeout=lambda waited: errors.StepTimeoutError(
                f"Worker {self.worker_index} waited {timeout:.0f} s for the chief to create the "
                f"embedding tables `{self.tables[0].prefix}` (startup_timeout)."))

    # -- chief -------------------------------------------------------------------

    def _make_apply_fn(self):
        inner, master, shapes = self.inner, self.master, [t.shape for t in self.tables]

        @tf.function(jit_compile=False, autograph=False)
        def apply_rows(indices, rows):
            grads = [tf.IndexedSlices(r, i, dense_shape=tf.constant(s, tf.int64))
                     for i, r, s in zip(indices, rows, shapes)]
            inner.apply(grads, master)
            return [tf.gather(m.value, i) for m, i in zip(master, indices)]

        return apply_rows

    def _take_apply_publish(self, n: int, new_step: int) -> None:
        indices, rows = [], []
        for table in self.tables:
            idx, sums, counts = table.acc.take_grad(n)
            indices.append(idx)
            rows.append(sums / max(int(counts.sum()), 1))
        new_rows = self._apply_rows(indices, rows)
        for table, idx, new in zip(self.tables, indices, new_rows):
            table.publish(new_step, idx, new.numpy())

    # -- every worker, each step -----------------------------------------------------

    def _push(self, *flat):
        client = self.dense.client
        if not client.round_stopped:
            tag = client.step if client.config.staleness_check else pushes.INT64_MAX
            with self._no_restart():
                for k, table in enumerate(self.tables):
                    table.acc.apply_grad(flat[2 * k].numpy(), flat[2 * k + 1].numpy(), tag, self.worker_index)
        return np.int64(0)

    def _pull(self, token):
        del token
        with self._lock, self._no_restart():
            since = self.pulled_step
            out = []
            for table in self.tables:
                out.extend(table.changed_since(since))
            self.pulled_step = self.dense.client.step
        return out

    @contextlib.contextmanager
    def _no_restart(self):
        """A failed run of rows under `ps_restart_timeout` says why the job cannot wait for the ps (as the aggregator does)."""
        try:
            yield
        except ps_recovery.RECOVERABLE as e:
            if not self.dense.client.config.ps_restart_timeout:
                raise
            raise errors.PsUnavailableError(f"{e} {ps_recovery.SPARSE_NOT_RESTARTABLE}") from e

    def apply(self, grads: List, variables: List) -> None:
        """The graph part of one step: push rows, the dense step, pull changed rows.

        In a compiled step (`tf_backup.frontend.exchange`): write the rows into buffers;
        the dense exchange pushes them and pulls the changed rows, on the host.
        """
        compiled = self.dense.split_step()
        replica_ctx = local_devices.several_replicas()
        if replica_ctx is not None and compiled:
            raise NotImplementedError(
                "A compiled step of a worker with several local devices cannot push Embedding tables "
                "by rows yet: give each worker process one device, compile with jit_compile=False, "
                "or send the tables through the dense accumulators (sparse_variables=[]).")
        if replica_ctx is not None:
            shapes = [tuple(v.shape) for v in variables]
            dtypes = [v.dtype for v in variables]
            return local_devices.apply_once_per_host(replica_ctx, self.apply, grads, variables, shapes, dtypes)
        flat = []
        for grad, var in zip([grads[i] for i in self.sparse_ids], self.variables):
            if grad is None:
                flat += [tf.zeros([0], tf.int64), tf.zeros([0] + list(var.shape[1:]), var.dtype)]
            elif isinstance(grad, tf.IndexedSlices):
                flat += [tf.cast(grad.indices, tf.int64), tf.cast(grad.values, var.dtype)]
            else:  # a dense gradient of a table (e.g. tied weights): every row
                flat += [tf.range(tf.shape(grad, out_type=tf.int64)[0]), tf.cast(grad, var.dtype)]
        dense_grads = [grads[i] for i in self.dense_ids]
        dense_vars = [variables[i] for i in self.dense_ids]
        if compiled:
            for buffer, value in zip(self._buffers_for(flat), flat):
                buffer.assign(value)
            self.dense.apply(dense_grads, dense_vars)  # writes the dense buffers; its exchange calls ours
            return
        keeping = self.dense.keeping_failures
        token = tf.py_function(keeping(self._push), flat, Tout=tf.int64, name="tf_backup_sparse_push")
        with tf.control_dependencies([token]):
            self.dense.apply(dense_grads, dense_vars)
        dense_done = tf.identity(self.dense.metric_vars["global_step"].read_value())
        outs = tf.py_function(keeping(self._pull), [dense_done],
                              Tout=[t for var in self.variables for t in (tf.int64, var.dtype)],
                              name="tf_backup_sparse_pull")
        for k, var in enumerate(self.variables):
            idx = tf.ensure_shape(outs[2 * k], [None])
            rows = tf.ensure_shape(outs[2 * k + 1], [None] + list(var.shape[1:]))
            self._scatter(var, idx, rows)

    @staticmethod
    def _scatter(var, indices, rows) -> None:
        value = var.value if isinstance(var, keras.Variable) else var
        value.scatter_update(tf.IndexedSlices(rows, indices, dense_shape=tf.constant([int(d) for d in var.shape], tf.int64)))

    def _buffers_for(self, flat: List[tf.Tensor]) -> List[tf.Variable]:
        """(First compiled trace.) Buffers of the rows' shapes: XLA cannot change a variable's shape."""
        if self._row_buffers is None:
            if exchange_lib.in_compiled_context() and not all(t.shape.is_fully_defined() for t in flat):
                raise ValueError(
                    "A compiled step pushes Embedding rows through buffers of a fixed size, but this "
                    f"step's row counts are not static ({[tuple(t.shape) for t in flat[::2]]}): give the "
                    "dataset a fixed batch size (`batch(..., drop_remainder=True)`), or compile with "
                    "jit_compile=False.")
            with tf.init_scope():
                self._row_buffers = [
                    tf.Variable(tf.zeros([d if d is not None else 0 for d in t.shape], t.dtype),
                                shape=tf.TensorShape([None] + list(t.shape[1:])), trainable=False,
                                name=f"tf_backup_rows_{k}")
                    for k, t in enumerate(flat)]
        return self._row_buffers

    def push_buffered(self) -> None:
        """(Host, inside the dense exchange.) Pushes the rows a compiled step left in the buffers."""
        if self._row_buffers is not None:
            self._push(*self._row_buffers)

    def pull_into_tables(self) -> None:
        """(Host, inside the dense exchange, after its pull.) Scatters the changed rows into the tables."""
        if self._row_buffers is None:
            return
        outs = self._pull(None)
        for k, var in enumerate(self.variables):
            self._scatter(var, tf.constant(outs[2 * k]), tf.constant(outs[2 * k + 1]))

    def end_round(self) -> None:
        """After the dense end of round: the final tables."""
        with self._lock:
            for var, table in zip(self.variables, self.tables):
                var.assign(table.read())
            self.pulled_step = self.dense.client.step
