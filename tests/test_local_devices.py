"""Multi-device workers: one replica per local device, one contribution per host."""

import keras
import numpy as np
import pytest

import tf_backup
from tf_backup.frontend import local_devices
import programs.common
import programs.placement


def test_resolve_devices_defaults_to_the_local_devices():
    assert local_devices.resolve_devices(None) == ("/device:CPU:0",)
    assert local_devices.resolve_devices(["/cpu:0"]) == ("/device:CPU:0",)


@pytest.mark.parametrize("devices, error, words", [
    ("/device:CPU:0", TypeError, "devices='/device:CPU:0'"),
    ([0], TypeError, "devices=[0]"),
    ([], ValueError, "devices=[]"),
    (["/device:CPU:7"], ValueError, "'/device:CPU:7', which this process does not have"),
    (["/job:worker/task:1/device:CPU:0"], ValueError, "other hosts are other workers"),
    (["/device:CPU:0", "/cpu:0"], ValueError, "duplicates"),
])
def test_resolve_devices_rejects_bad_lists(devices, error, words):
    with pytest.raises(error, match="devices") as info:
        local_devices.resolve_devices(devices)
    assert words in str(info.value)


@pytest.mark.cluster
def test_2_workers_x_2_devices_equal_4_single_device_workers():
    """b = 0: the same 16 rows per step, averaged as 2 hosts x 2 replicas or as 4 workers."""
    steps = 5
    multi = tf_backup.launch_local(programs.placement.train_regression_on_local_devices, num_workers=2,
                                   kwargs=dict(steps=steps, local_devices=2), timeout=240)
    single = tf_backup.launch_local(programs.placement.train_regression_on_local_devices, num_workers=4,
                                    kwargs=dict(steps=steps, local_devices=1), timeout=240)
    # Large-batch SGD on batches 4k..4k+3 (rows 16k..16k+15) at step k.
    expected = programs.common.reference_fit(keras.optimizers.SGD(0.1), lambda k: [4 * k + i for i in range(4)],
                                             steps, 4)
    for worker in multi + single:
        for got, want, single_got in zip(worker["weights"], expected, single[0]["weights"]):
            np.testing.assert_allclose(got, want, atol=1e-5)
            np.testing.assert_allclose(got, single_got, atol=1e-5)
    for worker in multi:
        assert worker["num_replicas_in_sync"] == 2
        # One contribution per host per step, and both replicas of a host hold the same values.
        assert worker["stats"] == {"global_step": steps, "pushed": [steps] * 2, "taken": [steps] * 2,
                                   "dropped": [0] * 2, "cancelled": [0] * 2, "batches": [steps] * 2}
        assert worker["history"]["fresh_gradients"] == [2.0]
        for copies in worker["per_device"]:
            assert len(copies) == 2
            np.testing.assert_array_equal(copies[0], copies[1])
    assert multi[0]["contributions"] == [[1, 1]] * steps
    assert single[0]["contributions"] == [[1, 1, 1, 1]] * steps
    assert single[0]["num_replicas_in_sync"] == 1
    assert abs(float(multi[0]["weights"][0][0, 0])) > 0.1  # it trained


def test_a_worker_of_several_tpu_hosts_is_refused_naming_the_setting(monkeypatch):
    # No TPU here: the host is made to report one, to check the refusal before any TPU is touched.
    monkeypatch.setattr(local_devices.tf.config, "list_physical_devices",
                        lambda kind=None: ["TPU:0"] if kind == "TPU" else [])

    class PodResolver:  # what topology.with_ps(..., hosts_per_worker=4) returns, as far as this reads
        hosts_per_worker = 4

    with pytest.raises(NotImplementedError, match="group of 4 TPU hosts.*hosts_per_worker=1"):
        local_devices.local_tpu(PodResolver())


def test_a_host_without_tpu_devices_has_no_local_tpu():
    assert local_devices.local_tpu(None) is None
