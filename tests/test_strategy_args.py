"""BackupWorkerStrategy refuses bad input before it connects or blocks.

Every case here fails before the process connects to a cluster, so the test
process's TensorFlow context stays local.
"""

import re
import socket

import pytest
import tensorflow as tf

import tf_backup


def resolver(num_workers=3, task=("worker", 0), ps_port=1):
    jobs = {"worker": [f"localhost:{1000 + i}" for i in range(num_workers)], "ps": [f"localhost:{ps_port}"]}
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(jobs), task_type=task[0], task_id=task[1])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_backup_workers=3), ValueError,
     "`num_backup_workers` must be below the number of workers \\(3\\).*num_backup_workers=3"),
    (dict(num_backup_workers=5), ValueError, "num_backup_workers=5"),
    (dict(num_backup_workers=-1), ValueError, "num_backup_workers=-1"),
    (dict(num_backup_workers=1.5), TypeError, "num_backup_workers=1.5"),
    (dict(num_backup_workers=True), TypeError, "num_backup_workers=True"),
    (dict(num_backup_workers="one"), TypeError, "integer >= 0 or \"auto\". Received num_backup_workers='one'"),
    (dict(num_backup_workers=1, max_replicas_to_aggregate=2), ValueError,
     "need num_backup_workers='auto'.*max_replicas_to_aggregate=2"),
    (dict(num_backup_workers="auto", min_replicas_to_aggregate=0), ValueError, "min_replicas_to_aggregate=0"),
    (dict(num_backup_workers="auto", max_replicas_to_aggregate=4), ValueError,
     r"at most the number of workers \(3\).*max_replicas_to_aggregate=4"),
    (dict(num_backup_workers="auto", min_replicas_to_aggregate=3, max_replicas_to_aggregate=2), ValueError,
     "min_replicas_to_aggregate=3, max_replicas_to_aggregate=2"),
    (dict(num_backup_workers="auto", adaptive_window=0), ValueError, "adaptive_window=0"),
    (dict(num_backup_workers="auto", asynchronous=True), ValueError, "no N to choose"),
    (dict(asynchronous="yes"), TypeError, "asynchronous='yes'"),
    (dict(wire_dtype="int8"), ValueError, "`wire_dtype` must be one of float32, bfloat16, float16.*wire_dtype='int8'"),
    (dict(wire_dtype=tf.bfloat16), ValueError, "wire_dtype=tf.bfloat16"),
    (dict(asynchronous=True, num_backup_workers=1), ValueError, "num_backup_workers=0"),
    (dict(step_timeout=0), ValueError, "step_timeout=0"),
    (dict(startup_timeout=-3), ValueError, "startup_timeout=-3"),
    (dict(chief_timeout="1"), ValueError, "chief_timeout='1'"),
    (dict(poll_interval=None), ValueError, "poll_interval=None"),
    (dict(worker_timeout=0), ValueError, "worker_timeout=0"),
    (dict(ps_timeout=-1), ValueError, "ps_timeout=-1"),
    (dict(ps_restart_timeout=-1.0), ValueError, "ps_restart_timeout=-1.0"),
    (dict(ps_restart_timeout="60"), ValueError, "ps_restart_timeout='60'"),
    (dict(chief_rejoins="yes"), TypeError, "chief_rejoins='yes'"),
    (dict(max_steps=0), ValueError, "`max_steps` must be an integer >= 1.*max_steps=0"),
    (dict(max_steps=2.5), TypeError, "max_steps=2.5"),
    (dict(checkpoint_dir=3), TypeError, "checkpoint_dir=3"),
    (dict(checkpoint_every_steps=0), ValueError, "checkpoint_every_steps=0"),
    (dict(devices="/device:CPU:0"), TypeError, "devices='/device:CPU:0'"),
    (dict(devices=["/device:GPU:3"]), ValueError, "which this process does not have"),
    # Every argument refuses a value of the wrong type and one out of its range (bools must be bools,
    # numbers finite), naming itself and the value.
    (dict(num_backup_workers="auto", min_replicas_to_aggregate=1.5), TypeError, "min_replicas_to_aggregate=1.5"),
    (dict(num_backup_workers="auto", max_replicas_to_aggregate="3"), TypeError, "max_replicas_to_aggregate='3'"),
    (dict(num_backup_workers="auto", max_replicas_to_aggregate=0), ValueError, "max_replicas_to_aggregate=0"),
    (dict(adaptive_window=True), TypeError, "adaptive_window=True"),
    (dict(adaptive_window=-5), ValueError, "adaptive_window=-5"),
    (dict(asynchronous=1), TypeError, "`asynchronous` must be a bool. Received asynchronous=1"),
    (dict(step_timeout="600"), ValueError, "step_timeout='600'"),
    (dict(step_timeout=float("nan")), ValueError, "step_timeout=nan"),
    (dict(startup_timeout=float("inf")), ValueError, "startup_timeout=inf"),
    (dict(chief_timeout=-1.0), ValueError, "chief_timeout=-1.0"),
    (dict(poll_interval=0), ValueError, "poll_interval=0"),
    (dict(poll_interval=True), ValueError, "poll_interval=True"),
    (dict(worker_timeout=[30]), ValueError, "worker_timeout=\\[30\\]"),
    (dict(worker_timeout=float("-inf")), ValueError, "worker_timeout=-inf"),
    (dict(ps_timeout=float("nan")), ValueError, "ps_timeout=nan"),
    (dict(ps_restart_timeout=float("inf")), ValueError, "ps_restart_timeout=inf"),
    (dict(chief_rejoins=1), TypeError, "chief_rejoins=1"),
    (dict(max_steps="10"), TypeError, "max_steps='10'"),
    (dict(max_steps=-1), ValueError, "max_steps=-1"),
    (dict(checkpoint_dir=b"/tmp/x"), TypeError, "checkpoint_dir=b'/tmp/x'"),
    (dict(checkpoint_every_steps=10.0), TypeError, "checkpoint_every_steps=10.0"),
    (dict(checkpoint_every_steps=-3), ValueError, "checkpoint_every_steps=-3"),
    (dict(wire_dtype=None), ValueError, "wire_dtype=None"),
    (dict(wire_dtype="float64"), ValueError, "wire_dtype='float64'"),
    (dict(apply_on_ps="yes"), TypeError, "`apply_on_ps` must be a bool or \"auto\". Received apply_on_ps='yes'"),
    (dict(apply_on_ps=1), TypeError, "Received apply_on_ps=1"),
    (dict(apply_on_ps=True, ps_restart_timeout=60.0), ValueError,
     "set ps_restart_timeout=0 and chief_rejoins=False.*Received ps_restart_timeout=60.0, chief_rejoins=False"),
    (dict(apply_on_ps=True, chief_rejoins=True), ValueError, "Received ps_restart_timeout=0.0, chief_rejoins=True"),
    (dict(devices=[3]), TypeError, "devices=\\[3\\]"),
    (dict(devices=[]), ValueError, "devices=\\[\\]"),
])
def test_bad_arguments_name_the_argument_and_value(kwargs, error, message):
    with pytest.raises(error, match=message):
        tf_backup.BackupWorkerStrategy(resolver(), **kwargs)


@pytest.mark.parametrize("value", ["localhost:1000", {"worker": ["localhost:1000"]}, 3])
def test_a_cluster_resolver_of_another_type_is_refused_naming_it(value):
    with pytest.raises(TypeError, match=re.escape(f"Received cluster_resolver={value!r}")):
        tf_backup.BackupWorkerStrategy(value)


def test_ps_task_is_told_to_run_serve():
    with pytest.raises(ValueError, match="ps tasks run `tf_backup.serve\\(\\)`"):
        tf_backup.BackupWorkerStrategy(resolver(task=("ps", 0)))


def test_cluster_without_ps_job_is_refused():
    no_ps = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": ["localhost:1000"]}), task_type="worker", task_id=0)
    with pytest.raises(ValueError, match="no `ps` job"):
        tf_backup.BackupWorkerStrategy(no_ps)


def test_worker_started_before_the_ps_gets_a_timeout_naming_the_ps():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
        with pytest.raises(TimeoutError, match=f"waited 1 s for /job:ps/task:0 \\(localhost:{port}\\)"):
            tf_backup.BackupWorkerStrategy(resolver(ps_port=port), startup_timeout=1.0)


def test_serve_refuses_a_worker_task():
    with pytest.raises(ValueError, match="`tf_backup.serve\\(\\)` runs ps tasks"):
        tf_backup.serve(resolver(task=("worker", 1)))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(poll_interval=-1), ValueError, "`poll_interval` must be a positive number of seconds. Received poll_interval=-1"),
    (dict(startup_timeout="60"), ValueError, "startup_timeout='60'"),
    (dict(chief_timeout=0), ValueError, "chief_timeout=0"),
    (dict(exit_grace=float("inf")), ValueError, "exit_grace=inf"),
    (dict(silent_worker=None), ValueError, "silent_worker=None"),
    (dict(ps_restart_timeout=-5), ValueError, "ps_restart_timeout=-5"),
    (dict(chief_rejoins="yes"), TypeError, "`chief_rejoins` must be a bool. Received chief_rejoins='yes'"),
])
def test_serve_refuses_bad_arguments_before_it_starts(kwargs, error, message):
    # A worker's resolver: were the arguments not checked first, serve() would refuse the task instead.
    with pytest.raises(error, match=message):
        tf_backup.serve(resolver(), **kwargs)
