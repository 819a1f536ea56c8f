"""The trainers' data layer: the MNIST-1D port and `trainers.data.load`.

The port is checked through facts of MNIST-1D and of the scipy routines it
replaces (no stored checksum); the tfds datasets through
`tfds.testing.mock_data`, and their offline failure with the network blocked.
"""

import socket
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from trainers import data
from trainers import mnist1d


@pytest.fixture(scope="module")
def mnist1d_default():
    return mnist1d.make_dataset()


def batches(ds):
    """All (x, y) batches of a finite dataset as numpy arrays."""
    return [(x.numpy(), y.numpy()) for x, y in ds]


def concat(ds):
    parts = batches(ds)
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


# --- trainers/mnist1d.py --------------------------------------------------------------------------

def test_mnist1d_shapes_classes_and_balance(mnist1d_default):
    d = mnist1d_default
    assert d["x"].shape == (4000, 40) and d["x_test"].shape == (1000, 40)
    assert d["y"].shape == (4000,) and d["y_test"].shape == (1000,)
    assert d["t"].shape == (40,)
    assert d["x"].dtype == np.float64 and d["y"].dtype == np.int64
    assert set(d["templates"]) == {"x", "t", "y"} and d["templates"]["x"].shape == (10, 12)
    # 500 signals per class, shuffled before the 80/20 split.
    all_y = np.concatenate([d["y"], d["y_test"]])
    np.testing.assert_array_equal(np.bincount(all_y), [500] * 10)
    assert np.bincount(d["y"], minlength=10).min() > 350 and np.bincount(d["y_test"], minlength=10).min() > 70
    # The whole dataset is centred and has standard deviation 1.
    all_x = np.concatenate([d["x"], d["x_test"]])
    assert abs(all_x.mean()) < 1e-12 and abs(all_x.std() - 1) < 1e-12
    # No two signals alike: every one has its own noise.
    assert len(np.unique(all_x.round(6), axis=0)) == 5000


def test_mnist1d_templates_start_at_zero():
    templates = mnist1d.get_templates()
    np.testing.assert_array_equal(templates["x"][:, 0], np.zeros(10))
    np.testing.assert_array_equal(templates["y"], np.arange(10))
    np.testing.assert_allclose(templates["t"], np.linspace(-5, 5, 12) / 6)


def test_mnist1d_is_deterministic_and_leaves_global_rng_alone():
    # (test_mnist1d_batches also compares two independent default generations.)
    state = np.random.get_state()
    first = mnist1d.make_dataset(500, seed=42)
    assert np.array_equal(np.random.get_state()[1], state[1])
    again = mnist1d.make_dataset(500, seed=42)
    for key in ("x", "y", "x_test", "y_test", "t"):
        np.testing.assert_array_equal(again[key], first[key])
    other = mnist1d.make_dataset(500, seed=43)
    assert np.abs(other["x"] - first["x"]).max() > 1
    assert not np.array_equal(other["y"], first["y"])


def test_mnist1d_arguments():
    small = mnist1d.make_dataset(100, train_split=0.5, seed=1, final_seq_length=20)
    assert small["x"].shape == (50, 20) and small["x_test"].shape == (50, 20)
    np.testing.assert_array_equal(np.bincount(np.concatenate([small["y"], small["y_test"]])), [10] * 10)
    with pytest.raises(ValueError, match="num_samples=5"):
        mnist1d.make_dataset(5)
    with pytest.raises(ValueError, match="train_split=1.5"):
        mnist1d.make_dataset(train_split=1.5)


def test_interpolate_is_linear_resampling():
    # interp1d(kind="linear") keeps the ends and is exact on a straight line.
    x = np.linspace(2.0, -3.0, 72)
    np.testing.assert_allclose(mnist1d._interpolate(x, 40), np.linspace(2.0, -3.0, 40), atol=1e-12)
    np.testing.assert_array_equal(mnist1d._interpolate(np.asarray([0.0, 1.0, 0.0]), 5), [0, 0.5, 1, 0.5, 0])
    zeros_kept = mnist1d._interpolate(np.concatenate([np.ones(12), np.zeros(60)]), 72)
    assert np.all(zeros_kept[13:] == 0)  # the transform's noise mask relies on exact zeros


def test_gaussian_filter_matches_scipy_definition():
    # sigma 2, truncated at 4 sigma (radius 8), weights sum to 1.
    impulse = np.zeros(41)
    impulse[20] = 1.0
    out = mnist1d._gaussian_filter(impulse, 2)
    offsets = np.arange(-8, 9)
    weights = np.exp(-offsets**2 / 8.0)
    np.testing.assert_allclose(out[12:29], weights / weights.sum(), atol=1e-15)
    assert np.all(out[:12] == 0) and np.all(out[29:] == 0)
    # mode="reflect" (half-sample symmetric): a constant stays constant, an edge impulse keeps its mass.
    np.testing.assert_allclose(mnist1d._gaussian_filter(np.full(72, 3.0), 2), np.full(72, 3.0), atol=1e-14)
    edge = np.zeros(30)
    edge[0] = 1.0
    assert abs(mnist1d._gaussian_filter(edge, 2).sum() - 1) < 1e-14


# --- trainers/data.py: mnist1d and regression -----------------------------------------------------

def test_mnist1d_batches(mnist1d_default):
    ds, info = data.load("mnist1d", split="train", batch_size=128)
    assert info == data.DatasetInfo("mnist1d", (40,), 10, 4000, 1000, info.reference)
    assert "MNIST-1D" in info.reference and "Greydanus 2020" in info.reference
    assert ds.element_spec == (tf.TensorSpec((None, 40), tf.float32), tf.TensorSpec((None,), tf.int32))
    parts = batches(ds)
    assert [len(y) for _, y in parts] == [128] * 31 + [32]
    x, y = concat(ds)
    np.testing.assert_array_equal(x, mnist1d_default["x"].astype(np.float32))
    np.testing.assert_array_equal(y, mnist1d_default["y"])
    x_test, y_test = concat(data.load("mnist1d", split="test", batch_size=256)[0])
    np.testing.assert_array_equal(x_test, mnist1d_default["x_test"].astype(np.float32))
    np.testing.assert_array_equal(y_test, mnist1d_default["y_test"])


def test_two_shards_are_disjoint_and_cover_the_training_set(mnist1d_default):
    shards = [concat(data.load("mnist1d", split="train", batch_size=64, num_shards=2, shard_index=i,
                               shuffle_seed=7 + i)[0]) for i in range(2)]
    assert [len(y) for _, y in shards] == [2000, 2000]
    rows = [{row.tobytes() for row in x} for x, _ in shards]
    assert len(rows[0]) == len(rows[1]) == 2000
    assert not rows[0] & rows[1]
    full = {row.tobytes() for row in mnist1d_default["x"].astype(np.float32)}
    assert rows[0] | rows[1] == full
    # Each label stays with its signal through sharding and shuffling.
    label_of = {row.tobytes(): label for row, label in zip(mnist1d_default["x"].astype(np.float32),
                                                           mnist1d_default["y"])}
    for x, y in shards:
        assert all(label_of[row.tobytes()] == label for row, label in zip(x, y))


def test_shuffle_seed_and_repeat():
    def first_batches(seed, n=3):
        ds, _ = data.load("mnist1d", split="train", batch_size=50, num_shards=2, shard_index=1,
                          shuffle_seed=seed, repeat=True)
        return [y.numpy() for _, y in ds.take(n)]

    np.testing.assert_array_equal(first_batches(1), first_batches(1))
    assert not np.array_equal(first_batches(1)[0], first_batches(2)[0])
    unshuffled = concat(data.load("mnist1d", split="train", batch_size=50, num_shards=2, shard_index=1)[0])[1]
    assert not np.array_equal(np.concatenate(first_batches(1, 40)), unshuffled)  # 40 x 50 = one shard
    np.testing.assert_array_equal(np.sort(np.concatenate(first_batches(1, 40))), np.sort(unshuffled))
    # Repeated: batches never run out and are all full (drop_remainder), past the 2000-example shard.
    ds, _ = data.load("mnist1d", split="train", batch_size=300, num_shards=2, shard_index=0, repeat=True)
    assert ds.element_spec[0].shape == (300, 40)
    assert [len(y) for _, y in ds.take(10)] == [300] * 10


def test_regression():
    ds, info = data.load("regression", split="train", batch_size=1024)
    assert info.num_classes == 0 and info.input_shape == (3,) and info.num_train == 1024
    (x, y), = batches(ds)
    assert x.dtype == np.float32 and y.dtype == np.float32 and x.shape == (1024, 3) and y.shape == (1024,)
    residual = y - (x @ np.asarray([1.0, -2.0, 3.0]) + 0.5)
    assert abs(residual.std() - 0.1) < 0.01 and abs(residual.mean()) < 0.02
    x_test, _ = concat(data.load("regression", split="test", batch_size=100)[0])
    assert x_test.shape == (256, 3) and not np.isin(x_test[:, 0], x[:, 0]).any()


# --- trainers/data.py: tensorflow-datasets --------------------------------------------------------

@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_datasets_are_scaled_and_sharded(name, shape, tmp_path):
    with tfds.testing.mock_data(num_examples=20):
        ds, info = data.load(name, split="train", batch_size=8, data_dir=str(tmp_path))
        x, y = concat(ds)
        shard_sizes = [len(concat(data.load(name, split="train", batch_size=8, num_shards=2, shard_index=i,
                                            shuffle_seed=0, data_dir=str(tmp_path))[0])[1]) for i in range(2)]
        test_ds, _ = data.load(name, split="test", batch_size=8, repeat=True, data_dir=str(tmp_path))
        test_x, _ = next(iter(test_ds))
    assert info.input_shape == shape and info.num_classes == 10 and info.num_test == 10000
    assert ds.element_spec == (tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int32))
    assert x.shape == (20, *shape) and x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.5  # uint8 / 255
    assert np.all((x * 255).round() == x * 255)
    assert y.min() >= 0 and y.max() < 10
    assert shard_sizes == [10, 10]
    assert test_x.shape == (8, *shape)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network (sockets, tfds downloads, GCS) fails at once."""

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)
    monkeypatch.setattr(tfds.core.utils.gcs_utils, "exists", refuse)
    monkeypatch.setattr(tfds.core.download.DownloadManager, "download", refuse)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_unprepared_tfds_dataset_fails_fast_without_download(name, tmp_path, no_network):
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError) as raised:
        data.load(name, split="train", batch_size=32, data_dir=str(tmp_path))
    assert time.monotonic() - start < 30
    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert repr(name) in message and str(tmp_path) in message
    assert "download" in message and "--data_dir" in message and "mnist1d" in message
    assert list(tmp_path.iterdir()) == []  # nothing was written


# --- bad arguments --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(name="imagenet"), "name='imagenet'.*mnist1d, mnist, cifar10, regression"),
    (dict(split="validation"), "split='validation'"),
    (dict(batch_size=0), "`batch_size`.*batch_size=0"),
    (dict(batch_size=True), "batch_size=True"),
    (dict(batch_size=2.5), "batch_size=2.5"),
    (dict(num_shards=0), "`num_shards`.*num_shards=0"),
    (dict(num_shards=5000), "`num_shards`.*num_shards=5000"),
    (dict(num_shards=2, shard_index=2), "`shard_index`.*shard_index=2"),
    (dict(shard_index=-1), "`shard_index`.*shard_index=-1"),
    (dict(shard_index="0"), "shard_index='0'"),
    (dict(shuffle_seed=1.0), "`shuffle_seed`.*shuffle_seed=1.0"),
])
def test_bad_arguments_name_the_argument_and_value(kwargs, message):
    args = dict(name="mnist1d", split="train", batch_size=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        data.load(args.pop("name"), **args)


# --- the offline default trains -------------------------------------------------------------------

def test_mlp_learns_mnist1d():
    """An MLP of 2 x 100 ReLU units (Adam 1e-2, 15 epochs, batch 100): the published MLP gets ~68%."""
    keras.utils.set_random_seed(0)
    train, info = data.load("mnist1d", split="train", batch_size=100, shuffle_seed=0)
    test, _ = data.load("mnist1d", split="test", batch_size=1000)
    model = keras.Sequential([
        keras.Input(info.input_shape),
        keras.layers.Dense(100, activation="relu"),
        keras.layers.Dense(100, activation="relu"),
        keras.layers.Dense(info.num_classes, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(train, epochs=15, shuffle=False, verbose=0)  # the dataset shuffles
    accuracy = model.evaluate(test, verbose=0, return_dict=True)["accuracy"]
    assert accuracy > 0.55
