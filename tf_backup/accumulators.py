"""Shared resources on a remote task, reached by name from every worker.

TensorFlow's Python classes (`tf.Variable`, `tf.compat.v1.ConditionalAccumulator`)
attach a deleter to the eager handles they make: when the process that made one
exits, the resource is destroyed for every other process too. The classes here
create or attach to a resource by `shared_name` through raw ops, which attach
no deleter, so the resource lives as long as the task that holds it.

`ConditionalAccumulator` is TensorFlow's `ResourceConditionalAccumulator`: it
sums (or averages) gradients and drops any gradient whose `local_step` is below
its own global step -- the staleness check of synchronous SGD with backup
workers. `take_grad` returns the aggregate and advances the accumulator's
global step, so a gradient tagged with the old step is stale from that moment.
"""

import tensorflow as tf


class SharedVariable:
    """A resource variable on `device`, created or attached by `shared_name`.

    Every process that builds a `SharedVariable` with the same name, dtype and
    shape on the same device reaches the same variable. Nothing is destroyed
    when a process exits.
    """

    def __init__(self, shared_name: str, dtype, shape, device: str):
        self.shared_name = shared_name
        self.dtype = tf.as_dtype(dtype)
        self.shape = tf.TensorShape(shape)
        self.device = device
        with tf.device(device):
            self.handle = tf.raw_ops.VarHandleOp(
                dtype=self.dtype, shape=self.shape, shared_name=shared_name, container=""
            )

    def is_initialized(self) -> bool:
        with tf.device(self.device):
            return bool(tf.raw_ops.VarIsInitializedOp(resource=self.handle).numpy())

    def read(self) -> tf.Tensor:
        with tf.device(self.device):
            value = tf.raw_ops.ReadVariableOp(resource=self.handle, dtype=self.dtype)
        return tf.ensure_shape(value, self.shape)

    def assign(self, value) -> None:
        with tf.device(self.device):
            tf.raw_ops.AssignVariableOp(
                resource=self.handle, value=tf.convert_to_tensor(value, self.dtype)
            )

    def scatter_update(self, indices, values) -> None:
        """Sets `self[indices] = values` atomically (a rank-1 variable)."""
        with tf.device(self.device):
            tf.raw_ops.ResourceScatterUpdate(
                resource=self.handle,
                indices=tf.constant(indices, tf.int32),
                updates=tf.convert_to_tensor(values, self.dtype),
            )

    def scatter_max(self, indices, values) -> None:
        """Sets `self[i] = max(self[i], value)` atomically (a rank-1 variable)."""
        with tf.device(self.device):
            tf.raw_ops.ResourceScatterMax(
                resource=self.handle,
                indices=tf.constant(indices, tf.int32),
                updates=tf.convert_to_tensor(values, self.dtype),
            )


class ConditionalAccumulator:
    """A `ResourceConditionalAccumulator` on `device`, attached by `shared_name`.

    Kernels exist for the CPU only, and for half, float and double.

    Args:
      shared_name: the name every process uses to reach this accumulator.
      dtype: tf.float16, tf.float32 or tf.float64.
      shape: the gradient shape.
      device: a CPU device, e.g. `/job:ps/replica:0/task:0/device:CPU:0`.
      reduction_type: "SUM" or "MEAN": what `take_grad` returns.
    """

    def __init__(self, shared_name: str, dtype, shape, device: str, reduction_type: str = "SUM"):
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
        self.device = device
        with tf.device(device):
            self.handle = tf.raw_ops.ResourceConditionalAccumulator(
                dtype=dtype,
                shape=self.shape,
                shared_name=shared_name,
                container="",
                reduction_type=reduction_type,
            )

    def apply_grad(self, grad, local_step) -> None:
        """Adds `grad` unless `local_step` is below the accumulator's step."""
        with tf.device(self.device):
            tf.raw_ops.ResourceAccumulatorApplyGradient(
                handle=self.handle,
                local_step=tf.convert_to_tensor(local_step, tf.int64),
                gradient=tf.convert_to_tensor(grad, self.dtype),
            )

    def num_accumulated(self) -> int:
        with tf.device(self.device):
            return int(tf.raw_ops.ResourceAccumulatorNumAccumulated(handle=self.handle).numpy())

    def take_grad(self, num_required: int) -> tf.Tensor:
        """Returns the aggregate and advances the accumulator's global step.

        The op blocks until `num_required` gradients are in; call it only once
        `num_accumulated() >= num_required` (a blocking op holds up this
        process's other ops on the same task).
        """
        with tf.device(self.device):
            value = tf.raw_ops.ResourceAccumulatorTakeGradient(
                handle=self.handle, num_required=num_required, dtype=self.dtype
            )
        return tf.ensure_shape(value, self.shape)

    def set_global_step(self, step) -> None:
        """Sets the accumulator's global step (it never moves backwards)."""
        with tf.device(self.device):
            tf.raw_ops.ResourceAccumulatorSetGlobalStep(
                handle=self.handle, new_global_step=tf.convert_to_tensor(step, tf.int64)
            )
