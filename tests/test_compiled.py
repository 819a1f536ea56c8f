"""Compiled steps (XLA): the replica step compiled, the exchange on the host (tf_backup.frontend.exchange).

Cluster tests train with `jit_compile=True` and compare weights and counts with
single-process references and with the same training not compiled. Unit tests
check, without a cluster, what the design relies on in TensorFlow: which traces
are compiled, and that the strategy's iterators run the exchange before each
batch inside Keras-like functions.
"""

import math
import threading
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_backup
from tf_backup import _checks
from tf_backup.frontend import exchange
from tf_backup.frontend import iterator_reaper
import programs.common
import programs.compiled
import programs.core
import programs.embedding


@pytest.mark.compat
def test_in_compiled_context_is_true_only_while_tracing_an_xla_function():
    seen = {}

    @tf.function(jit_compile=True)
    def compiled(x):
        seen["xla"] = exchange.in_compiled_context()
        return x + 1

    @tf.function
    def host(x):
        seen["host"] = exchange.in_compiled_context()
        return compiled(x)

    seen["eager"] = exchange.in_compiled_context()
    assert float(host(tf.constant(1.0))) == 2.0
    assert seen == {"eager": False, "host": False, "xla": True}


class _CountingExtended:
    """Stands in for the strategy's `exchange_pending`: counts the exchanges each run executes."""

    def __init__(self):
        self.count = tf.Variable(0, dtype=tf.int64)

    def exchange_pending(self):
        self.count.assign_add(1)


def _exchanging_iterator(strategy, counter, elements=10):
    strategy.extended.exchange_pending = counter.exchange_pending  # the instance only
    dataset = exchange.exchanging(strategy.experimental_distribute_dataset(
        tf.data.Dataset.range(elements).batch(1)))
    iterator = iter(dataset)
    assert type(iterator) is exchange.ExchangingIterator  # pylint: disable=unidiomatic-typecheck
    return iterator


@pytest.mark.compat
def test_the_iterator_runs_the_exchange_before_each_batch_inside_tf_functions():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    counter = _CountingExtended()
    iterator = _exchanging_iterator(strategy, counter)
    kinds = []

    @tf.function
    def three_batches(it):
        kinds.append(type(it))  # rebuilt from its type spec inside the function
        return [it.get_next() for _ in range(3)]

    @tf.function
    def until_empty(it):  # Keras's steps_per_execution loop: get_next_as_optional in a while loop
        total = tf.constant(0, tf.int64)
        optional = it.get_next_as_optional()
        while optional.has_value():
            total += tf.reduce_sum(optional.get_value())
            optional = it.get_next_as_optional()
        return total

    got = [int(x[0]) for x in three_batches(iterator)]
    assert got == [0, 1, 2] and int(counter.count) == 3
    assert kinds == [exchange.ExchangingIterator]
    assert int(next(iterator)[0]) == 3 and int(counter.count) == 4  # eager too
    assert int(until_empty(iterator)) == sum(range(4, 10))
    assert int(counter.count) == 4 + 7  # six batches and the fetch that found none


@pytest.mark.compat
def test_a_dropped_iterator_is_destroyed_on_its_strategys_reaper_thread():
    # TensorFlow's iterator destructor can block the thread that drops it for up to a minute
    # (tf_backup.frontend.iterator_reaper): Keras drops a fit's iterator as `fit` returns.
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    reaper = iterator_reaper.IteratorReaper(name="reaper-of-this-test")
    strategy.extended.iterator_reaper = reaper  # the instance only, as BackupWorkerStrategy's extended has it
    iterator = _exchanging_iterator(strategy, _CountingExtended())
    assert int(next(iterator)[0]) == 0
    destroyed = []
    refs = [weakref.ref(part, lambda _: destroyed.append(threading.current_thread().name))
            for part in iterator._iterators]  # pylint: disable=protected-access
    del iterator
    _checks.poll_until(lambda: reaper.dropped == 1, timeout=10.0, first=0.01, longest=0.05,
                       on_timeout=lambda waited: AssertionError(f"not dropped in {waited:.0f} s"))
    assert refs and destroyed == ["reaper-of-this-test"] * len(refs)
    assert reaper.released == 1
    reaper.close()


def test_the_iterator_of_datasets_from_a_function_exchanges_too():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    counter = _CountingExtended()
    strategy.extended.exchange_pending = counter.exchange_pending
    dataset = exchange.exchanging(strategy.distribute_datasets_from_function(
        lambda context: tf.data.Dataset.range(4).batch(1)))
    assert [int(x[0]) for x in dataset] == [0, 1, 2, 3]
    assert int(counter.count) == 5  # four batches and the end


@pytest.mark.cluster
def test_the_compiled_function_has_no_py_function_and_no_ps_op_and_the_host_exchanges():
    (out,) = tf_backup.launch_local(programs.compiled.inspect_compiled_step, num_workers=1, timeout=180)
    assert len(out["compiled"]) == 1
    compiled, host = out["compiled"][0], out["host"]
    assert "AssignVariableOp" in compiled["ops"]  # it writes the gradient buffers
    assert not {"EagerPyFunc", "PyFunc"} & set(compiled["ops"])
    assert not [d for d in compiled["devices"] if "/job:ps" in d]
    assert "EagerPyFunc" in host["ops"]  # the exchange: outside the compiled function
    assert out["global_step"] == 1 and out["stats"]["pushed"] == [1] and out["stats"]["taken"] == [1]


@pytest.mark.compat
@pytest.mark.cluster
def test_xla_3_workers_0_backup_equal_large_batch_sgd_and_adam_also_several_steps_per_execution():
    steps = 6
    out = tf_backup.launch_local(
        programs.core.train_regression, num_workers=3,
        kwargs=dict(steps=steps, optimizers=("sgd", "adam"), jit_compile=True, steps_per_execution=2),
        timeout=240)
    for i, inner in enumerate([keras.optimizers.SGD(0.1), keras.optimizers.Adam(0.05)]):
        expected = programs.common.reference_fit(inner, lambda k: [3 * k, 3 * k + 1, 3 * k + 2], steps, 3)
        for worker in out:
            result = worker["results"][i]
            for got, want in zip(result["weights"], expected):
                np.testing.assert_allclose(got, want, atol=1e-5)
            assert result["stats"] == {"global_step": steps, "pushed": [steps] * 3, "taken": [steps] * 3,
                                       "dropped": [0] * 3, "cancelled": [0] * 3, "batches": [steps] * 3}
            # A compiled batch's logs are read inside the compiled step, before its exchange: the step before.
            assert result["history"]["global_step"] == [steps - 1]
        assert out[0]["results"][i]["contributions"] == [[1, 1, 1]] * steps
    assert abs(float(out[0]["results"][0]["weights"][0][0, 0])) > 0.1


@pytest.mark.cluster
def test_xla_4_workers_1_backup_never_apply_the_slow_workers_gradients():
    steps = 12
    out = tf_backup.launch_local(
        programs.core.train_regression, num_workers=4,
        kwargs=dict(steps=steps, num_backup_workers=1, slow_worker=3, slow_seconds=0.3, barrier=True,
                    jit_compile=True),
        timeout=240, ps_exit_grace=20)
    expected = programs.common.reference_fit(keras.optimizers.SGD(0.1), lambda k: [4 * k, 4 * k + 1, 4 * k + 2],
                                     steps, 4)
    results = [worker["results"][0] for worker in out]
    stats = results[0]["stats"]
    for result in results:
        assert result["stats"] == stats
        for got, want in zip(result["weights"], expected):
            np.testing.assert_allclose(got, want, atol=1e-5)
    assert stats["global_step"] == steps and stats["taken"] == [steps, steps, steps, 0]
    assert stats["pushed"][3] >= 1 and stats["dropped"] == [0, 0, 0, stats["pushed"][3]]
    assert results[0]["contributions"] == [[1, 1, 1, 0]] * steps


@pytest.mark.cluster
def test_a_custom_loop_with_an_xla_replica_function_equals_large_batch_sgd():
    steps = 5
    out = tf_backup.launch_local(programs.compiled.train_regression_custom_loop, num_workers=2,
                                 kwargs=dict(steps=steps, jit_compile=True), timeout=240)
    expected = programs.common.reference_fit(keras.optimizers.SGD(0.1), lambda k: [2 * k, 2 * k + 1], steps, 2)
    for worker in out:
        for got, want in zip(worker["weights"], expected):
            np.testing.assert_allclose(got, want, atol=1e-5)
        assert worker["stats"]["global_step"] == steps and worker["stats"]["taken"] == [steps, steps]
        assert worker["optimizer_iterations"] == steps


@pytest.mark.cluster
def test_split_steps_of_2_workers_x_2_devices_equal_4_single_device_workers():
    # XLA cannot compile for several logical CPU devices (they share one XLA device; MirroredStrategy
    # fails the same way), so this runs the compiled path's split (per-replica buffers summed on
    # the host, exchange after `run`) without XLA itself.
    steps = 5
    multi = tf_backup.launch_local(programs.compiled.train_regression_custom_loop, num_workers=2,
                                   kwargs=dict(steps=steps, local_devices=2, jit_compile=False,
                                               always_split=True), timeout=240)
    expected = programs.common.reference_fit(keras.optimizers.SGD(0.1), lambda k: [4 * k + i for i in range(4)],
                                             steps, 4)
    for worker in multi:
        for got, want in zip(worker["weights"], expected):
            np.testing.assert_allclose(got, want, atol=1e-5)
        for copies in worker["per_device"]:
            np.testing.assert_array_equal(copies[0], copies[1])
        assert worker["stats"]["taken"] == [steps, steps]


@pytest.mark.cluster
def test_the_multi_device_custom_loop_as_a_user_writes_it_compiles_each_replica_and_exchanges_on_the_host():
    # The test above runs the split with `always_split` set. Here nothing is set but the
    # replica function's jit_compile: the public path must take the same split by itself.
    (out,) = tf_backup.launch_local(programs.compiled.inspect_multi_device_custom_loop, num_workers=1, timeout=180)
    assert out["replicas"] == 2
    assert out["compiled"]  # the replica step is an XLA function ...
    for compiled in out["compiled"]:
        assert "AssignVariableOp" in compiled["ops"]  # ... that writes the gradient buffers
        assert not {"EagerPyFunc", "PyFunc"} & set(compiled["ops"])  # no exchange inside it
        assert not [d for d in compiled["devices"] if "/job:ps" in d]
    # ... and the exchange runs on the host, after the replicas.
    assert "EagerPyFunc" in out["host"]["ops"], out
    # Running it needs one XLA device per replica (GPUs): logical CPU devices share one, and XLA
    # refuses the second replica's variables, as it does under MirroredStrategy: the replica on
    # CPU:1 did run its step compiled. If a TensorFlow release lifts this, this test fails:
    # compare the weights with the test above's then.
    assert out["error"] is not None, out
    kind, message = out["error"]
    assert "Trying to access resource" in message and "device:CPU:1 from device" in message, out["error"]


@pytest.mark.cluster
def test_xla_embedding_model_trains_by_rows_as_without_xla(shared_launch):
    steps = 6  # without XLA: test_embedding.py's run of 1 device (`shared_launch`)
    runs = {jit: shared_launch(programs.embedding.train_embedding, num_workers=2,
                               kwargs=dict(steps=steps, jit_compile=jit), timeout=240)
            for jit in (True, False)}
    for compiled, plain in zip(runs[True], runs[False]):
        assert compiled["sparse_tables"] == [[programs.embedding.VOCAB, 3]] and compiled["dense_elements"] == 3 + 1
        assert compiled["stats"] == plain["stats"] and compiled["stats"]["taken"] == [steps, steps]
        for got, want in zip(compiled["weights"], plain["weights"]):
            np.testing.assert_allclose(got, want, atol=1e-6)
    table, initial = runs[True][0]["weights"][0], runs[True][0]["initial"][0]
    assert 0 < int((np.abs(table - initial).max(axis=1) > 0).sum()) < programs.embedding.VOCAB  # some rows moved


@pytest.mark.cluster
def test_xla_mixed_precision_through_keras_loss_scale_optimizer_as_without_xla():
    runs = {jit: tf_backup.launch_local(programs.compiled.train_mixed_precision, num_workers=2,
                                        kwargs=dict(steps=6, jit_compile=jit), timeout=240)
            for jit in (True, False)}
    for compiled, plain in zip(runs[True], runs[False]):
        assert compiled["optimizer"] == "LossScaleOptimizer"
        assert compiled["stats"] == plain["stats"] and compiled["loss_scale"] == plain["loss_scale"]
        # A step whose scaled gradients overflow halves the scale (from 2**15) and pushes nothing:
        # every halving is one step fewer, the same on every worker.
        skipped = round(math.log2(2 ** 15 / compiled["loss_scale"]))
        assert skipped >= 1  # the case covers the skipped push
        assert compiled["stats"]["global_step"] == 6 - skipped
        assert compiled["stats"]["pushed"] == [6 - skipped] * 2 == compiled["stats"]["taken"]
        # float16 keeps 11 significant bits (eps 2**-10): XLA fuses the casts otherwise, and a CPU with
        # native float16 (AVX512_FP16) rounds otherwise (seen: 3.3e-4 apart, relative). A step more or
        # less, or an unscaled gradient, moves the weights far more than that.
        for got, want in zip(compiled["weights"], plain["weights"]):
            np.testing.assert_allclose(got, want, rtol=2 ** -10, atol=1e-6)
    assert abs(float(runs[True][0]["weights"][0][0, 0])) > 0.01


@pytest.mark.cluster
def test_mixed_precision_on_one_worker_follows_keras_loss_scale_optimizer_alone_step_for_step():
    # The test above compares the job with itself: a bug in the loss-scaling path shared by both runs
    # (an unscaled or a non-finite gradient pushed, a skipped step counted) would pass it. Here one
    # worker (N = 1, b = 0) must follow Keras's LossScaleOptimizer in one process, batch for batch.
    steps = 8
    reference = programs.compiled.mixed_precision_reference(steps)
    assert reference["optimizer"] == "LossScaleOptimizer"
    # The scale starts at 2**15: the first scaled gradients overflow float16, and each such step is
    # skipped (the scale halves, nothing applied) until the scale fits.
    skipped = steps - reference["applied"]
    assert skipped >= 1 and reference["scales"][0] == 2 ** 14
    assert reference["scales"][-1] == 2 ** 15 / 2 ** skipped
    (runs,) = tf_backup.launch_local(programs.compiled.mixed_precision_trajectories, num_workers=1,
                                     kwargs=dict(steps=steps), timeout=240)
    for run in runs:
        assert run["optimizer"] == "LossScaleOptimizer"
        assert run["scales"] == reference["scales"]  # the same steps skipped, in the same order
        assert run["stats"]["global_step"] == reference["applied"]  # a skipped step is no global step
        assert run["stats"]["pushed"] == [reference["applied"]] == run["stats"]["taken"]  # nor a push
        # Without XLA the same float16 ops run in the same order: equal to float32 rounding. XLA
        # fuses the casts (see the test above): float16's eps, 2**-10.
        rtol = 2 ** -10 if run["jit_compile"] else 1e-6
        np.testing.assert_allclose(run["losses"], reference["losses"], rtol=rtol)
        for got, want in zip(run["weights"], reference["weights"]):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)
    assert abs(float(reference["weights"][0][0, 0])) > 0.01  # the applied steps moved the weights


@pytest.mark.cluster
def test_compiled_steps_that_cannot_work_raise_errors_that_say_what_to_do():
    (out,) = tf_backup.launch_local(programs.compiled.compiled_step_errors, num_workers=1, timeout=180)
    kind, message = out["custom_loop_run_inside_xla"]
    assert kind == "ValueError" and "strategy.run(tf.function(fn, jit_compile=True)" in message
    kind, message = out["two_steps_one_exchange"]  # raised in the exchange's py_function
    assert "ExchangeError" in kind + message and "1 were never pushed" in message
    (out,) = tf_backup.launch_local(programs.compiled.compiled_step_errors, num_workers=1,
                                    kwargs=dict(embedding=True), timeout=180)
    kind, message = out["embedding_without_drop_remainder"]  # refused as the step is traced, naming the fix
    assert kind == "ValueError", (kind, message)
    assert "this step's row counts are not static ([(None,)" in message and "drop_remainder=True" in message
    (out,) = tf_backup.launch_local(programs.compiled.compiled_step_errors, num_workers=1,
                                    kwargs=dict(local_devices=2), timeout=180)
    kind, message = out["keras_jit_several_devices"]
    assert kind == "ValueError" and "one XLA program" in message and "jit_compile=True" in message
