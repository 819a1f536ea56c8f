"""Models of the training configs: one builder per `model.kind`."""

from typing import Sequence

import keras

KINDS = ("linear", "mlp", "cnn")


def build(kind: str, input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (100, 100),
          filters: Sequence[int] = (32, 32, 32), seed: int = 0) -> keras.Model:
    """Builds an uncompiled model.

    Args:
      kind: "linear" (regression, `num_classes` must be 0), "mlp" (dense ReLU
        layers of `hidden` units) or "cnn" (ReLU convolutions of `filters`;
        1-D inputs get Conv1D, images Conv2D; then global average pooling).
      input_shape: one example's shape, without the batch.
      num_classes: classes of the softmax output; 0 for one regression output.
      seed: seed of the initializers, so every worker builds the same weights.

    Raises:
      ValueError: an unknown kind, or a classifier kind with `num_classes` < 2.
    """
    if kind not in KINDS:
        raise ValueError(f"`model.kind` must be one of {', '.join(KINDS)}. Received kind={kind!r}")
    if kind != "linear" and num_classes < 2:
        raise ValueError(f"A {kind} classifier needs num_classes >= 2. Received num_classes={num_classes}")
    init = lambda i: keras.initializers.GlorotUniform(seed=seed + i)  # pylint: disable=unnecessary-lambda-assignment
    inputs = keras.Input(tuple(input_shape))
    x = inputs
    if kind == "linear":
        outputs = keras.layers.Dense(max(num_classes, 1), kernel_initializer="zeros")(x)
        return keras.Model(inputs, outputs, name="linear")
    if kind == "mlp":
        x = keras.layers.Flatten()(x)
        for i, units in enumerate(hidden):
            x = keras.layers.Dense(units, activation="relu", kernel_initializer=init(i))(x)
    else:
        conv = keras.layers.Conv1D if len(input_shape) == 1 else keras.layers.Conv2D
        if len(input_shape) == 1:
            x = keras.layers.Reshape((input_shape[0], 1))(x)
        for i, f in enumerate(filters):
            x = conv(f, 5 if len(input_shape) == 1 else 3, strides=2 if i else 1, padding="same",
                     activation="relu", kernel_initializer=init(i))(x)
        # 1-D signals keep where a feature is (MNIST-1D's reference CNN flattens); images pool.
        x = keras.layers.Flatten()(x) if len(input_shape) == 1 else keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=init(99))(x)
    return keras.Model(inputs, outputs, name=kind)
