"""How a list of variables maps onto flat shards, one per ps task.

Every variable of one optimizer is flattened and cast to the shards' common
float dtype; the concatenation of all of them is cut into one contiguous shard
per ps task, of equal sizes (within one element) whatever the variables'
boundaries: one big matrix is spread over every ps task, so each task's link
carries 1/P of every push, take, publish and pull (issue 31; before, whole
variables went to one task each, and a model that is one big matrix used one).
A push, a take and a publish move one tensor per ps task.
"""

from typing import Any, Callable, List, Optional, Sequence

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


def even_sizes(total: int, num_shards: int) -> List[int]:
    """`total` elements cut into `num_shards` contiguous parts, the first `total % num_shards` one larger."""
    base, extra = divmod(total, num_shards)
    return [base + (1 if s < extra else 0) for s in range(num_shards)]


class Layout:
    """How a list of variables maps onto flat shards, one per ps task.

    The variables, flattened in their order, are concatenated and cut into
    `num_shards` contiguous shards of equal size (`even_sizes`). `shards[s]`
    lists the variables with elements in shard s (a large one can span several).
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
        self.shard_sizes = even_sizes(sum(self.sizes), num_shards)
        starts = np.cumsum([0] + self.sizes)  # where each variable begins in the concatenation
        bounds = np.cumsum([0] + self.shard_sizes)
        self.shards = [[i for i in range(len(self.sizes)) if self.sizes[i] and starts[i] < bounds[s + 1]
                        and starts[i + 1] > bounds[s]] for s in range(num_shards)]
        # Per shard, its variables' pieces in order: (variable, first element in it, elements).
        self.pieces = [[(i, int(max(starts[i], bounds[s]) - starts[i]),
                         int(min(starts[i + 1], bounds[s + 1]) - max(starts[i], bounds[s])))
                        for i in self.shards[s]] for s in range(num_shards)]

    @property
    def num_vars(self) -> int:
        return len(self.shapes)

    def pack(self, tensors: Sequence, tail: Optional[Callable[[List[tf.Tensor]], tf.Tensor]] = None) -> List[tf.Tensor]:
        """Flattens per-variable tensors into one tensor per shard (graph ops).

        `tail(parts)`, if given, makes a tensor from a shard's parts that goes at
        its end, in the same concatenation (a push's norm and one-hot).

        Each shard is one concatenation of its variables' pieces: no tensor of
        the whole model is made. At 1e7 parameters one would be 40 MB, past
        glibc's mmap threshold (32 MiB at most), so every step would map it
        fresh, fault it in page by page and unmap it: a profile of a worker
        at 1e7 parameters and 4 ps tasks spent 41% of its CPU in page faults,
        most of them in the whole-model concatenation and its split
        (docs/performance.md, "Where a worker's CPU went").
        """
        flat = [tf.reshape(tf.cast(t, self.dtype), [-1]) for t in tensors]
        out = []
        for pieces in self.pieces:
            parts = [flat[i] if n == self.sizes[i] else tf.slice(flat[i], [begin], [n]) for i, begin, n in pieces]
            if tail is not None:
                parts = parts + [tail(parts or [tf.zeros([0], self.dtype)])]
            out.append(_concat(parts, self.dtype))
        return out

    def unpack(self, flats: Sequence) -> List[tf.Tensor]:
        """The inverse of `pack`: per-variable tensors in the variables' dtypes (no whole-model tensor either)."""
        flats = [tf.convert_to_tensor(f) for f in flats]
        parts = self._cut(lambda s, at, n: flats[s] if at == 0 and n == self.shard_sizes[s]
                          else tf.slice(flats[s], [at], [n]))
        return [tf.cast(tf.reshape(_concat(p, flats[0].dtype if flats else self.dtype), shape), dtype)
                for p, shape, dtype in zip(parts, self.shapes, self.dtypes)]

    def unpack_arrays(self, flats: Sequence) -> List[np.ndarray]:
        """`unpack` in numpy, in the flats' dtype: views of them, copied only where a variable spans two shards.

        A step's pull returns these from its py_function: the graph then assigns each to its
        variable, instead of cutting the flat shards into the variables' pieces with slices that
        each copy (`benchmarks/pull_unpack.py`: at 1e7 parameters in 4 shards, 16 ms of CPU a step
        for the py_function's results and the assignments, against 22 ms).
        """
        flats = [np.asarray(f) for f in flats]
        parts = self._cut(lambda s, at, n: flats[s][at:at + n])
        dtype = flats[0].dtype if flats else self.dtype.as_numpy_dtype
        return [(np.zeros([0], dtype) if not p else p[0] if len(p) == 1 else np.concatenate(p)).reshape(shape)
                for p, shape in zip(parts, self.shapes)]

    def _cut(self, piece: Callable[[int, int, int], Any]) -> List[List[Any]]:
        """Per variable, its pieces in order: `piece(s, at, n)`, the n elements of shard s from `at`."""
        parts: List[List[Any]] = [[] for _ in self.sizes]
        for s, pieces in enumerate(self.pieces):
            at = 0  # where the next piece begins in shard s
            for i, _, n in pieces:
                parts[i].append(piece(s, at, n))
                at += n
        return parts


def _concat(parts: List[tf.Tensor], dtype) -> tf.Tensor:
    """One tensor of `parts` in order: the part itself if there is one (no copy)."""
    if not parts:
        return tf.zeros([0], dtype)
    return parts[0] if len(parts) == 1 else tf.concat(parts, 0)
