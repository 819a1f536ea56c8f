"""Reading clusters from TensorFlow cluster resolvers (no processes started)."""

import json
import re
import sys
import subprocess
import os
import socket

import pytest
import tensorflow as tf

from tf_backup import cluster as cluster_lib

SimpleClusterResolver = tf.distribute.cluster_resolver.SimpleClusterResolver


def resolver(jobs, task_type="worker", task_id=0):
    return SimpleClusterResolver(tf.train.ClusterSpec(jobs), task_type=task_type, task_id=task_id)


JOBS = {"chief": ["h0:1000"], "worker": ["h1:1001", "h2:1002"], "ps": ["p0:2000", "p1:2001"]}


def test_chief_comes_first_then_workers_by_index():
    info = cluster_lib.cluster_info_from_resolver(resolver(JOBS, "worker", 1))
    assert [str(t) for t in info.workers] == [
        "/job:chief/task:0 (h0:1000)", "/job:worker/task:0 (h1:1001)", "/job:worker/task:1 (h2:1002)"]
    assert info.worker_index == 2 and not info.is_chief and info.num_workers == 3
    assert info.chief.address == "h0:1000"
    assert [t.device for t in info.ps] == [
        "/job:ps/replica:0/task:0/device:CPU:0", "/job:ps/replica:0/task:1/device:CPU:0"]


def test_worker_0_is_chief_without_a_chief_job():
    jobs = {"worker": ["h1:1001", "h2:1002"], "ps": ["p0:2000"]}
    info = cluster_lib.cluster_info_from_resolver(resolver(jobs, "worker", 0))
    assert info.is_chief and info.worker_index == 0


def test_tf_config_resolver(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": JOBS, "task": {"type": "chief", "index": 0}}))
    info = cluster_lib.cluster_info_from_resolver(
        tf.distribute.cluster_resolver.TFConfigClusterResolver())
    assert info.is_chief and info.task.job == "chief" and len(info.ps) == 2


@pytest.mark.parametrize("jobs, task, message", [
    ({"ps": ["p0:2000"]}, ("ps", 0), "no `worker` or `chief` job"),
    ({}, ("worker", 0), "is TF_CONFIG set?"),
    ({"worker": ["h1:1001"]}, ("worker", 0), "no `ps` job"),
    ({"chief": ["a:1", "b:2"], "worker": ["h:3"], "ps": ["p:4"]}, ("worker", 0), "at most one `chief`"),
    ({"worker": ["h1:1001"], "ps": ["p0"]}, ("worker", 0), "malformed address"),
    ({"worker": ["h1:99999"], "ps": ["p0:1"]}, ("worker", 0), "port in 1..65535"),
    ({"worker": ["h1:1001"], "ps": ["p0:1"], "evaluator": ["e:2"]}, ("worker", 0), "['evaluator']"),
    ({"worker": ["h1:1001"], "ps": ["p0:1"]}, ("worker", 3), "/job:worker/task:3 is not in the cluster"),
    ({"worker": ["h1:1001"], "ps": ["p0:1"]}, (None, None), "does not name this process's task"),
])
def test_bad_clusters_are_refused_with_the_reason(jobs, task, message):
    with pytest.raises(ValueError) as info:
        cluster_lib.cluster_info_from_resolver(resolver(jobs, *task))
    assert message in str(info.value)


@pytest.mark.parametrize("jobs, task, message", [
    ({"worker": {0: "h0:1000", 2: "h2:1002"}, "ps": ["p0:2000"]}, ("worker", 0),
     "Job `worker` must have tasks 0..1 without gaps. Received task indices [0, 2]"),
    ({"worker": ["h0:1000"], "ps": {1: "p1:2001"}}, ("worker", 0), "Received task indices [1]"),
    ({"worker": ["h0:1000", "h0:1000"], "ps": ["p0:2000"]}, ("worker", 0),
     "Tasks /job:worker/task:0 and /job:worker/task:1 have the same address: each task needs its own "
     "'host:port'. Received address='h0:1000'"),
    ({"chief": ["h0:1000"], "worker": ["h1:1001"], "ps": ["h0:1000"]}, ("worker", 0),
     "Tasks /job:chief/task:0 and /job:ps/task:0 have the same address"),
])
def test_gaps_in_task_indices_and_shared_addresses_are_refused_naming_them(jobs, task, message):
    with pytest.raises(ValueError) as info:
        cluster_lib.cluster_info_from_resolver(resolver(jobs, *task))
    assert message in str(info.value)


def test_a_tf_config_with_gaps_in_task_indices_is_refused_naming_them(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": {"0": "h0:1000", "2": "h2:1002"},
                                                            "ps": ["p0:2000"]}, "task": {"type": "worker", "index": 0}}))
    with pytest.raises(ValueError, match=re.escape("Job `worker` must have tasks 0..1 without gaps. Received task "
                                                   "indices [0, 2]")):
        cluster_lib.cluster_info_from_resolver(tf.distribute.cluster_resolver.TFConfigClusterResolver())


@pytest.mark.parametrize("index", ["1", 1.5, 1.0, True, None, "one"])
def test_a_tf_config_task_index_that_is_not_an_integer_is_refused_naming_it(monkeypatch, index):
    # TensorFlow's resolver would read 1.5 as task 1, and fail on "one" without naming TF_CONFIG.
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": JOBS, "task": {"type": "worker", "index": index}}))
    with pytest.raises(TypeError, match=re.escape(f"TF_CONFIG's task index must be an integer. Received "
                                                  f"index={index!r} in TF_CONFIG's task=")):
        cluster_lib.cluster_info_from_resolver(tf.distribute.cluster_resolver.TFConfigClusterResolver())


@pytest.mark.parametrize("task_id", ["1", 1.5])
def test_a_resolvers_task_id_that_is_not_an_integer_is_refused_naming_it(task_id):
    with pytest.raises(TypeError, match=re.escape(f"`task_id` must be an integer. Received task_id={task_id!r}")):
        cluster_lib.cluster_info_from_resolver(resolver(JOBS, "worker", task_id))


def test_a_resolver_is_required():
    with pytest.raises(TypeError, match="cluster_resolver=.*not a resolver"):
        cluster_lib.cluster_info_from_resolver("not a resolver")


def test_waiting_for_an_unreachable_task_times_out_naming_it():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        task = cluster_lib.Task("ps", 0, f"localhost:{port}")
        with pytest.raises(TimeoutError, match=f"ps/task:0 \\(localhost:{port}\\) to accept"):
            cluster_lib.wait_for_tasks([task], timeout=0.5, waiter="Worker w")


def test_waiting_for_a_listening_task_returns():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        s.listen()
        cluster_lib.wait_for_tasks([cluster_lib.Task("ps", 0, f"localhost:{s.getsockname()[1]}")], 5)


@pytest.mark.parametrize("value", ['{"cluster": {"worker": ["h:1"]', "worker=h:1"])
def test_malformed_tf_config_is_refused_naming_it(monkeypatch, value):
    monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON .*Received TF_CONFIG="):
        cluster_lib.cluster_info_from_resolver(tf.distribute.cluster_resolver.TFConfigClusterResolver())


def test_a_ps_whose_port_is_taken_fails_naming_the_address():
    with socket.socket() as taken:
        taken.bind(("localhost", 0))
        taken.listen()
        port = taken.getsockname()[1]
        tf_config = {"cluster": {"worker": ["localhost:1"], "ps": [f"localhost:{port}"]},
                     "task": {"type": "ps", "index": 0}}
        out = subprocess.run(
            [sys.executable, "-c", "import tf_backup; tf_backup.serve(startup_timeout=5)"],
            env=dict(os.environ, TF_CONFIG=json.dumps(tf_config), TF_CPP_MIN_LOG_LEVEL="2"),
            capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1
    assert (f"ValueError: The ps task /job:ps/task:0 (localhost:{port}) could not start its server on "
            f"localhost:{port} (is the port already in use?)") in out.stderr
