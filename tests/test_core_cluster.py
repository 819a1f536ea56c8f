"""The core engine on real localhost clusters: weights, step and gradient counts.

Each test starts a ps process and N + b worker processes with `launch_local`
and asserts numbers against a single-process computation.
"""

import collections
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_backup
import programs.common
import programs.core

pytestmark = pytest.mark.cluster


@pytest.mark.compat
def test_3_workers_0_backup_equals_large_batch_sgd_adam_and_rmsprop():
    """SGD and Adam applied on the ps tasks (apply_on_ps="auto"), RMSprop by the chief: the same as one big batch."""
    steps = 6
    out = tf_backup.launch_local(
        programs.core.train_regression, num_workers=3,
        kwargs=dict(steps=steps, num_backup_workers=0, optimizers=("sgd", "adam", "rmsprop")), timeout=240)
    for i, (name, inner) in enumerate([("sgd", keras.optimizers.SGD(0.1)),
                                       ("adam", keras.optimizers.Adam(0.05)),
                                       ("rmsprop", keras.optimizers.RMSprop(0.01))]):
        expected = programs.common.reference_fit(inner, lambda k: [3 * k, 3 * k + 1, 3 * k + 2], steps, 3)
        for worker in out:
            result = worker["results"][i]
            assert result["optimizer"] == name
            for got, want in zip(result["weights"], expected):
                np.testing.assert_allclose(got, want, atol=1e-5)
            assert result["stats"] == {
                "global_step": steps, "pushed": [steps] * 3, "taken": [steps] * 3, "dropped": [0] * 3,
                "cancelled": [0] * 3, "batches": [steps] * 3}
            assert result["history"]["global_step"] == [steps]
            assert result["history"]["fresh_gradients"] == [3.0]
            assert result["history"]["dropped_gradients"] == [0.0]
            assert result["missed_wakeups"] == 0  # every wait was ended by its wake-up token
            assert result["malloc_reapplies"] == steps  # one a step, in the exchange (tf_backup.memory)
        # Resuming the input before the first optimizer is built is refused, naming the fix.
        assert "call `optimizer.build(model.trainable_variables)`" in out[0]["results"][0]["early_resume_input"]
        assert out[0]["results"][1]["early_resume_input"] is None  # the first optimizer is built: it resumes
        # With the update on the chief (RMSprop), the chief read every step's parameters from what its
        # aggregator published; the others, and every worker under the update on the ps, from the ps.
        assert [worker["results"][i]["local_pulls"] for worker in out] == [steps if name == "rmsprop" else 0, 0, 0]
        chief = out[0]["results"][i]
        assert chief["contributions"] == [[1, 1, 1]] * steps
        for master, final in zip(chief["master"], chief["weights"]):  # read back from the ps at the fit's end
            np.testing.assert_array_equal(master, final)
    # The weights moved: the test would catch an engine that applied nothing.
    assert abs(float(out[0]["results"][0]["weights"][0][0, 0])) > 0.1
    # A running strategy's public calls refuse a bad value at once, naming the argument and the value.
    refused = {
        "distribute_dataset(resume_input='yes')": ("TypeError", "`resume_input` must be a bool. Received resume_input='yes'"),
        "distribute_dataset(resume_input=1)": ("TypeError", "`resume_input` must be a bool. Received resume_input=1"),
        "distribute_dataset(options=tf.data.Options())": (
            "TypeError", "`options` must be a tf.distribute.InputOptions or None. Received options=<"),
        "distribute_dataset(list)": ("TypeError", "`dataset` must be a tf.data.Dataset. Received dataset=[1, 2]"),
        "sleep_unless_superseded(-1)": ("ValueError", "`seconds` must be a finite number of seconds >= 0. "
                                                      "Received seconds=-1"),
        "sleep_unless_superseded(nan)": ("ValueError", "Received seconds=nan"),
        "sleep_unless_superseded(inf)": ("ValueError", "Received seconds=inf"),
        "sleep_unless_superseded('0.1')": ("ValueError", "Received seconds='0.1'"),
        "sleep_unless_superseded(None)": ("ValueError", "Received seconds=None"),
        "wait_for_fit_end(timeout=-1)": ("ValueError", "Received timeout=-1"),
    }
    assert set(programs.core.REFUSED_CALLS) == set(refused)
    for worker in out:
        for case, (kind, message) in refused.items():
            assert worker["refusals"][case] is not None, case
            assert worker["refusals"][case][0] == kind and message in worker["refusals"][case][1], (
                case, worker["refusals"][case])


def train_with_slow_worker_3(steps, **kwargs):
    """4 workers, b = 1, worker 3 slow (`kwargs` say how); checks every worker's weights against
    large-batch SGD on the three fast workers' batches. Returns every worker's first result."""
    out = tf_backup.launch_local(
        programs.core.train_regression, num_workers=4,
        kwargs=dict(steps=steps, num_backup_workers=1, slow_worker=3, **kwargs),
        timeout=240, ps_exit_grace=20)
    expected = programs.common.reference_fit(keras.optimizers.SGD(0.1), lambda k: [4 * k, 4 * k + 1, 4 * k + 2],
                                             steps, 4)
    results = [worker["results"][0] for worker in out]
    for result in results:
        for got, want in zip(result["weights"], expected):
            np.testing.assert_allclose(got, want, atol=1e-5)
    return results


@pytest.mark.compat
def test_3_workers_1_backup_drops_every_gradient_of_the_slow_worker():
    steps = 20
    results = train_with_slow_worker_3(steps, slow_seconds=0.3, barrier=True)
    stats = results[0]["stats"]
    for result in results:
        # After wait_for_fit_end every worker reads the same, final counts (the slow one ends last).
        assert result["late"] == [] and result["stats"] == stats
    assert stats["global_step"] == steps
    assert stats["taken"] == [steps, steps, steps, 0]
    assert stats["pushed"][:3] == [steps] * 3
    slow_pushed = stats["pushed"][3]
    # The slow worker pushed, every push was dropped, and steps went on without it.
    assert 1 <= slow_pushed < steps
    assert stats["dropped"] == [0, 0, 0, slow_pushed]
    # Each of its gradients was found late by one small read before its push, and never sent.
    assert [r["unsent"] for r in results] == [0, 0, 0, slow_pushed]
    assert results[0]["contributions"] == [[1, 1, 1, 0]] * steps
    # Every worker logs the cluster-wide count of dropped gradients.
    assert results[3]["history"]["dropped_gradients"][-1] >= slow_pushed - 1


def test_a_superseded_straggler_restarts_its_batch_on_the_new_step_and_pushes_it(tmp_path):
    # Worker 3's first sleep of every batch (60 s) is cut short by the next publish; it then pulls
    # that step into its model (`restart_superseded`) and pushes the same batch for it at once.
    steps = 12
    out = tf_backup.launch_local(programs.core.train_with_restarting_straggler, num_workers=4,
                                 args=(steps, str(tmp_path)), timeout=240, ps_exit_grace=20)
    slow = out[3]
    restarts = slow["restarts"]
    assert slow["fit_seconds"] < 60 and len(slow["cut"]) >= 2 and all(slow["cut"])
    assert len(restarts) == len(slow["cut"])
    # Each restart moved to a later step, except one the round's end cut short (None, the last).
    moved = [(old, new, weights) for old, new, weights in restarts if new is not None]
    assert moved == restarts or moved == restarts[:-1]
    assert len(moved) >= 2 and all(new > old for old, new, _ in moved)
    # The weights after a restart are exactly those the fast workers had at that step.
    published = {step: weights for worker in out[:3] for step, weights in worker["seen"]}
    checked = [new for _, new, weights in moved if new in published and weights == published[new]]
    assert sorted(checked) == sorted(new for _, new, _ in moved if new in published) and len(checked) >= 2
    # Each cut counts as cancelled; each restarted batch was pushed once, for the step it restarted
    # on. (Counts of the timed fit: the warm-up fit before it pushed too.)
    c = tf_backup.protocol.slots.Control(4)
    control, stats, before = slow["control"], slow["stats"], slow["stats_before"]
    assert before["cancelled"][3] == 0
    assert stats["cancelled"][3] == control[c.cancelled(3)] == len(restarts)
    assert stats["pushed"][3] - before["pushed"][3] == len(moved)
    # A restarted batch is one batch of input: the position counts it once, as it was pushed once.
    assert stats["batches"][3] == control[c.batches(3)] == stats["pushed"][3]
    assert control[c.last_tag(3)] == moved[-1][1]
    chief, chief_before = out[0]["stats"], out[0]["stats_before"]
    assert chief["global_step"] - chief_before["global_step"] == steps
    taken = sum(chief["taken"]) - sum(chief_before["taken"])
    assert 3 * steps <= taken <= 4 * steps  # at least N = 3 per step


def test_a_superseded_straggler_cancels_its_batches_instead_of_pushing_them(tmp_path):
    # Worker 3 "computes" 60 s per batch; each sleep is cut short by the next
    # publish (or the end of the round), so it never pushes and never holds up the end.
    # The fast workers start once worker 3 has started its fit: its sleeps overlap their steps.
    steps = 20
    results = train_with_slow_worker_3(steps, slow_seconds=60.0, cancel=True, gate_dir=str(tmp_path))
    stats = results[0]["stats"]
    assert stats["global_step"] == steps
    assert stats["taken"] == [steps, steps, steps, 0]
    assert stats["pushed"] == [steps, steps, steps, 0]
    cut = results[3]["sleeps_cut"]
    assert len(cut) >= 1 and all(cut)  # no 60 s sleep ran to its end
    # Each sleep was cut by what its wake-up read: every one but the last by a new step while the
    # round still ran (its batch cancelled, the next batch on that step); the last by a new step or
    # the round's end. A worker woken only at the round's end has one sleep, cut by the end.
    sleeps = [programs.common.Sleep(*s) for s in results[3]["sleeps"]]
    for sleep in sleeps[:-1]:
        assert sleep.seen_step > sleep.step and not sleep.round_stopped, sleeps
    assert sleeps[0].step == 0, sleeps  # the gate: its first sleep began before the first step
    assert [s.step for s in sleeps[1:]] == [s.seen_step for s in sleeps[:-1]], sleeps  # on the step that cut it
    assert sleeps[-1].round_stopped or sleeps[-1].seen_step > sleeps[-1].step, sleeps
    early = [s for s in sleeps if not s.round_stopped]
    assert len(early) >= 1, sleeps
    assert stats["cancelled"] == [0, 0, 0, len(cut)]
    assert stats["batches"] == [steps, steps, steps, len(cut)]  # a cancelled batch is dropped with its input
    assert results[3]["fit_seconds"] < 60


def replay_asynchronous(results, contributions, steps: int, learning_rate: float = 0.1):
    """The weights of asynchronous SGD replayed in one process from what the cluster recorded.

    Worker w's i-th batch (batch w + i W of `regression_data`) was computed on the parameters it
    recorded before it (`params`), and its gradients are taken in order: a step applies SGD to the
    mean of the gradients its contributions name, the next of each worker's.
    """
    num_workers = len(results)
    x, y = programs.common.regression_data(steps * num_workers)
    x, y = x.astype(np.float64), y.astype(np.float64)[:, 0]
    b = programs.common.BATCH
    gradients = []
    for w, result in enumerate(results):
        own = []
        for i, params in enumerate(result["params"]):
            rows = slice((w + i * num_workers) * b, (w + i * num_workers + 1) * b)
            params = np.array(params, np.float64)
            error = x[rows] @ params[:-1] + params[-1] - y[rows]  # d(mse)/d(prediction) = 2 error / b
            own.append(np.concatenate([2 / b * x[rows].T @ error, [2 / b * error.sum()]]))
        gradients.append(own)
    weights = np.zeros(programs.common.FEATURES + 1)
    used = [0] * num_workers
    for counts in contributions:
        taken = []
        for w, c in enumerate(counts):
            taken += gradients[w][used[w]:used[w] + c]
            used[w] += c
        weights -= learning_rate * np.mean(taken, axis=0)
    return weights, used


@pytest.mark.parametrize("slow_worker", [-1, 0])
def test_asynchronous_mode_applies_every_gradient(slow_worker):
    # With a slow chief (0.3 s before each batch), worker 1 ends its fit first while the chief
    # still pushes: the chief applies that gradient, and worker 1's final pull must come after.
    steps = 6
    out = tf_backup.launch_local(
        programs.core.train_regression, num_workers=2,
        kwargs=dict(steps=steps, asynchronous=True, slow_worker=slow_worker, slow_seconds=0.3), timeout=240)
    stats = out[0]["results"][0]["stats"]
    assert stats["dropped"] == [0, 0]
    assert stats["pushed"] == stats["taken"]
    assert steps in stats["pushed"]  # the first worker to finish ran all its steps
    # A step averages the gradients that arrived together: one step per take, each of at least one gradient,
    # and every worker's gradients each in one step.
    chief = out[0]["results"][0]
    assert stats["global_step"] == len(chief["contributions"])
    assert all(sum(c) >= 1 for c in chief["contributions"]), chief["contributions"]
    assert [sum(c[w] for c in chief["contributions"]) for w in range(2)] == stats["taken"]
    # Replayed in one process from the parameters each gradient was computed on, in the order
    # taken, the steps give the chief's weights.
    results = [worker["results"][0] for worker in out]
    assert [len(r["params"]) for r in results] == stats["pushed"]  # one push per batch
    replayed, used = replay_asynchronous(results, chief["contributions"], steps)
    assert used == stats["pushed"]
    master = np.concatenate([m.ravel() for m in chief["master"]])
    np.testing.assert_allclose(master, replayed, rtol=0, atol=1e-5)
    for worker in out:
        assert worker["results"][0]["stats"]["global_step"] == stats["global_step"]
        for got, want in zip(worker["results"][0]["weights"], chief["master"]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("what", ["model", "wire_dtype"])
def test_worker_with_another_model_or_wire_dtype_is_refused_and_the_others_train_on(what):
    steps = 4
    out = tf_backup.launch_local(programs.core.train_with_wrong_model, num_workers=3, args=(steps, what),
                                 timeout=240)
    if what == "model":
        assert "every worker must build the same model" in out[2]["error"]
        assert "kernel" in out[2]["error"] and "(3, 2)" in out[2]["error"] and "(3, 1)" in out[2]["error"]
    else:  # the chief's signature holds the wire dtype too
        assert out[2]["error"] == ("This task sends bfloat16 over the wire but the chief sends float32: give every "
                                   "task the same `wire_dtype` (the binary's --wire_dtype).")
    # Workers 0 and 1 (N = 2) trained as if worker 2 never existed: chief not corrupted.
    expected = programs.common.reference_fit(keras.optimizers.SGD(0.1), lambda k: [3 * k, 3 * k + 1], steps, 3)
    for worker in out[:2]:
        for got, want in zip(worker["weights"], expected):
            np.testing.assert_allclose(got, want, atol=1e-5)
    assert out[0]["stats"]["pushed"][2] == 0 and out[0]["stats"]["global_step"] == steps


@pytest.mark.parametrize("custom_loop", [False, True], ids=["fit", "eager_run"])
def test_chief_step_wait_times_out_naming_the_missing_worker(custom_loop):
    out = tf_backup.launch_local(programs.core.chief_waits_for_absent_worker, num_workers=2, args=(3.0, custom_loop),
                                 timeout=180)
    chief = out[0]
    # `fit` (in its first step, the one that traces) or `strategy.run` raised tf_backup's
    # StepTimeoutError itself, caught by type, not the UnknownError that carried it out of the step.
    assert chief["error"] is not None
    assert chief["error"].startswith("Worker 0 /job:worker/task:0 (")
    assert "waited 3 s for global step 1" in chief["error"]
    assert "worker 1 /job:worker/task:1" in chief["error"]
    assert chief["context"] == "UnknownError"
    # Out of `run` TensorFlow's error is the cause; `fit`'s traceback filtering clears every cause.
    assert chief["cause"] == ("UnknownError" if custom_loop else "NoneType")
    assert 3.0 <= chief["seconds"] < 60.0


def test_worker_startup_wait_times_out_naming_the_chief():
    out = tf_backup.launch_local(programs.core.worker_waits_for_absent_chief, num_workers=2, args=(4.0,),
                                 timeout=180)
    message = out[1]["error"]
    assert message is not None
    assert "chief /job:worker/task:0" in message and "shared state" in message


def test_keras_classifier_matches_the_inner_optimizer_alone_and_saves(tmp_path):
    steps = (80, 70)
    path = str(tmp_path / "classifier.keras")
    out = tf_backup.launch_local(programs.core.train_classifier, num_workers=3, args=(steps, path),
                                 timeout=300)
    chief = out[0]
    # Unset arguments come from the strategy; set ones are checked against it.
    assert "`total_num_replicas` must equal the number of workers" in chief["config_errors"][0]
    assert "total_num_replicas=5" in chief["config_errors"][0]
    assert "`replicas_to_aggregate` must not exceed the number of workers (3)" in chief["config_errors"][1]
    # Two fit rounds of 80 and 70 batches per worker. A round's global steps are not its batches: with
    # b = 1 a worker that falls a step behind pulls past a step it did not compute on (and has a batch
    # left at the round's end, for another step with a worker in the same case), and one that starts
    # round 2 on round 1's last step but one pushes a stale gradient first. (So the old range: 149-154.)
    # What is exact: each round ends on one step for every worker (its final parameters); a worker's
    # batches are on distinct steps of its round (the last may be on the round's last parameters, if
    # it began before the worker saw the stop: dropped); and the round's steps are exactly those at
    # least N = 2 of its batches were computed on (each step takes N gradients of its parameters).
    final_step = chief["stats"]["global_step"]
    ends = [r["end_steps"] for r in out]
    assert ends == [ends[0]] * 3, ends
    assert ends[0][1] == final_step
    start = 0
    for r, (batches, end) in enumerate(zip(steps, ends[0])):
        per_worker = [o["batch_steps"][r] for o in out]
        for own in per_worker:
            assert own == sorted(set(own)) and start - 1 <= own[0] and own[-1] <= end, (r, own, start, end)
        assert max(len(own) for own in per_worker) == batches  # the worker that ended the round ran them all
        computed = collections.Counter(t for own in per_worker for t in own if start <= t < end)
        assert sorted(t for t, n in computed.items() if n >= 2) == list(range(start, end)), (r, computed)
        start = end
    assert steps[0] <= chief["step_after_first"] <= final_step
    assert final_step >= steps[0] + steps[1] - 1
    assert chief["inner_iterations"] == final_step  # one inner update per global step
    stats = chief["stats"]
    assert [t + d for t, d in zip(stats["taken"], stats["dropped"])] == stats["pushed"]
    contributions = np.array(chief["contributions"])
    assert contributions.shape == (final_step, 3)  # one record per global step, none lost or doubled
    assert contributions.sum(axis=0).tolist() == stats["taken"]
    assert contributions.sum(axis=1).min() >= 2  # each step averaged at least N fresh gradients
    assert max(stats["pushed"]) <= steps[0] + steps[1]  # a push per batch, at most the fits' batches
    for worker in out[1:]:
        for a, b in zip(worker["weights"], chief["weights"]):
            np.testing.assert_array_equal(a, b)
    # Same data, the inner optimizer alone, the same number of updates. Which gradients won each
    # step decided its examples and their number (2 or 3 batches of 32): a single process spans
    # those choices with other data orders and initial weights, at batch 64 and 96. The job must
    # do as well as the worst of them, less their spread (at least 3 standard errors of a
    # 2000-example test accuracy): the noise of the comparison itself.
    (x, y), (x_test, y_test) = programs.core.classification_data()
    alone_accuracies = []
    for seed, batch in ((0, 64), (1, 64), (0, 96), (1, 96)):
        keras.utils.set_random_seed(seed)
        alone = programs.core.classifier(keras)
        alone.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        alone.fit(tf.data.Dataset.from_tensor_slices((x, y)).shuffle(4000, seed=1 + seed).batch(batch).repeat(),
                  steps_per_epoch=final_step, verbose=0)
        alone_accuracies.append(alone.evaluate(x_test, y_test, verbose=0)[1])
    assert min(alone_accuracies) > 0.8
    mean = float(np.mean(alone_accuracies))
    margin = max(max(alone_accuracies) - min(alone_accuracies), 3 * math.sqrt(mean * (1 - mean) / len(y_test)))
    assert chief["accuracy"] >= min(alone_accuracies) - margin, (chief["accuracy"], alone_accuracies, margin)
    # The chief's saved model loads anywhere, with its optimizer state.
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, tf_backup.SyncReplicasOptimizer)
    assert int(loaded.optimizer.inner_optimizer.iterations.numpy()) == final_step
    for a, b in zip(loaded.get_weights(), chief["weights"]):
        np.testing.assert_array_equal(a, b)
    _, loaded_accuracy = loaded.evaluate(x_test, y_test, verbose=0)
    assert loaded_accuracy == pytest.approx(chief["accuracy"], abs=1e-6)
