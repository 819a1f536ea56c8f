"""The README's promises: its Keras example runs, its set-up commands are CI's, its links resolve.

The example's code blocks are found by the comment before each (`<!-- example: worker -->`,
`<!-- example: ps -->`, `<!-- example: launch -->`) and run as they are on real localhost clusters:
once with the worker code in every worker process and the ps code in the ps process, and once as a
user would run it, the worker code and the `launch_local` block saved as one script.
"""

import ast
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def readme_text() -> str:
    with open(README) as f:
        return f.read()


def example_block(name: str) -> str:
    """The fenced Python block that follows `<!-- example: NAME -->` in the README (exactly one)."""
    found = re.findall(r"<!-- example: " + re.escape(name) + r" -->\s*```python\n(.*?)```", readme_text(), re.S)
    assert len(found) == 1, f"README.md must have one ```python block after <!-- example: {name} -->; found {len(found)}"
    return found[0]


def run_readme_task(worker_code: str, ps_code: str):
    """A task of the local cluster: the README's ps code in a ps task, its worker code and `train()` in a worker."""
    task_type = json.loads(os.environ["TF_CONFIG"])["task"]["type"]
    namespace = {"__name__": "readme_example"}
    if task_type == "ps":
        exec(compile(ps_code, "README.md <!-- example: ps -->", "exec"), namespace)  # pylint: disable=exec-used
        return None
    exec(compile(worker_code, "README.md <!-- example: worker -->", "exec"), namespace)  # pylint: disable=exec-used
    return namespace["train"]()


def steps_asked() -> int:
    """The README's STEPS (the job's global steps), read from the worker block."""
    found = re.findall(r"^STEPS = (\d+)", example_block("worker"), re.M)
    assert len(found) == 1, "the worker block must set STEPS = <global steps> once"
    return int(found[0])


def check_counts(stats: dict, steps: int, num_workers: int) -> None:
    assert stats["global_step"] == steps
    assert len(stats["pushed"]) == num_workers
    for pushed, taken, dropped in zip(stats["pushed"], stats["taken"], stats["dropped"]):
        assert taken + dropped == pushed and pushed > 0
    # N = num_workers - 1 gradients at least in every step, none counted twice.
    assert (num_workers - 1) * steps <= sum(stats["taken"]) <= num_workers * steps


@pytest.mark.compat
@pytest.mark.cluster
def test_the_readme_example_trains_with_its_ps_code_on_a_local_cluster():
    import tf_backup  # pylint: disable=g-import-not-at-top

    steps, num_workers = steps_asked(), 3
    kwargs = dict(worker_code=example_block("worker"), ps_code=example_block("ps"))
    with tf_backup.LocalCluster(run_readme_task, num_workers=num_workers, kwargs=kwargs, serve_ps=False) as cluster:
        cluster.start()
        results = cluster.wait(timeout=240)
    history, stats = results[0]  # the chief's
    check_counts(stats, steps, num_workers)
    assert history["global_step"][-1] == steps
    assert history["replicas_to_aggregate"][-1] == num_workers - 1
    assert history["accuracy"][-1] > 0.8  # the toy label is learnt
    for _, other in results[1:]:  # every worker read the same counts from the ps
        assert other["global_step"] == steps


@pytest.mark.cluster
def test_the_readme_example_runs_as_a_script_through_launch_local(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(example_block("worker") + "\n\n" + example_block("launch"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    print("\n".join(lines[-2:]))  # what the README's reader sees (`pytest -s`)
    accuracy = float(re.fullmatch(r"accuracy (\S+)", lines[-2]).group(1))
    check_counts(ast.literal_eval(lines[-1]), steps_asked(), num_workers=3)
    assert accuracy > 0.8


def test_the_readme_set_up_commands_are_the_ones_ci_runs():
    blocks = re.findall(r"```bash\n(.*?)```", readme_text(), re.S)
    commands = [line.split("#")[0].strip() for line in blocks[0].splitlines()]
    assert commands[0] == 'pip install -e ".[test]"'
    assert "python -m pytest" in commands
    lint = [c for c in commands if c.startswith("python -m pyflakes")]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    assert 'python -m pip install -e ".[test]"' in ci  # the README's pip, as CI calls it
    assert any(line == "python -m pytest" or line.startswith("python -m pytest ||") for line in ci)
    assert len(lint) == 1 and lint[0] in ci


def markdown_files():
    docs = os.path.join(ROOT, "docs")
    return ([README, os.path.join(ROOT, "WORKSPACE_NOTES.md")]
            + sorted(os.path.join(docs, n) for n in os.listdir(docs) if n.endswith(".md")))


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves_to_a_file(path):
    with open(path) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # links inside code blocks are code
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    missing = []
    for target in targets:
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same file
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))
        if not os.path.isfile(resolved):
            missing.append(target)
    assert not missing, f"{os.path.relpath(path, ROOT)} links to missing files: {missing}"
