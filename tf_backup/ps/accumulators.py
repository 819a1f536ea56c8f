"""Shared resources on a ps task, reached by name from every worker process.

Every resource lives in the resource manager of a `tf.distribute.Server` (a
ps task) and is created or attached by `shared_name`: every process that
names it reaches the same resource, and nothing is destroyed when a process
exits (TensorFlow's eager `tf.Variable` and `ConditionalAccumulator` attach a
deleter that would destroy it).

Processes reach a ps task through an `Endpoint` (`tf_backup.ps.endpoint`): a
graph of raw ops and a session on the task's server.

`ConditionalAccumulator` is TensorFlow's `ResourceConditionalAccumulator`: it
sums (or averages) gradients and drops any gradient whose `local_step` is below
its own global step -- the staleness check of synchronous SGD with backup
workers. `take_grad` returns the aggregate and advances the accumulator's
global step, so a gradient tagged with the old step is stale from that moment.
"""

from typing import Sequence

import numpy as np
import tensorflow as tf

from tf_backup.ps.endpoint import Endpoint
from tf_backup.ps.endpoint import OnDuplicate

# A push delivered twice ran once (see Endpoint.run); a take delivered twice
# lost its result, so it raises rather than take another N gradients.
_ON_DUPLICATE = {"apply": OnDuplicate.DONE, "take": OnDuplicate.RAISE}

class SharedVariable:
    """A rank-1 (or any shape) resource variable on a task, created or attached by `shared_name`.

    Every process that builds a `SharedVariable` with the same name, dtype and
    shape on the same task reaches the same variable. Values in and out are
    numpy arrays.
    """

    def __init__(self, shared_name: str, dtype, shape, where: Endpoint):
        self.shared_name = shared_name
        self.dtype = tf.as_dtype(dtype)
        self.shape = tf.TensorShape(shape)
        self.endpoint = where
        self._np_dtype = self.dtype.as_numpy_dtype

        def ops():
            handle = tf.raw_ops.VarHandleOp(dtype=self.dtype, shape=self.shape, shared_name=shared_name,
                                            container="")
            value = tf.compat.v1.placeholder(self.dtype, self.shape)
            indices = tf.compat.v1.placeholder(tf.int32, [None])
            updates = tf.compat.v1.placeholder(self.dtype, [None])
            return dict(
                handle=handle, value=value, indices=indices, updates=updates,
                initialized=tf.raw_ops.VarIsInitializedOp(resource=handle),
                read=tf.raw_ops.ReadVariableOp(resource=handle, dtype=self.dtype),
                assign=tf.raw_ops.AssignVariableOp(resource=handle, value=value),
                scatter_update=tf.raw_ops.ResourceScatterUpdate(resource=handle, indices=indices,
                                                                updates=updates),
                scatter_max=tf.raw_ops.ResourceScatterMax(resource=handle, indices=indices, updates=updates),
            )

        self._ops = where.build(ops)

    @property
    def ops(self) -> dict:
        """The graph ops and placeholders of this variable in its endpoint's graph."""
        return self._ops

    def _run(self, name, feed=None):
        return self.endpoint.run(self._ops[name], feed, what=f"{name} of `{self.shared_name}`")

    def is_initialized(self) -> bool:
        return bool(self._run("initialized"))

    def read(self) -> np.ndarray:
        return self._run("read")

    def assign(self, value) -> None:
        self._run("assign", {self._ops["value"]: np.asarray(value, self._np_dtype)})

    def scatter_update(self, indices: Sequence[int], values) -> None:
        """Sets `self[indices] = values` atomically (a rank-1 variable)."""
        self._scatter("scatter_update", indices, values)

    def scatter_max(self, indices: Sequence[int], values) -> None:
        """Sets `self[i] = max(self[i], value)` atomically (a rank-1 variable)."""
        self._scatter("scatter_max", indices, values)

    def _scatter(self, name, indices, values):
        self._run(name, {self._ops["indices"]: np.asarray(indices, np.int32),
                         self._ops["updates"]: np.asarray(values, self._np_dtype)})


def fifo_queue(shared_name: str):
    """(In an `Endpoint.build`.) The handle of an unbounded int64 FIFO queue, by `shared_name`.

    Like the other resources, it lives in the task's resource manager and
    outlives the processes that use it.
    """
    return tf.raw_ops.FIFOQueueV2(component_types=[tf.int64], shapes=[[]], capacity=-1,
                                  shared_name=shared_name, container="")


def drain(queue, block, at_least=None):
    """(In an `Endpoint.build`.) Dequeues everything in `queue`; if `block` and it is empty, waits for one.

    `block` is a bool tensor; `at_least`, an int32 tensor: with `block`, wait
    until the queue holds that many (default 1). Only one process may drain a
    queue, or the size read here could shrink before the dequeue. Run it with
    `Endpoint.run(wait=)` to bound the wait: a run past its deadline is
    cancelled on the task, and what it had dequeued so far is lost (tokens
    are hints: lose one, and a wait runs to its deadline).
    """
    size = tf.raw_ops.QueueSizeV2(handle=queue)
    least = tf.cast(block, tf.int32) if at_least is None else tf.cast(block, tf.int32) * at_least
    count = tf.maximum(size, least)
    return tf.raw_ops.QueueDequeueManyV2(handle=queue, n=count, component_types=[tf.int64])[0]


class ConditionalAccumulator:
    """A `ResourceConditionalAccumulator` on a task, attached by `shared_name`.

    Kernels exist for the CPU only, and for half, float and double. The
    accumulator is created with this shape by the first op that uses it.

    A gradient can come in two parts (`tail` > 0): a body of `shape[0] - tail`
    elements, sent in `wire_dtype` (what crosses the network; cast to `dtype`
    on the task, so sums stay in `dtype`), and a tail of `tail` exact values in
    `dtype` (a push's squared norm and one-hot, `pushes.push_tail`). A take
    then returns the body in `wire_dtype` and the tail in `dtype`.

    Args:
      shared_name: the name every process uses to reach this accumulator.
      dtype: tf.float16, tf.float32 or tf.float64.
      shape: the gradient shape.
      where: the `Endpoint` of the task (a CPU device) that holds it.
      reduction_type: "SUM" or "MEAN": what `take_grad` returns.
      tail: the exact part's size (0: one part, in `dtype`; rank-1 shapes only otherwise).
      wire_dtype: the body's dtype on the wire (default `dtype`).
    """

    def __init__(self, shared_name: str, dtype, shape, where: Endpoint, reduction_type: str = "SUM",
                 tail: int = 0, wire_dtype=None):
        dtype = tf.as_dtype(dtype)
        if dtype not in (tf.float16, tf.float32, tf.float64):
            raise TypeError(
                "ConditionalAccumulator kernels exist for float16, float32 and "
                f"float64. Received dtype={dtype.name}"
            )
        if reduction_type not in ("SUM", "MEAN"):
            raise ValueError(
                f"`reduction_type` must be 'SUM' or 'MEAN'. Received reduction_type={reduction_type!r}"
            )
        self.shared_name = shared_name
        self.dtype = dtype
        self.shape = tf.TensorShape(shape)
        self.endpoint = where
        self._np_dtype = dtype.as_numpy_dtype
        self.tail = int(tail)
        self.wire_dtype = dtype if wire_dtype is None else tf.as_dtype(wire_dtype)
        body_size = int(self.shape[0]) - self.tail if self.tail else None

        def ops():
            handle = tf.raw_ops.ResourceConditionalAccumulator(
                dtype=dtype, shape=self.shape, shared_name=shared_name, container="",
                reduction_type=reduction_type)
            step = tf.compat.v1.placeholder(tf.int64, [])
            required = tf.compat.v1.placeholder(tf.int32, [])
            if self.tail:
                grad = tf.compat.v1.placeholder(self.wire_dtype, [body_size])
                tail_in = tf.compat.v1.placeholder(dtype, [self.tail])
                gradient = tf.concat([tf.cast(grad, dtype), tail_in], 0)
                take = self.take_op(required, handle)
            else:
                taken = tf.raw_ops.ResourceAccumulatorTakeGradient(handle=handle, num_required=required, dtype=dtype)
                grad = tail_in = tf.compat.v1.placeholder(dtype, self.shape)
                gradient, take = grad, taken
            return dict(
                handle=handle, grad=grad, tail=tail_in, step=step, required=required,
                apply=tf.raw_ops.ResourceAccumulatorApplyGradient(handle=handle, local_step=step,
                                                                  gradient=gradient),
                count=tf.raw_ops.ResourceAccumulatorNumAccumulated(handle=handle),
                take=take,
                set_step=tf.raw_ops.ResourceAccumulatorSetGlobalStep(handle=handle, new_global_step=step),
            )

        self._ops = where.build(ops)

    @property
    def ops(self) -> dict:
        """The graph ops and placeholders of this accumulator in its endpoint's graph."""
        return self._ops

    def take_op(self, required, handle=None):
        """(In its endpoint's graph.) A take: one tensor, or with a tail (body in the wire dtype, tail). New ops each call."""
        handle = self._ops["handle"] if handle is None else handle
        taken = tf.raw_ops.ResourceAccumulatorTakeGradient(handle=handle, num_required=required, dtype=self.dtype)
        if not self.tail:
            return taken
        body_size = int(self.shape[0]) - self.tail
        return tf.cast(taken[:body_size], self.wire_dtype), taken[body_size:]

    def _run(self, name, feed=None):
        return self.endpoint.run(self._ops[name], feed, what=f"{name} of accumulator `{self.shared_name}`",
                                 on_duplicate=_ON_DUPLICATE.get(name, OnDuplicate.RETRY))

    def feed(self, grad) -> dict:
        """The feed of a push of `grad`: a whole vector, or (with a tail) a `(body, tail)` pair."""
        if not self.tail:
            return {self._ops["grad"]: np.asarray(grad, self._np_dtype)}
        if isinstance(grad, tuple):
            body, tail = grad
        else:  # a whole vector (tests, tools): cut here
            grad = np.asarray(grad)
            body, tail = grad[:-self.tail], grad[-self.tail:]
        return {self._ops["grad"]: np.asarray(body, self.wire_dtype.as_numpy_dtype),
                self._ops["tail"]: np.asarray(tail, self._np_dtype)}

    def apply_grad(self, grad, local_step: int) -> None:
        """Adds `grad` (see `feed`) unless `local_step` is below the accumulator's step."""
        self._run("apply", {**self.feed(grad), self._ops["step"]: int(local_step)})

    def num_accumulated(self) -> int:
        return int(self._run("count"))

    def take_grad(self, num_required: int):
        """Returns the aggregate (with a tail: a `(body, tail)` pair) and advances the accumulator's global step.

        The op blocks until `num_required` gradients are in (at most the
        endpoint's timeout): call it once `num_accumulated() >= num_required`.
        """
        return self._run("take", {self._ops["required"]: int(num_required)})

    def set_global_step(self, step: int) -> None:
        """Sets the accumulator's global step (it never moves backwards)."""
        self._run("set_step", {self._ops["step"]: int(step)})


class SparseConditionalAccumulator:
    """A `SparseConditionalAccumulator` on a task for `IndexedSlices` gradients, by `shared_name`.

    TensorFlow has no resource variant of the sparse accumulator (TF 2.21's raw ops
    are `SparseConditionalAccumulator`, `SparseAccumulatorApplyGradient`,
    `SparseAccumulatorTakeGradient`, with a ref-typed handle). Ref-typed ops
    still run in the graphs of our `Endpoint` sessions, and like the dense
    accumulator the sparse one lives in the task's resource manager under its
    shared name with no deleter. Pushes carry only the rows of the gradient
    (indices and values): nothing is densified on the way.

    Counting: the kernel's "MEAN" divides each row by the number of gradients
    that touched *that row*, not by the number of gradients, which is not the
    average large-batch SGD needs. So the accumulator SUMs, and its table has
    `num_workers` extra rows after the `num_rows` real ones: a worker's push adds
    a row of ones at `num_rows + worker`, so a take says which workers it holds
    (as the dense accumulators' one-hot slots do).

    Args:
      shared_name: the name every process uses to reach this accumulator.
      dtype: tf.float16, tf.float32 or tf.float64.
      shape: the variable's shape `[num_rows, ...]`.
      num_workers: workers that push (extra count rows).
      where: the `Endpoint` of the task (a CPU device) that holds it.
    """

    def __init__(self, shared_name: str, dtype, shape, num_workers: int, where: Endpoint):
        dtype = tf.as_dtype(dtype)
        if dtype not in (tf.float16, tf.float32, tf.float64):
            raise TypeError(
                "SparseConditionalAccumulator kernels exist for float16, float32 and "
                f"float64. Received dtype={dtype.name}")
        shape = tf.TensorShape(shape)
        if shape.rank is None or shape.rank < 1 or not shape.is_fully_defined():
            raise ValueError(f"`shape` must be a known shape of rank >= 1. Received shape={shape}")
        self.shared_name = shared_name
        self.dtype = dtype
        self.num_rows = int(shape[0])
        self.row_shape = [int(d) for d in shape[1:]]
        self.num_workers = num_workers
        self.endpoint = where
        self._np_dtype = dtype.as_numpy_dtype
        full = [self.num_rows + num_workers] + self.row_shape

        def ops():
            handle = tf.raw_ops.SparseConditionalAccumulator(
                dtype=dtype, shape=full, shared_name=shared_name, container="", reduction_type="SUM")
            indices = tf.compat.v1.placeholder(tf.int64, [None])
            values = tf.compat.v1.placeholder(dtype, [None] + self.row_shape)
            step = tf.compat.v1.placeholder(tf.int64, [])
            required = tf.compat.v1.placeholder(tf.int32, [])
            take = tf.raw_ops.SparseAccumulatorTakeGradient(handle=handle, num_required=required, dtype=dtype)
            return dict(
                indices=indices, values=values, step=step, required=required,
                apply=tf.raw_ops.SparseAccumulatorApplyGradient(
                    handle=handle, local_step=step, gradient_indices=indices, gradient_values=values,
                    gradient_shape=tf.constant(full, tf.int64), has_known_shape=True),
                count=tf.raw_ops.AccumulatorNumAccumulated(handle=handle),
                take=(take.indices, take.values),
                set_step=tf.raw_ops.AccumulatorSetGlobalStep(handle=handle, new_global_step=step),
            )

        self._ops = where.build(ops)

    def _run(self, name, feed=None):
        return self.endpoint.run(self._ops[name], feed, what=f"{name} of accumulator `{self.shared_name}`",
                                 on_duplicate=_ON_DUPLICATE.get(name, OnDuplicate.RETRY))

    def apply_grad(self, indices, values, local_step: int, worker: int) -> None:
        """Adds the rows `values` at `indices` (duplicates are summed) unless stale.

        Raises:
          ValueError: an index is outside the variable's rows.
        """
        indices = np.asarray(indices, np.int64).reshape([-1])
        values = np.asarray(values, self._np_dtype).reshape([len(indices)] + self.row_shape)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise ValueError(
                f"Gradient rows of `{self.shared_name}` must be in [0, {self.num_rows}). "
                f"Received indices in [{indices.min()}, {indices.max()}]")
        # The kernel merges rows across pushes but not inside one: sum duplicates here
        # (an Embedding's gradient repeats the row of every repeated token).
        indices, inverse = np.unique(indices, return_inverse=True)
        summed = np.zeros([len(indices)] + self.row_shape, self._np_dtype)
        np.add.at(summed, inverse.reshape([-1]), values)
        values = summed
        count_row = np.ones([1] + self.row_shape, self._np_dtype)
        self._run("apply", {self._ops["indices"]: np.append(indices, self.num_rows + worker),
                            self._ops["values"]: np.concatenate([values, count_row]),
                            self._ops["step"]: int(local_step)})

    def num_accumulated(self) -> int:
        return int(self._run("count"))

    def take_grad(self, num_required: int):
        """(indices, summed rows, per-worker counts); advances the accumulator's step.

        Rows appear once each, sorted; only rows some gradient touched.
        """
        indices, values = self._run("take", {self._ops["required"]: int(num_required)})
        real = indices < self.num_rows
        counts = np.zeros([self.num_workers], np.int64)
        for i, v in zip(indices[~real], values[~real]):
            counts[int(i) - self.num_rows] = int(np.rint(np.ravel(v)[0]))
        order = np.argsort(indices[real], kind="stable")
        return indices[real][order], values[real][order], counts

    def set_global_step(self, step: int) -> None:
        """Sets the accumulator's global step (it never moves backwards)."""
        self._run("set_step", {self._ops["step"]: int(step)})
