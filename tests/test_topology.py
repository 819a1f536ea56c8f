"""TPU pods: the mapping from a TPU cluster resolver to tf_backup's workers (no TPU needed)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_backup
from tf_backup import topology
import programs.common
import programs.placement


HOSTS = [f"10.0.0.{i}:8470" for i in range(8)]  # a pod of 8 TPU hosts, 4 cores each
PS = ["10.0.1.0:2222", "10.0.1.1:2222"]


def tpu_resolver(task_type="worker", task_id=0, hosts=HOSTS, cores=4):
    """What a TPUClusterResolver reports: a `worker` job of TPU hosts and TPU cores per host."""
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": hosts}), task_type=task_type, task_id=task_id,
        num_accelerators={"TPU": cores})


def test_each_host_is_a_worker_by_default():
    t = topology.tpu_topology(topology.with_ps(tpu_resolver(task_id=3), PS))
    assert t.info.num_workers == 8 and t.replicas_per_worker == 4
    assert [w.address for w in t.info.workers] == HOSTS
    assert t.info.chief.address == "10.0.0.0:8470" and t.info.worker_index == 3
    assert [p.address for p in t.info.ps] == PS
    assert t.backup_workers(2) == (6, 7)


def test_slices_of_4_hosts_make_2_workers_of_16_replicas():
    resolver = topology.with_ps(tpu_resolver(task_id=4), PS, hosts_per_worker=4)
    t = topology.tpu_topology(resolver)
    assert t.groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert t.replicas_per_worker == 16
    assert [w.address for w in t.info.workers] == ["10.0.0.0:8470", "10.0.0.4:8470"]
    assert t.info.worker_index == 1 and not t.info.is_chief
    assert [h.address for h in t.chief_hosts] == HOSTS[:4]
    assert t.backup_workers(1) == (1,) and t.backup_workers(0) == ()
    # The ps tasks read the same mapping: two workers, whatever the number of hosts.
    ps_view = topology.cluster_info(topology.with_ps(tpu_resolver(), PS, hosts_per_worker=4,
                                                     task_type="ps", task_id=1))
    assert ps_view.num_workers == 2 and ps_view.task.address == PS[1]


def test_a_non_tpu_resolver_keeps_the_usual_mapping():
    gpu = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": HOSTS[:2], "ps": PS}), task_type="worker", task_id=1,
        num_accelerators={"GPU": 2})
    assert topology.tpu_topology(gpu) is None
    info = topology.cluster_info(gpu)
    assert info.num_workers == 2 and info.worker_index == 1


@pytest.mark.parametrize("make, error, words", [
    (lambda: topology.with_ps(tpu_resolver(), PS, hosts_per_worker=3), ValueError,
     "8 TPU hosts do not divide into workers of `hosts_per_worker` hosts. Received hosts_per_worker=3"),
    (lambda: topology.with_ps(tpu_resolver(), PS, hosts_per_worker=0), ValueError, "hosts_per_worker=0"),
    (lambda: topology.with_ps(tpu_resolver(), PS, hosts_per_worker=2.0), TypeError, "hosts_per_worker=2.0"),
    (lambda: topology.with_ps(tpu_resolver(task_id=5), PS, hosts_per_worker=4), ValueError,
     "TPU host 5 belongs to worker 1, whose program runs on its first host /job:worker/task:4"),
    (lambda: topology.with_ps(tpu_resolver(), []), ValueError, "ps=[]"),
    (lambda: topology.with_ps(tpu_resolver(cores=0), PS), ValueError, "tpu_resolver="),
    (lambda: topology.cluster_info(tpu_resolver()), ValueError, "no `ps` job"),
    (lambda: topology.with_ps(tpu_resolver(task_id=8), PS), ValueError, "/job:worker/task:8 is not in"),
    (lambda: topology.with_ps(tpu_resolver(), [PS[0], HOSTS[2]]), ValueError,
     "Tasks /job:worker/task:2 and /job:ps/task:1 have the same address: each task needs its own 'host:port'. "
     "Received address='10.0.0.2:8470'"),
])
def test_bad_tpu_clusters_are_refused_naming_the_argument(make, error, words):
    with pytest.raises(error) as info:
        make()
    assert words in str(info.value)


def test_strategy_refuses_a_host_that_is_not_its_groups_first():
    resolver = topology.TPUPodResolver(tf.train.ClusterSpec({"worker": HOSTS, "ps": PS}), "worker", 3,
                                       cores_per_host=4, hosts_per_worker=2)
    with pytest.raises(ValueError, match="TPU host 3 belongs to worker 1"):
        tf_backup.BackupWorkerStrategy(cluster_resolver=resolver)


@pytest.mark.cluster
def test_strategy_trains_on_a_tpu_like_resolver_one_worker_per_host():
    """The TPU hosts are this machine's worker processes (CPU replicas): the mapping end to end."""
    steps = 4
    out = tf_backup.launch_local(programs.placement.train_regression_tpu_resolver, num_workers=2, args=(steps,),
                                 timeout=240)
    expected = programs.common.reference_fit(keras.optimizers.SGD(0.1), lambda k: [2 * k, 2 * k + 1], steps, 2)
    for worker in out:
        assert worker["tpu_cores"] == 8
        assert worker["stats"] == {"global_step": steps, "pushed": [steps] * 2, "taken": [steps] * 2,
                                   "dropped": [0, 0], "cancelled": [0, 0], "batches": [steps] * 2}
        for got, want in zip(worker["weights"], expected):
            np.testing.assert_allclose(got, want, atol=1e-5)
    assert [w["worker"] for w in out] == [0, 1]
