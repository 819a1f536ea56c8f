"""The deploy files, and the TF_CONFIG that Kubeflow's TFJob writes, run on localhost.

The Training Operator gives each pod a TF_CONFIG with a `chief` job beside `ps` and `worker`, and
`"environment": "cloud"`. Here every task of such a cluster is a process on this machine running
the training binary exactly as `deploy/kubernetes/tfjob.yaml` runs it (other flags, smaller job).
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tf_backup.local.spec import free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")


def tfjob_tf_config(cluster, task_type, index):
    """TF_CONFIG as the Training Operator writes it (kubeflow/training-operator, tensorflow.go)."""
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}, "environment": "cloud"})


@pytest.mark.cluster
def test_a_tfjob_tf_config_with_a_chief_job_trains_on_localhost(tmp_path):
    ports = free_ports(4)
    cluster = {"chief": [f"localhost:{ports[0]}"], "ps": [f"localhost:{ports[1]}"],
               "worker": [f"localhost:{ports[2]}", f"localhost:{ports[3]}"]}
    summary = tmp_path / "summary.json"
    flags = ["--config=regression", "--steps=30", "--num_workers=3", "--num_backup_workers=1",
             f"--model_dir={tmp_path / 'model'}", "--startup_timeout=120", "--step_timeout=120"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT, **launch_env())
    procs = {}
    try:
        for task_type, index in [("ps", 0), ("chief", 0), ("worker", 0), ("worker", 1)]:
            extra = [f"--summary_json={summary}"] if task_type == "chief" else []
            procs[task_type, index] = subprocess.Popen(
                [sys.executable, "-m", "trainers.train", *flags, *extra], cwd=ROOT,
                env=dict(env, TF_CONFIG=tfjob_tf_config(cluster, task_type, index)),
                stdout=open(tmp_path / f"{task_type}-{index}.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        for name, proc in procs.items():
            proc.wait(max(1.0, deadline - time.monotonic()))
        codes = {name: proc.returncode for name, proc in procs.items()}
        logs = {name: (tmp_path / f"{name[0]}-{name[1]}.log").read_text()[-2000:] for name in procs}
        assert all(code == 0 for code in codes.values()), (codes, logs)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    result = json.loads(summary.read_text())
    assert result["steps"] == 30 and result["num_workers"] == 3 and result["replicas_to_aggregate"] == 2
    gradients = result["gradients"]
    assert [t + d for t, d in zip(gradients["taken"], gradients["dropped"])] == gradients["pushed"]
    assert sum(gradients["taken"]) >= 2 * 30  # every step averaged at least N = 2 fresh gradients
    assert all(p > 0 for p in gradients["pushed"])  # the chief (worker 0) and both `worker` tasks trained


def launch_env():
    """The malloc settings a local cluster's tasks get (the image sets them too)."""
    from tf_backup import memory  # pylint: disable=g-import-not-at-top
    return memory.malloc_env()


def _flag(text, name):
    values = set(re.findall(rf"--{name}=(\d+)", text))
    assert len(values) == 1, f"every task of {name} must get the same value: {values}"
    return int(values.pop())


def test_the_tfjob_manifest_gives_every_task_the_flags_its_replicas_need():
    text = open(os.path.join(DEPLOY, "tfjob.yaml")).read()
    replicas = {role: int(n) for role, n in re.findall(r"^    (PS|Chief|Worker):\n      replicas: (\d+)", text, re.M)}
    assert replicas.keys() == {"PS", "Chief", "Worker"}
    assert _flag(text, "num_workers") == replicas["Chief"] + replicas["Worker"]  # the chief is worker 0
    assert _flag(text, "num_workers") > _flag(text, "num_backup_workers")
    assert replicas["Chief"] == 1 and text.count("name: tensorflow") == 3  # the operator's container name
    # Every replica waits the same time for a restarted ps (the chief writes the state again).
    assert re.findall(r"--ps_restart_timeout=(\d+)", text) == ["300"] * 3
    assert text.count('"--chief_rejoins"') == 3  # a restarted chief rejoins; every task must agree


def test_the_plain_manifest_lists_every_indexed_pod_in_its_cluster():
    text = open(os.path.join(DEPLOY, "plain.yaml")).read()
    completions = dict(re.findall(r"name: tf-backup-(ps|worker)\nspec:\n  completionMode: Indexed\n  completions: (\d+)",
                                  text))
    workers = sorted(set(re.findall(r"tf-backup-worker-(\d+)\.tf-backup:2222", text)), key=int)
    ps = sorted(set(re.findall(r"tf-backup-ps-(\d+)\.tf-backup:2222", text)), key=int)
    assert workers == [str(i) for i in range(int(completions["worker"]))]
    assert ps == [str(i) for i in range(int(completions["ps"]))]
    assert _flag(text, "num_workers") == int(completions["worker"])
    assert re.findall(r"--ps_restart_timeout=(\d+) --chief_rejoins", text) == ["300"] * 2  # ps's and workers'
    for cluster in re.findall(r"value: >-\n((?:\s+.*\n)+?)\s+ports:", text):  # each CLUSTER value is JSON
        parsed = json.loads(" ".join(cluster.split()))
        assert len(parsed["worker"]) == int(completions["worker"]) and len(parsed["ps"]) == int(completions["ps"])
