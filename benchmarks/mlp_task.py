"""The task of the overhead, trade-off and memory benchmarks' workers: a Keras MLP on random data.

A 40-h-...-h-10 classifier (`build_mlp`), sized by its parameter count (`hidden_for_params`), and
each worker's own fixed random rows (`random_data`).
"""

import math
from typing import List

import numpy as np


INPUT_DIM = 40
CLASSES = 10


def hidden_for_params(params: float, depth: int = 2) -> int:
    """Width h of a 40-h-...-h-10 MLP (`depth` hidden layers) with about `params` parameters."""
    # params = (40 + 1) h + (depth - 1) (h + 1) h + (h + 1) 10 = (depth - 1) h^2 + (50 + depth) h + 10
    a, b = depth - 1, 50 + depth
    if a == 0:
        return max(2, int(round((params - 10) / b)))
    return max(2, int(round((-b + math.sqrt(b ** 2 + 4 * a * (params - 10))) / (2 * a))))


def mlp_params(hidden: int, depth: int = 2) -> int:
    return (depth - 1) * hidden * hidden + (50 + depth) * hidden + 10


def mlp_variable_sizes(hidden: int, depth: int = 2) -> List[int]:
    """The sizes of `build_mlp`'s trainable variables, in its order (kernel, bias per layer)."""
    out = [INPUT_DIM * hidden, hidden]
    for _ in range(depth - 1):
        out += [hidden * hidden, hidden]
    return out + [hidden * CLASSES, CLASSES]


def build_mlp(keras, hidden: int, seed: int = 0, depth: int = 2):
    """A 40-h-...-h-10 classifier with `depth` hidden ReLU layers of width h."""
    init = keras.initializers.GlorotUniform(seed=seed)
    return keras.Sequential(
        [keras.Input((INPUT_DIM,))]
        + [keras.layers.Dense(hidden, activation="relu", kernel_initializer=init) for _ in range(depth)]
        + [keras.layers.Dense(CLASSES, activation="softmax", kernel_initializer=init)])


def random_data(worker: int, rows: int = 1024):
    rng = np.random.default_rng(1000 + worker)
    x = rng.normal(size=(rows, INPUT_DIM)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=rows).astype(np.int32)
    return x, y
