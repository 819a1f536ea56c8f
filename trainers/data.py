"""The trainers' datasets, each as a `tf.data` pipeline of (features, labels) batches.

  train, info = data.load("mnist1d", split="train", batch_size=32, num_shards=4, shard_index=w,
                          shuffle_seed=seed + w, repeat=True)
  test, _ = data.load("mnist1d", split="test", batch_size=256)

Datasets:
  mnist1d: MNIST-1D (Greydanus 2020), generated offline by `trainers.mnist1d`
    with its default arguments and seed 42: 4000 + 1000 signals of 40 points.
    The default: needs no download.
  mnist, cifar10: from tensorflow-datasets; they need a prepared copy (a
    download by `tfds.load` on a machine with network, then `data_dir`).
    Images are scaled to float32 in [0, 1].
  regression: a tiny linear regression for tests, y = x @ [1, -2, 3] + 0.5 +
    N(0, 0.1^2) with x ~ N(0, 1)^3 (fixed seed); `num_classes` is 0.

Features are float32; labels are int32 class indices (float32 targets for
`regression`). Every worker reads its own shard: `ds.shard(num_shards,
shard_index)` comes before shuffling and batching.
"""

import dataclasses
import functools
import os
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

DATASETS = ("mnist1d", "mnist", "cifar10", "regression")
SPLITS = ("train", "test")
_TFDS_DATASETS = ("mnist", "cifar10")
_SHUFFLE_BUFFER = 10_000

_REGRESSION_WEIGHTS = (1.0, -2.0, 3.0)
_REGRESSION_BIAS = 0.5
_REGRESSION_NOISE = 0.1
_REGRESSION_SIZES = {"train": 1024, "test": 256}


class DatasetUnavailableError(ValueError):
    """A tensorflow-datasets dataset has no prepared copy in the data directory."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training schedule need to know about a dataset.

    Attributes:
      name: the name given to `load`.
      input_shape: one example's feature shape, without the batch.
      num_classes: classes of the labels; 0 for regression (float targets).
      num_train: examples of the whole training split (all shards together).
      num_test: examples of the whole test split.
      reference: one line of published results to compare with.
    """

    name: str
    input_shape: Tuple[int, ...]
    num_classes: int
    num_train: int
    num_test: int
    reference: str


_INFOS = {
    "mnist1d": DatasetInfo("mnist1d", (40,), 10, 4000, 1000,
                           "MNIST-1D: MLP ~68%, CNN ~94% test accuracy (Greydanus 2020)"),
    "mnist": DatasetInfo("mnist", (28, 28, 1), 10, 60000, 10000,
                         "MNIST: MLP ~98%, LeNet-5 99.05% test accuracy (LeCun et al. 1998)"),
    "cifar10": DatasetInfo("cifar10", (32, 32, 3), 10, 50000, 10000,
                           "CIFAR-10: ResNet-20 91.25% test accuracy (He et al. 2016); small CNNs ~70-80%"),
    "regression": DatasetInfo("regression", (3,), 0, _REGRESSION_SIZES["train"], _REGRESSION_SIZES["test"],
                              "regression: y = x @ [1, -2, 3] + 0.5 + N(0, 0.1^2); the best test MSE is ~0.01"),
}


def load(name: str, *, split: str, batch_size: int, num_shards: int = 1, shard_index: int = 0,
         shuffle_seed: Optional[int] = None, repeat: bool = False,
         data_dir: Optional[str] = None) -> Tuple[tf.data.Dataset, DatasetInfo]:
    """Builds one worker's input pipeline: shard, shuffle, repeat, batch, prefetch.

    Args:
      name: one of `DATASETS`.
      split: "train" or "test".
      batch_size: examples per batch. Without `repeat` the last batch of an
        epoch may be smaller; with `repeat` every batch is full.
      num_shards: workers that share the split; each reads 1/`num_shards` of it.
        Leave 1 to read the whole split (e.g. the test split on the chief).
      shard_index: this worker's shard, in [0, `num_shards`).
      shuffle_seed: shuffles the shard (reshuffled every epoch, deterministically
        for a given seed); None reads it in its stored order.
      repeat: repeat the shard indefinitely (training with `steps_per_epoch`).
      data_dir: the tensorflow-datasets directory of a prepared copy (mnist,
        cifar10); None: tfds' default (~/tensorflow_datasets or $TFDS_DATA_DIR).

    Returns:
      (dataset of (features, labels) batches, the dataset's `DatasetInfo`).

    Raises:
      ValueError: an unknown `name` or `split`, a `batch_size` that is not a
        positive integer, or `num_shards`/`shard_index` out of range.
      DatasetUnavailableError: (a ValueError) mnist or cifar10 has no prepared
        copy in `data_dir`. Nothing is downloaded.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset: name={name!r}. Known datasets: {', '.join(DATASETS)} "
                         "(mnist1d needs no download).")
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {', '.join(SPLITS)}. Received: split={split!r}")
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("num_shards", num_shards)
    if not _is_int(shard_index) or not 0 <= shard_index < num_shards:
        raise ValueError(f"`shard_index` must be an integer in [0, num_shards={num_shards}). "
                         f"Received: shard_index={shard_index!r}")
    if shuffle_seed is not None and not _is_int(shuffle_seed):
        raise ValueError(f"`shuffle_seed` must be None or an integer. Received: shuffle_seed={shuffle_seed!r}")
    info = _INFOS[name]
    num_examples = info.num_train if split == "train" else info.num_test
    if num_shards > num_examples:
        raise ValueError(f"`num_shards` must be at most the {num_examples} examples of {name}/{split}, "
                         f"or some shard would be empty. Received: num_shards={num_shards}")

    if name in _TFDS_DATASETS:
        ds = _tfds_dataset(name, split, data_dir)
    else:
        arrays = _mnist1d_arrays() if name == "mnist1d" else _regression_arrays()
        ds = tf.data.Dataset.from_tensor_slices(arrays[split])
    ds = ds.shard(num_shards, shard_index)
    if name in _TFDS_DATASETS:
        ds = ds.cache().map(_scale_image, num_parallel_calls=tf.data.AUTOTUNE)
    if shuffle_seed is not None:
        ds = ds.shuffle(_SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=repeat).prefetch(tf.data.AUTOTUNE)
    return ds, info


def arrays(name: str, *, split: str, data_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """A whole split as numpy (features, labels), in its stored order (for in-process simulations)."""
    ds, _ = load(name, split=split, batch_size=4096, data_dir=data_dir)
    batches = [(x.numpy(), y.numpy()) for x, y in ds]
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_positive_int(argument: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"`{argument}` must be a positive integer. Received: {argument}={value!r}")


def _scale_image(image: tf.Tensor, label: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int32)


def _tfds_dataset(name: str, split: str, data_dir: Optional[str]) -> tf.data.Dataset:
    """The prepared tfds split of (uint8 image, int64 label), in file order; never downloads."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow; only for these)

    data_dir = os.path.expanduser(data_dir) if data_dir else None
    builder = tfds.builder(name, data_dir=data_dir)
    try:
        # `as_dataset` reads a prepared copy or fails at once; unlike `tfds.load(download=True)`
        # it never calls `download_and_prepare`, so nothing reaches for the network.
        return builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    except AssertionError as e:  # tfds' "Dataset mnist: could not find data in ..."
        raise DatasetUnavailableError(
            f"Dataset {name!r} is not prepared in data_dir={builder.data_dir_root}: it needs a download. "
            f"Run `tfds.load({name!r})` once on a machine with network and pass that directory as "
            f"--data_dir, or use the offline default dataset 'mnist1d' (no download).") from e


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """MNIST-1D generated once per process (~1.5 s), as read-only float32/int32 arrays."""
    from trainers import mnist1d  # pylint: disable=g-import-not-at-top

    data = mnist1d.make_dataset()
    return {"train": _frozen(data["x"], data["y"]), "test": _frozen(data["x_test"], data["y_test"])}


@functools.lru_cache(maxsize=1)
def _regression_arrays() -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    rng = np.random.RandomState(0)
    arrays = {}
    for split in SPLITS:
        x = rng.randn(_REGRESSION_SIZES[split], 3)
        y = x @ np.asarray(_REGRESSION_WEIGHTS) + _REGRESSION_BIAS + _REGRESSION_NOISE * rng.randn(len(x))
        arrays[split] = _frozen(x, y, label_dtype=np.float32)
    return arrays


def _frozen(x: np.ndarray, y: np.ndarray, label_dtype=np.int32) -> Tuple[np.ndarray, np.ndarray]:
    """float32 features and `label_dtype` labels, read-only (they are cached for the process)."""
    x, y = x.astype(np.float32), y.astype(label_dtype)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y
