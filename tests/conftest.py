"""Shared pytest settings for tf_backup's tests."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="module")
def server():
    """An in-process `tf.distribute.Server` (job "localhost"), one per test module."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (after the log level is set)
    return tf.distribute.Server.create_local_server()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cluster: starts a real localhost cluster of TensorFlow processes (~20-40 s)")
    config.addinivalue_line(
        "markers", "slow: long-running; not in the default run (select with -m slow)")
    config.addinivalue_line(
        "markers", "compat: the compatibility subset run on every TensorFlow release (.ci/versions.py)")
