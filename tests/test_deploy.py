"""The deploy files, and the TF_CONFIG that Kubeflow's TFJob writes, run on localhost.

The Training Operator gives each pod a TF_CONFIG with a `chief` job beside `ps` and `worker`, and
`"environment": "cloud"`. Here every task of such a cluster is a process on this machine running
the training binary exactly as `deploy/kubernetes/tfjob.yaml` runs it (other flags, smaller job).

The manifests are also validated against the Kubernetes API schemas, offline (`kubernetes-validate`
bundles them, strict: an unknown field fails), and the TFJob's own fields against kubeflow.org/v1's
(below); the Dockerfile is parsed and its COPY set built into a wheel as its RUN line would.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
import zipfile

import jsonschema
import kubernetes_validate
import pytest
import yaml

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


# --- The manifests against the API's schemas ------------------------------------------------------

KUBERNETES_VERSION = "1.37.0"  # the newest schemas kubernetes-validate bundles today

# kubeflow.org/v1 TFJob, the fields the Training Operator defines (its CRD's openAPIV3Schema, from the Go
# types in kubeflow/training-operator pkg/apis/kubeflow.org/v1: tensorflow_types.go and common's RunPolicy
# and ReplicaSpec). Unlike the CRD (whose schema leaves unknown fields to the API server's pruning), an
# unknown field fails here, as `kubectl apply` (strict field validation) fails on it. Each replica's
# `template` is checked separately against Kubernetes' own PodTemplateSpec.
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
TFJOB_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "TFJob"},
        "metadata": {"type": "object"},  # ObjectMeta: checked through a PodTemplate below
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["tfReplicaSpecs"],
            "properties": {
                "runPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                        "backoffLimit": _INT32,
                        "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                        "schedulingPolicy": {"type": "object"},
                        "suspend": {"type": "boolean"},
                        "ttlSecondsAfterFinished": _INT32,
                    },
                },
                "successPolicy": {"enum": ["", "AllWorkers"]},
                "enableDynamicWorker": {"type": "boolean"},
                "tfReplicaSpecs": {
                    "type": "object",
                    "minProperties": 1,
                    "propertyNames": {"enum": ["PS", "Worker", "Chief", "Master", "Evaluator"]},
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["template"],
                        "properties": {
                            "replicas": _INT32,
                            "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
                            "template": {"type": "object"},
                        },
                    },
                },
            },
        },
    },
}


def _resources(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _validate_kubernetes(resource):
    """Validates one resource against the bundled Kubernetes schemas, strict; raises on any error."""
    return kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name, kinds", [("plain.yaml", ["Service", "Job", "Job"]),
                                         ("pvc.yaml", ["PersistentVolumeClaim"])])
def test_the_plain_manifests_are_valid_kubernetes_objects(name, kinds):
    resources = _resources(name)
    assert [r["kind"] for r in resources] == kinds
    for resource in resources:
        assert _validate_kubernetes(resource) == "1.37"


def _validate_tfjob(tfjob):
    """Validates a TFJob: its own fields, then each replica's pod template as Kubernetes' PodTemplate."""
    jsonschema.validate(tfjob, TFJOB_SCHEMA)
    for role, replica in tfjob["spec"]["tfReplicaSpecs"].items():
        # The operator turns each template into pods: the same schema as a PodTemplate's.
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {**tfjob["metadata"], "name": f"{tfjob['metadata']['name']}-{role.lower()}"},
                        "template": replica["template"]}
        assert _validate_kubernetes(pod_template) == "1.37", role


def test_the_tfjob_is_a_valid_kubeflow_v1_tfjob_with_valid_pod_templates():
    [tfjob] = _resources("tfjob.yaml")
    assert set(tfjob["spec"]["tfReplicaSpecs"]) == {"PS", "Chief", "Worker"}
    _validate_tfjob(tfjob)


@pytest.mark.parametrize("field, value", [
    ("spec.tfReplicaSpecs.Worker.replica", 4),  # misspelt `replicas`
    ("spec.tfReplicaSpecs.Wroker", {"replicas": 4}),  # a replica type the operator does not know
    ("spec.runPolicy.cleanPodPolicy", "Some"),
    ("spec.tfReplicaSpecs.Chief.template.spec.containers.0.volumeMount", []),  # misspelt, in the pod
    ("spec.tfReplicaSpecs.PS.template.spec.containers.0.ports.0.containerPort", "2222"),  # a string
])
def test_a_broken_field_in_the_tfjob_fails_validation(field, value):
    """The checks catch a misspelt or mistyped field at either level (the TFJob's, the pod's)."""
    [tfjob] = _resources("tfjob.yaml")
    *path, last = field.split(".")
    node = tfjob
    for key in path:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    with pytest.raises(jsonschema.ValidationError):
        _validate_tfjob(tfjob)


def test_a_broken_field_in_a_job_fails_validation():
    for name, kind, path, broken in [
            ("plain.yaml", "Job", ["spec", "completionsMode"], "Indexed"),  # misspelt field
            ("plain.yaml", "Job", ["spec", "parallelism"], "5"),  # a string for an integer
            ("plain.yaml", "Job", ["spec", "template", "spec", "containers"], {"name": "tensorflow"}),  # not a list
            ("plain.yaml", "Service", ["spec", "cluserIP"], "None"),
            ("pvc.yaml", "PersistentVolumeClaim", ["spec", "resources", "request"], {"storage": "10Gi"})]:
        resource = next(r for r in _resources(name) if r["kind"] == kind)
        node = resource
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = broken
        with pytest.raises(jsonschema.ValidationError):
            _validate_kubernetes(resource)


def _binary_flags(args):
    """`--name[=value]` of a command line, each checked against the binary's own absl flags."""
    import importlib  # pylint: disable=g-import-not-at-top
    from absl import flags  # pylint: disable=g-import-not-at-top
    importlib.import_module("trainers.train")  # defines the binary's flags (without TensorFlow)
    parsed = {}
    for arg in args:
        assert arg.startswith("--"), arg
        name, _, value = arg[2:].partition("=")
        assert name in flags.FLAGS, f"tf-backup-train has no flag --{name}"
        flag = flags.FLAGS[name]
        parsed[name] = flag.parser.parse(value) if value or not flag.boolean else True
    return parsed


def test_every_manifest_runs_the_binary_with_flags_it_defines():
    [tfjob] = _resources("tfjob.yaml")
    for role, replica in tfjob["spec"]["tfReplicaSpecs"].items():
        [container] = replica["template"]["spec"]["containers"]
        assert "command" not in container, role  # the image's ENTRYPOINT (tf-backup-train) runs the args
        assert _binary_flags(container["args"])["num_workers"] == 5
    for job in _resources("plain.yaml")[1:]:
        [container] = job["spec"]["template"]["spec"]["containers"]
        script = container["args"][0]
        exec_line = script[script.index("exec "):]
        command = shlex.split(exec_line)[1:]
        assert command[0] == "tf-backup-train", command
        assert _binary_flags(command[1:])["num_workers"] == 5


# --- The image ------------------------------------------------------------------------------------

def _dockerfile():
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = open(os.path.join(ROOT, "deploy", "Dockerfile")).read()
    text = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_the_dockerfile_copies_what_its_pip_install_builds_and_runs_the_readme_binary(tmp_path, monkeypatch):
    """Every COPY source exists; the copied files alone build a wheel with the package, its configs
    and the `tf-backup-train` entry point the ENTRYPOINT names; the malloc ENV is tf_backup's own."""
    import shutil  # pylint: disable=g-import-not-at-top
    from tf_backup import memory  # pylint: disable=g-import-not-at-top
    instructions = _dockerfile()
    keywords = [k for k, _ in instructions]
    assert keywords[0] == "FROM" and set(keywords) <= {"FROM", "WORKDIR", "COPY", "RUN", "ENV", "ENTRYPOINT"}
    python = re.fullmatch(r"python:(\d+)\.(\d+)-slim", instructions[0][1])
    assert python and (int(python[1]), int(python[2])) >= (3, 10)  # setup.py's python_requires
    context = tmp_path / "context"  # the build context as the image sees it: only what COPY brings in
    context.mkdir()
    for keyword, rest in instructions:
        if keyword == "COPY":
            *sources, dest = rest.split()
            for source in sources:
                path = os.path.join(ROOT, source)
                assert os.path.exists(path), f"COPY {source}: not in the build context"
                target = context / (source if dest in ("./", ".") else dest)
                if os.path.isdir(path):
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(path, target)
    [run] = [rest for k, rest in instructions if k == "RUN"]
    assert shlex.split(run) == ["pip", "install", "--no-cache-dir", "."]  # the package, from the context
    # Build what that pip install builds, from the copied files alone (no network, no dependencies).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel"), str(context)], check=True, timeout=300)
    [wheel] = list((tmp_path / "wheel").iterdir())
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert {"tf_backup/__init__.py", "trainers/train.py", "configs/mnist1d.json"} <= names
    assert re.search(r"^tf-backup-train = trainers\.train:run$", scripts, re.M)
    [entrypoint] = [rest for k, rest in instructions if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["tf-backup-train"]  # the README's main command
    [env] = [rest for k, rest in instructions if k == "ENV"]
    image_env = dict(item.split("=", 1) for item in env.split())
    for name in [*image_env, "TF_BACKUP_TUNE_MALLOC"]:  # malloc_env leaves out what this shell sets
        monkeypatch.delenv(name, raising=False)
    assert image_env == memory.malloc_env()
