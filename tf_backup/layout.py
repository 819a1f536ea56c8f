"""How a list of variables maps onto flat shards, one per ps task.

Every variable of one optimizer is flattened into the shard of one ps task,
cast to the shards' common float dtype, so a push, a take and a publish move
one tensor per ps task instead of one per variable.
"""

from typing import List, Sequence

import numpy as np
import tensorflow as tf


def largest_first(sizes: Sequence[int], loads: Sequence[int]) -> List[int]:
    """Where each item goes: largest first, each to the least loaded bin so far.

    Args:
      sizes: the items' sizes.
      loads: the bins' loads before any item (one bin per ps task).

    Returns:
      The bin of each item, in the items' order.
    """
    loads = list(loads)
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        out[i] = loads.index(min(loads))
        loads[out[i]] += sizes[i]
    return out


class Layout:
    """How a list of variables maps onto flat shards, one per ps task.

    Variables go to shards largest first, each to the shard with the fewest
    elements so far; inside a shard they keep their order.
    """

    def __init__(self, variables: Sequence, num_shards: int):
        self.names = [getattr(v, "path", None) or getattr(v, "name", f"variable_{i}")
                      for i, v in enumerate(variables)]
        self.shapes = [tuple(int(d) for d in v.shape) for v in variables]
        self.dtypes = [tf.as_dtype(v.dtype) for v in variables]
        for name, dtype in zip(self.names, self.dtypes):
            if not dtype.is_floating:
                raise TypeError(
                    f"SyncReplicasOptimizer trains floating-point variables. Received "
                    f"variable `{name}` with dtype={dtype.name}"
                )
        self.sizes = [int(np.prod(s)) if s else 1 for s in self.shapes]
        self.dtype = tf.float64 if tf.float64 in self.dtypes else tf.float32
        where = largest_first(self.sizes, [0] * num_shards)
        self.shards = [[i for i, s in enumerate(where) if s == shard] for shard in range(num_shards)]
        self.shard_sizes = [sum(self.sizes[i] for i in members) for members in self.shards]

    @property
    def num_vars(self) -> int:
        return len(self.shapes)

    def signature(self) -> np.ndarray:
        """An int64 vector describing every variable's shape and dtype."""
        out = [len(self.shapes)]
        for shape, dtype in zip(self.shapes, self.dtypes):
            out += [len(shape), *shape, dtype.as_datatype_enum]
        return np.asarray(out, np.int64)

    def check_signature(self, chief_signature: np.ndarray) -> None:
        """Raises ValueError naming the first variable that differs from the chief's."""
        sig = [int(x) for x in chief_signature]
        chief_vars, pos = [], 1
        for _ in range(sig[0] if sig else 0):
            rank = sig[pos]
            chief_vars.append((tuple(sig[pos + 1:pos + 1 + rank]), tf.as_dtype(sig[pos + 1 + rank])))
            pos += rank + 2
        for i, (name, shape, dtype) in enumerate(zip(self.names, self.shapes, self.dtypes)):
            if i >= len(chief_vars):
                break
            if chief_vars[i] != (shape, dtype):
                raise ValueError(
                    f"Trainable variable {i} (`{name}`) is {shape} {dtype.name} on this worker "
                    f"but {chief_vars[i][0]} {chief_vars[i][1].name} on the chief: every worker "
                    "must build the same model."
                )
        if len(chief_vars) != self.num_vars:
            raise ValueError(
                f"This worker's model has {self.num_vars} trainable variables but the "
                f"chief's has {len(chief_vars)}: every worker must build the same model."
            )

    def pack(self, tensors: Sequence) -> List[tf.Tensor]:
        """Flattens per-variable tensors into one tensor per shard (graph ops)."""
        flats = []
        for members in self.shards:
            parts = [tf.reshape(tf.cast(tensors[i], self.dtype), [-1]) for i in members]
            flats.append(tf.concat(parts, 0) if parts else tf.zeros([0], self.dtype))
        return flats

    def unpack(self, flats: Sequence) -> List[tf.Tensor]:
        """The inverse of `pack`: per-variable tensors in the variables' dtypes."""
        out = [None] * self.num_vars
        for members, flat in zip(self.shards, flats):
            offset = 0
            for i in members:
                piece = flat[offset:offset + self.sizes[i]]
                out[i] = tf.cast(tf.reshape(piece, self.shapes[i]), self.dtypes[i])
                offset += self.sizes[i]
        return out
