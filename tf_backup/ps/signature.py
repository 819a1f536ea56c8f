"""The chief's signature of one optimizer's shared state: what a task must share with it before it touches anything.

Every variable's shape and dtype, then the wire dtype, as an int64 vector
(`values`). The chief writes it to `<prefix>/signature` on ps 0 with the
state (`SharedState`); a joining worker and a rejoining chief `check` theirs
against it first (invariant 12): the first op on an accumulator creates it and
fixes its shape, so a worker with another model would create them wrong, and a
worker with another `wire_dtype` would fail only later, on TensorFlow's "Trying
to read variable with wrong dtype".
"""

import numpy as np
import tensorflow as tf

from tf_backup.ps.layout import Layout


def values(layout: Layout, wire: tf.DType) -> np.ndarray:
    """[number of variables, then per variable: rank, shape..., dtype enum], then the wire dtype's enum."""
    out = [len(layout.shapes)]
    for shape, dtype in zip(layout.shapes, layout.dtypes):
        out += [len(shape), *shape, dtype.as_datatype_enum]
    return np.asarray(out + [wire.as_datatype_enum], np.int64)


def check(layout: Layout, wire: tf.DType, chief_signature: np.ndarray) -> None:
    """Raises ValueError naming the first thing that differs from the chief's: a variable, their count, or the wire dtype."""
    sig = [int(x) for x in chief_signature]
    chief_vars, pos = [], 1
    for _ in range(sig[0] if sig else 0):
        rank = sig[pos]
        chief_vars.append((tuple(sig[pos + 1:pos + 1 + rank]), tf.as_dtype(sig[pos + 1 + rank])))
        pos += rank + 2
    for i, (name, shape, dtype) in enumerate(zip(layout.names, layout.shapes, layout.dtypes)):
        if i >= len(chief_vars):
            break
        if chief_vars[i] != (shape, dtype):
            raise ValueError(
                f"Trainable variable {i} (`{name}`) is {shape} {dtype.name} on this worker "
                f"but {chief_vars[i][0]} {chief_vars[i][1].name} on the chief: every worker "
                "must build the same model."
            )
    if len(chief_vars) != layout.num_vars:
        raise ValueError(
            f"This worker's model has {layout.num_vars} trainable variables but the "
            f"chief's has {len(chief_vars)}: every worker must build the same model."
        )
    chief_wire = tf.as_dtype(sig[pos])
    if chief_wire != wire:
        raise ValueError(
            f"This task sends {wire.name} over the wire but the chief sends {chief_wire.name}: "
            "give every task the same `wire_dtype` (the binary's --wire_dtype).")
