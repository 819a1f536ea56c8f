"""Shared pytest settings for tf_backup's tests."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="module")
def server():
    """An in-process `tf.distribute.Server` (job "localhost"), one per test module."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (after the log level is set)
    return tf.distribute.Server.create_local_server()


@pytest.fixture(scope="session")
def shared_launch():
    """`launch_local` whose results are shared by the tests that start the same cluster: one run a session.

    `shared_launch(fn, **launch_kwargs)`. Two calls are the same run when `fn`, the launch arguments and
    `fn`'s keyword arguments with its defaults filled in are equal. Each caller gets its own copy.
    """
    import copy  # pylint: disable=g-import-not-at-top
    import inspect  # pylint: disable=g-import-not-at-top
    import tf_backup  # pylint: disable=g-import-not-at-top  (after the log level is set)

    runs = {}

    def launch(fn, **launch_kwargs):
        bound = inspect.signature(fn).bind(*launch_kwargs.get("args", ()), **launch_kwargs.get("kwargs", {}))
        bound.apply_defaults()
        others = {k: v for k, v in launch_kwargs.items() if k not in ("args", "kwargs")}
        key = (fn.__module__, fn.__qualname__, repr(sorted(bound.arguments.items())), repr(sorted(others.items())))
        if key not in runs:
            runs[key] = tf_backup.launch_local(fn, **launch_kwargs)
        return copy.deepcopy(runs[key])

    return launch


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cluster: starts a real localhost cluster of TensorFlow processes (~20-40 s)")
    config.addinivalue_line(
        "markers", "slow: long-running; not in the default run (select with -m slow)")
    config.addinivalue_line(
        "markers", "compat: the compatibility subset run on every TensorFlow release (.ci/versions.py)")
