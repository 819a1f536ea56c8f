"""The training binary: configs, flags, bad input, and one real run on a local cluster."""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

from absl import flags
from absl.testing import flagsaver
import pytest
import tensorflow as tf

from trainers import config as config_lib
from trainers import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_binary(*args, env=None, timeout=240):
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    full_env.pop("TF_CONFIG", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "trainers.train", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(autouse=True)
def parsed_flags():
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["test"])


def test_every_shipped_config_is_valid_and_flags_override_it():
    assert {"mnist1d", "mnist1d_mlp", "mnist", "cifar10", "regression"} <= set(config_lib.available())
    for name in config_lib.available():
        config_lib.TrainConfig.from_dict(config_lib.read(name))
    with flagsaver.flagsaver(config="mnist1d", num_workers=7, num_backup_workers="2", steps=30,
                             straggler="pareto:1.5:0.01", optimizer="momentum"):
        config = train.resolve_config()
    assert (config.num_workers, config.num_backup_workers, config.replicas_to_aggregate) == (7, 2, 5)
    assert (config.steps, config.epochs) == (30, None)  # --steps replaces the config's epochs
    assert config.straggler == "pareto:1.5:0.01" and config.optimizer == "momentum"
    with flagsaver.flagsaver(config="mnist1d", mode="sync"):
        assert train.resolve_config().num_backup_workers == 0  # sync means b = 0
    with flagsaver.flagsaver(config="mnist1d", num_workers=6, num_backup_workers="auto", min_replicas_to_aggregate=3):
        config = train.resolve_config()
    assert config.adaptive and config.replicas_to_aggregate == 6 and config.tolerated_failures == 3
    assert config.strategy_args() == dict(num_backup_workers="auto", asynchronous=False,
                                          min_replicas_to_aggregate=3, max_replicas_to_aggregate=None)


def test_schedule_counts_global_steps_per_mode():
    base = config_lib.TrainConfig.from_dict(config_lib.read("mnist1d"))  # 5 workers, b = 1, batch 32
    assert base.replace(epochs=2).schedule(4000) == (2, 32)  # ceil(4000 / (4 * 32)) steps per epoch
    assert base.replace(steps=100).schedule(4000) == (1, 100)
    assert base.replace(mode="async", steps=100).schedule(4000) == (1, 20)  # 5 workers share them


@pytest.mark.parametrize("overrides, message", [
    (dict(num_backup_workers=5), "--num_backup_workers must be below --num_workers (5). Received num_backup_workers=5"),
    (dict(mode="sync_backup", num_backup_workers=0), "--mode=sync_backup needs --num_backup_workers >= 1"),
    (dict(learning_rate=-1.0), "Received learning_rate=-1.0"),
    (dict(optimizer="lamb"), "Received optimizer='lamb'"),
    (dict(max_replicas_to_aggregate=3), "it needs --num_backup_workers=auto. Received max_replicas_to_aggregate=3"),
    (dict(num_backup_workers="auto", max_replicas_to_aggregate=6),
     "<= --num_workers (5). Received min_replicas_to_aggregate=None, max_replicas_to_aggregate=6"),
    (dict(num_backup_workers="auto", min_replicas_to_aggregate=0), "--min_replicas_to_aggregate must be an integer >= 1"),
])
def test_bad_values_name_the_flag(overrides, message):
    base = config_lib.TrainConfig.from_dict(config_lib.read("mnist1d"))
    with pytest.raises(config_lib.ConfigError) as info:
        base.replace(**overrides)
    assert message in str(info.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="--config=nope: no such config; known: cifar10"):
        config_lib.read("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(config_lib.ConfigError, match="not valid JSON"):
        config_lib.read(str(bad))
    bad.write_text(json.dumps({"dataset": "mnist1d", "model": {"kind": "mlp"}, "epochs": 1, "colour": 1}))
    with pytest.raises(config_lib.ConfigError, match="Unknown config field.s. colour"):
        config_lib.TrainConfig.from_dict(config_lib.read(str(bad)))


def test_the_default_model_dir_cannot_shadow_a_package():
    """A run without --model_dir leaves a directory in /tmp that `import tf_backup` must not find there."""
    path = train.default_model_dir(now=0.0)
    parent = os.path.dirname(path)
    assert parent == os.path.join(tempfile.gettempdir(), "tf_backup_runs")
    assert os.path.basename(path) == time.strftime("%Y%m%d-%H%M%S", time.localtime(0.0))
    packages = {name for name in os.listdir(ROOT) if os.path.exists(os.path.join(ROOT, name, "__init__.py"))}
    assert {"tf_backup", "trainers"} <= packages
    assert os.path.basename(parent) not in packages


@pytest.mark.parametrize("user_level, level", [(None, "2"), ("0", "0")])
def test_the_binary_defaults_tensorflows_log_level_before_importing_it(user_level, level):
    """Quiet start-up (TF_CPP_MIN_LOG_LEVEL=2) unless the user set the level: set before TensorFlow loads."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if user_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = user_level
    out = subprocess.run(
        [sys.executable, "-c", "import os, sys; import trainers.train; "
                               "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), 'tensorflow' in sys.modules)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == [level, "False"], out.stdout + out.stderr


@pytest.mark.parametrize("arg", [
    "--num_workers=0", "--num_workers=1.5", "--min_replicas_to_aggregate=0", "--max_replicas_to_aggregate=-1",
    "--num_ps=0", "--steps=0", "--epochs=-1", "--batch_size=0", "--batch_size=many", "--learning_rate=nan",
    "--learning_rate=inf", "--optimizer=lamb", "--mode=fast", "--cancel_stragglers=yes", "--restart_stragglers=2",
    "--seed=-1", "--local_cluster=yes", "--restart_failed=no", "--ps_restart_timeout=-1",
    "--ps_restart_timeout=inf", "--ps_restart_timeout=nan", "--chief_rejoins=yes", "--wire_dtype=int8",
    "--apply_on_ps=on", "--max_restarts=0", "--log_every=0", "--timeout=0.5", "--timeout=nan",
    "--startup_timeout=inf", "--step_timeout=nan", "--worker_timeout=0", "--chief_timeout=inf",
    "--checkpoint_every=0", "--jit_compile=yes",
])
def test_every_flag_refuses_a_bad_value_when_parsed_naming_it(arg):
    """Bools must be bools, numbers finite and in range: refused by the parser, before anything starts."""
    with flagsaver.flagsaver():
        with pytest.raises(flags.IllegalFlagValueError) as info:
            flags.FLAGS([train.PROG, arg])
    assert str(info.value).startswith(f"flag {arg}: "), str(info.value)


@pytest.mark.parametrize("args, message", [
    (["--step_timeout=nan"], "flag --step_timeout=nan: must be a finite number"),
    (["--chief_rejoins=yes"], "flag --chief_rejoins=yes"),
    (["--num_workers=3", "--num_backup_workers=3"], "--num_backup_workers must be below --num_workers (3)"),
    (["--config=nope"], "--config=nope: no such config"),
    (["--mode=fast"], "flag --mode=fast"),
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--steps=0"], "--steps=0"),
    (["--num_backup_workers=some"], '--num_backup_workers must be an integer >= 0 or "auto". Received '
                                    "num_backup_workers='some'"),
    (["--straggler=pareto:x"], "--straggler=pareto:x"),
    (["--config=regression", "--steps=1", "positional"], "Unexpected arguments ['positional']"),
    (["--config=regression", "--optimizer=rmsprop", "--apply_on_ps"],
     "--apply_on_ps supports --optimizer=sgd, momentum or adam. Received optimizer='rmsprop'"),
    (["--config=regression", "--local_cluster=false", "--restart_failed"], "--restart_failed supervises the tasks"),
    (["--max_restarts=0"], "flag --max_restarts=0"),
])
def test_usage_errors_exit_2_with_one_line(args, message):
    out = run_binary(*args, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("tf-backup-train: error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_num_workers_that_disagrees_with_tf_config_is_a_usage_error_before_anything_starts():
    """The chief's schedule and N come from --num_workers: a cluster of another size is refused at once."""
    tf_config = {"cluster": {"worker": ["localhost:1", "localhost:2"], "ps": ["localhost:3"]},
                 "task": {"type": "worker", "index": 1}}  # nothing listens there: nothing is reached
    out = run_binary("--config=regression", "--num_workers=3", "--mode=sync", "--startup_timeout=600",
                     env={"TF_CONFIG": json.dumps(tf_config)}, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("tf-backup-train: error:")]
    assert lines == ["tf-backup-train: error: --num_workers=3 but TF_CONFIG's cluster has 2 workers (worker/0, "
                     "worker/1): set --num_workers to the number of its chief and worker tasks. Received "
                     "num_workers=3"], out.stderr


def test_check_cluster_refuses_a_cluster_of_another_size_by_type():
    config = config_lib.TrainConfig.from_dict(config_lib.read("regression")).replace(num_workers=3, mode="sync")
    spec = tf.train.ClusterSpec({"chief": ["h:1"], "worker": ["h:2"], "ps": ["h:3"]})
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(spec, task_type="worker", task_id=0)
    with pytest.raises(config_lib.ConfigError, match="--num_workers=3 but TF_CONFIG's cluster has 2 workers "
                                                     "\\(chief/0, worker/0\\)"):
        train.check_cluster(config, resolver)
    train.check_cluster(config.replace(num_workers=2), resolver)  # the same size: no error


def test_malformed_tf_config_is_a_usage_error():
    out = run_binary("--config=regression", env={"TF_CONFIG": '{"cluster": {"ps": ["h:1"]'}, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "tf-backup-train: error: TF_CONFIG is not valid JSON" in out.stderr


def test_dataset_that_cannot_load_offline_is_a_usage_error(tmp_path):
    out = run_binary("--config=mnist", f"--data_dir={tmp_path}", "--steps=1", timeout=120)
    assert out.returncode == 2, out.stderr
    assert "mnist" in out.stderr and "mnist1d" in out.stderr  # names the dataset, offers the default


def test_unreachable_tf_config_address_fails_naming_it():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
    tf_config = {"cluster": {"worker": ["localhost:1"], "ps": [f"localhost:{port}"]},
                 "task": {"type": "worker", "index": 0}}
    out = run_binary("--config=regression", "--num_workers=1", "--mode=sync", "--startup_timeout=2",
                     env={"TF_CONFIG": json.dumps(tf_config)}, timeout=120)
    assert out.returncode == 1, out.stderr
    assert f"localhost:{port}" in out.stderr and "2 s" in out.stderr


def run_with_trace(tmp_path, trace_text, steps, *flags):
    """Runs the regression job on a local cluster with a straggler trace; returns (process, summary)."""
    trace = tmp_path / "trace.csv"
    trace.write_text(trace_text)
    summary_path = tmp_path / "summary.json"
    out = run_binary("--config=regression", f"--steps={steps}", f"--straggler=trace:{trace}", *flags,
                     f"--model_dir={tmp_path / 'model'}", f"--summary_json={summary_path}", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out, json.loads(summary_path.read_text())


@pytest.mark.cluster
def test_cancel_stragglers_cancels_every_batch_of_a_worker_that_is_always_late(tmp_path):
    out, summary = run_with_trace(tmp_path, "0,0,30\n", 12, "--cancel_stragglers")  # worker 2: 30 s per batch
    g, late = summary["gradients"], summary["workers"][2]
    assert summary["steps"] == 12 and summary["config"]["cancel_stragglers"] is True
    assert g["taken"][:2] == [12, 12] and g["pushed"][:2] == [12, 12]
    # Every batch worker 2 began was superseded before its 30 s were up: none pushed.
    assert late["pushed"] == 0 and late["cancelled"] == late["local_batches"] >= 1
    assert late["straggler_delay_seconds"] < 30
    assert f"cancelled: {late['cancelled']}" in out.stdout


@pytest.mark.cluster
def test_restart_stragglers_pushes_every_restarted_batch_for_the_new_step(tmp_path):
    # Worker 2 draws 30 s, is cut short by the next publish, restarts on the new step and draws 0 s:
    # each of its batches is restarted once and pushed. The others take 0.3 s per batch.
    _, summary = run_with_trace(tmp_path, "0.3,0.3,30\n0.3,0.3,0\n", 20, "--restart_stragglers")
    late = summary["workers"][2]
    assert summary["steps"] == 20 and summary["config"]["restart_stragglers"] is True
    assert late["restarted"] >= 1
    assert late["pushed"] == late["restarted"]  # each batch of worker 2 pushed after its restart
    for worker in summary["workers"]:  # (workers 0 and 1 may be superseded too: N = 2 of 3)
        # A restarted batch is pushed once, for its new step; only a cut that the round's stop made
        # (the last batch) is not restarted.
        assert worker["cancelled"] - worker["restarted"] in (0, 1)
        assert worker["pushed"] == worker["local_batches"] - (worker["cancelled"] - worker["restarted"])
        assert worker["taken"] + worker["dropped"] == worker["pushed"]


def test_cancel_and_restart_stragglers_are_exclusive(tmp_path):
    out = run_binary("--config=regression", "--cancel_stragglers", "--restart_stragglers",
                     f"--model_dir={tmp_path / 'model'}", timeout=120)
    assert out.returncode != 0
    assert "at most one of --cancel_stragglers" in out.stderr and "--restart_stragglers" in out.stderr


@pytest.mark.compat
@pytest.mark.cluster
def test_short_run_on_a_local_cluster_writes_a_consistent_summary(tmp_path):
    summary_path = tmp_path / "summary.json"
    model_dir = tmp_path / "model"
    out = run_binary("--config=regression", "--steps=12", "--log_every=4", "--straggler=slow:2:3",
                     f"--model_dir={model_dir}", f"--summary_json={summary_path}", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(summary_path.read_text())
    assert summary == json.loads((model_dir / "summary.json").read_text())
    g = summary["gradients"]
    assert [t + d for t, d in zip(g["taken"], g["dropped"])] == g["pushed"]
    assert summary["num_workers"] == 3 and summary["replicas_to_aggregate"] == 2
    assert summary["steps"] == 12 and summary["resumed_from_step"] == 0  # max_steps: exactly
    assert summary["worker_events"] == [] and summary["task_restarts"] == {}
    # At least N = 2 gradients per step; a take averages all that arrived, so at most 3.
    assert 2 * summary["steps"] <= sum(g["taken"]) <= 3 * summary["steps"]
    assert summary["steps_per_second"] == pytest.approx(summary["steps"] / summary["wall_seconds"])
    assert [w["worker"] for w in summary["workers"]] == [0, 1, 2]
    assert summary["workers"][2]["straggler_delay_seconds"] > 0
    assert summary["workers"][0]["straggler_delay_seconds"] == 0
    assert summary["test_accuracy"] is None and summary["test_loss"] < summary["history"]["loss"][0]
    assert "slow" in summary["straggler"]
    progress = [l for l in out.stdout.splitlines() if l.startswith("train | step: ")]
    assert len(progress) >= 2, out.stdout
    assert any(l.startswith("summary | steps: ") for l in out.stdout.splitlines())
    assert os.listdir(model_dir / "tensorboard") and (model_dir / "model.keras").exists()
    assert json.loads((model_dir / "config.json").read_text())["steps"] == 12
    assert summary["jit_compile"] is False  # --jit_compile=auto: Keras turns XLA off under a strategy
    # Nothing in the workers' logs that this binary could have avoided (the chief's is echoed in full).
    for task in ("worker-0", "worker-1", "worker-2"):
        log = (model_dir / "logs" / f"{task}.log").read_text()
        assert "`shuffle=True` was passed" not in log, log[-2000:]

    # The same command again, with more steps, resumes from the final checkpoint; this time the
    # replica step is compiled with XLA.
    assert tf.train.latest_checkpoint(model_dir / "checkpoints" / "opt0").endswith("ckpt-12")
    # N is chosen every step (adaptive N); these 5 steps are all in its warmup (5 takes), which waits
    # for all 3. (A sixth step's N is the rule's choice: it may be 1 or 2 here.)
    out = run_binary("--config=regression", "--steps=17", "--log_every=4", f"--model_dir={model_dir}",
                     "--jit_compile=true", "--num_backup_workers=auto", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    resumed = json.loads((model_dir / "summary.json").read_text())
    assert resumed["jit_compile"] is True
    assert resumed["resumed_from_step"] == 12 and resumed["steps"] == 17
    assert "resumed from the checkpoint of global step 12" in out.stdout
    assert sum(resumed["gradients"]["taken"]) >= 2 * 5  # this run's 5 steps (counts are per job)
    assert resumed["test_loss"] <= summary["test_loss"] * 1.5
    assert summary["replicas_per_step"] is None  # a fixed N
    assert resumed["num_backup_workers"] == "auto"
    assert resumed["replicas_per_step"] == {"min": 3, "median": 3.0, "max": 3, "last": 3, "steps_with": {"3": 5},
                                            "noise_scale": resumed["replicas_per_step"]["noise_scale"]}
    assert "summary | adaptive N: min 3, median 3, max 3, last 3 | steps with N = 3: 5" in out.stdout
    lines = [l for l in out.stdout.splitlines() if l.startswith("train | step: ")]
    assert lines and all(" | N: 3 | " in l for l in lines), lines


@pytest.mark.cluster
def test_the_update_on_two_ps_tasks_in_bfloat16_trains_checkpoints_and_resumes(tmp_path):
    model_dir = tmp_path / "model"
    flags = ["--config=regression", "--optimizer=momentum", "--num_ps=2", "--apply_on_ps", "--wire_dtype=bfloat16",
             f"--model_dir={model_dir}"]
    out = run_binary(*flags, "--steps=12", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["test_loss"] < summary["history"]["loss"][0]
    g = summary["gradients"]
    assert [t + d for t, d in zip(g["taken"], g["dropped"])] == g["pushed"]
    assert tf.train.latest_checkpoint(model_dir / "checkpoints" / "opt0").endswith("ckpt-12")
    # The master copy and the momentum read back from the ps tasks resume the job.
    out = run_binary(*flags, "--steps=16", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    resumed = json.loads((model_dir / "summary.json").read_text())
    assert resumed["resumed_from_step"] == 12 and resumed["steps"] == 16
    assert resumed["test_loss"] <= summary["test_loss"] * 1.5


def readme_main_output_patterns():
    """The main job's output as the README shows it, each line a regular expression (its numbers any)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    [block] = re.findall(r"The main job starts .*?\n```\n(.*?)```", readme, re.S)
    patterns = []
    for line in block.splitlines():
        line = line.rstrip()
        open_end = line.endswith("...")
        pattern = re.sub(r"\\\.\\\.\\\.$", "", re.escape(line))
        pattern = re.sub(r"\d+(\\\.\d+)?", r"[0-9.]+", pattern)
        patterns.append("^" + pattern + ("" if open_end else "$"))
    assert len(patterns) == 3, block
    return patterns


@pytest.mark.cluster
def test_the_main_command_with_fewer_epochs_prints_the_readmes_summary(tmp_path):
    """`tf-backup-train` as the README runs it (the CNN on MNIST-1D, 4 + 1 workers, exponential stragglers),
    with 3 epochs instead of 30: the summary the README shows, backups that mattered, a model that learnt."""
    out = run_binary(f"--model_dir={tmp_path}", "--epochs=3", timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["dataset"] == "mnist1d" and summary["config"]["model"]["kind"] == "cnn"
    assert (summary["num_workers"], summary["replicas_to_aggregate"]) == (5, 4)
    assert summary["steps"] == 3 * 32
    assert summary["update_on_ps"] is True  # apply_on_ps="auto" with Adam
    assert sum(summary["gradients"]["dropped"]) > 0  # the exponential stragglers made backups useful
    # Chance is 0.1; this job had 0.54 after 117 steps in benchmarks/results/full/time_to_accuracy.csv.
    assert summary["test_accuracy"] >= 0.3, summary["test_accuracy"]
    lines = out.stdout.splitlines()
    for pattern in readme_main_output_patterns():
        assert any(re.match(pattern, line) for line in lines), (pattern, out.stdout[-3000:])


@pytest.mark.slow
@pytest.mark.cluster
def test_the_main_command_reaches_the_cnn_reference_on_mnist1d(tmp_path):
    """The README's main job with no arguments (about 2 minutes here)."""
    out = run_binary(f"--model_dir={tmp_path}", timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    # Published MNIST-1D CNN reference: about 94%; a small CNN in 30 epochs gets close.
    assert summary["test_accuracy"] >= 0.85, summary["test_accuracy"]
    assert sum(summary["gradients"]["dropped"]) > 0  # the exponential stragglers made backups useful
    assert summary["steps"] == 30 * 32
