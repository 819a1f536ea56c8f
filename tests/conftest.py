"""Shared pytest settings for tf_backup's tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cluster: starts a real localhost cluster of TensorFlow processes (~20-40 s)")
    config.addinivalue_line(
        "markers", "slow: long-running; not in the default run (select with -m slow)")
