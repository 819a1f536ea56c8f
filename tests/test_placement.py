"""Large models on several ps tasks: each ps task holds its share of the parameters."""

import keras
import numpy as np
import tensorflow as tf
import pytest

import tf_backup
from tf_backup.ps.layout import Layout
import programs.common
import programs.placement


class _Var:
    def __init__(self, shape, dtype="float32", name="v"):
        self.shape, self.dtype, self.name = shape, dtype, name


def test_layout_cuts_the_concatenation_into_equal_shards_whatever_the_variables():
    # 192, 64, 512, 8, 8, 1 elements (the test MLP), 785 in all, over 2 shards: 393 and 392,
    # the 64x8 kernel spanning both.
    layout = Layout([_Var((3, 64)), _Var((64,)), _Var((64, 8)), _Var((8,)), _Var((8, 1)),
                     _Var((1,))], 2)
    assert layout.shard_sizes == [393, 392]
    assert layout.shards == [[0, 1, 2], [2, 3, 4, 5]]
    # One big matrix over 4 shards: a quarter each.
    big = Layout([_Var((1000, 10))], 4)
    assert big.shard_sizes == [2500] * 4 and big.shards == [[0]] * 4
    values = [np.arange(10000.0).reshape(1000, 10)]
    flats = big.pack(values)
    np.testing.assert_array_equal(flats[1].numpy(), np.arange(2500.0, 5000.0))
    np.testing.assert_array_equal(big.unpack(flats)[0].numpy(), values[0])
    # Uneven totals: sizes differ by one element at most.
    spread = Layout([_Var((n,)) for n in [37, 1000, 5, 640, 640, 300, 299, 1]], 3)
    assert spread.shard_sizes == [974, 974, 974] and sum(spread.shard_sizes) == 2922


def test_layout_with_more_shards_than_elements_leaves_shards_empty():
    layout = Layout([_Var((1,)), _Var((1,))], 3)
    assert layout.shard_sizes == [1, 1, 0] and layout.shards == [[0], [1], []]
    flats = layout.pack([np.arange(1.0), np.arange(1.0, 2.0)])
    assert [int(f.shape[0]) for f in flats] == [1, 1, 0]
    assert [float(t.numpy()[0]) for t in layout.unpack(flats)] == [0.0, 1.0]


@pytest.mark.cluster
def test_two_ps_tasks_each_hold_their_share_and_training_matches_one_process():
    steps = 4
    out = tf_backup.launch_local(programs.placement.train_on_several_ps, num_workers=2, num_ps=2, args=(steps,),
                                 timeout=240)
    chief = out[0]
    assert chief["shards"] == [[0, 1, 2], [2, 3, 4, 5]]  # the 64x8 kernel spans both
    # ps task s holds shard s and nothing else, with exactly its share of the elements.
    for worker in out:
        held = worker["held"]
        assert sorted(held) == [0, 1] and list(held[0]) == [0] and list(held[1]) == [1]
        assert held[0][0].size == 393 and held[1][1].size == 392
        assert held[0][0].size + held[1][1].size == sum(worker["sizes"]) == 785
        # What the ps tasks hold is the trained model: the variables in order, cut at element 393.
        whole = np.concatenate([w.ravel() for w in worker["weights"]])
        np.testing.assert_array_equal(held[0][0], whole[:393])
        np.testing.assert_array_equal(held[1][1], whole[393:])
    assert chief["stats"]["global_step"] == steps and chief["stats"]["taken"] == [steps, steps]
    # Same as single-process large-batch SGD from the same initial weights.
    x, y = programs.common.regression_data(steps * 2)
    model = programs.placement.mlp_regression_model(keras)
    model.set_weights(chief["initial"])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=2 * programs.common.BATCH, epochs=1, shuffle=False, verbose=0)
    for worker in out:
        for got, want in zip(worker["weights"], model.get_weights()):
            np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(chief["weights"][0], chief["initial"][0])  # it trained


@pytest.mark.cluster
def test_bfloat16_on_the_wire_trains_on_the_master_rounded_to_bfloat16():
    steps = 4
    out = tf_backup.launch_local(programs.placement.train_on_several_ps, num_workers=2, num_ps=2,
                                 args=(steps, "bfloat16"), timeout=240)
    chief = out[0]
    assert chief["stats"]["global_step"] == steps and chief["stats"]["taken"] == [steps, steps]
    bf16 = tf.bfloat16.as_numpy_dtype
    for worker in out:
        held = worker["held"]
        assert sorted(held) == [0, 1] and held[0][0].dtype == bf16 and held[1][1].dtype == bf16
        whole = np.concatenate([w.ravel() for w in worker["weights"]])
        # What every worker holds is what the ps tasks published: bfloat16 values, exactly.
        np.testing.assert_array_equal(whole, np.concatenate([held[0][0], held[1][1]]).astype(np.float32))
        np.testing.assert_array_equal(whole, whole.astype(bf16).astype(np.float32))
    # Within bfloat16's precision of single-process large-batch SGD from the same weights, and trained.
    x, y = programs.common.regression_data(steps * 2)
    model = programs.placement.mlp_regression_model(keras)
    model.set_weights(chief["initial"])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=2 * programs.common.BATCH, epochs=1, shuffle=False, verbose=0)
    for got, want, initial in zip(chief["weights"], model.get_weights(), chief["initial"]):
        np.testing.assert_allclose(got, want, rtol=2**-6, atol=2e-3)
    assert not np.allclose(chief["weights"][0], chief["initial"][0])


@pytest.mark.cluster
@pytest.mark.parametrize("optimizer, wire_dtype, num_ps", [
    ("momentum", "float32", 2),  # each shard takes and applies in its own run, all at once
    ("adam", "bfloat16", 2),
    ("nesterov", "float32", 1),  # one shard: the aggregator's wait takes and applies in the same run
])
def test_the_update_applied_on_the_ps_matches_single_process_training(optimizer, wire_dtype, num_ps, tmp_path):
    steps = 4
    out = tf_backup.launch_local(programs.placement.train_on_several_ps, num_workers=2, num_ps=num_ps,
                                 args=(steps, wire_dtype, True, optimizer, str(tmp_path)), timeout=240)
    chief = out[0]
    assert chief["stats"]["global_step"] == steps and chief["stats"]["taken"] == [steps, steps]
    assert chief["local_pulls"] == 0  # the chief's worker pulled from the ps: its aggregator held no parameters
    x, y = programs.common.regression_data(steps * 2)
    model = programs.placement.mlp_regression_model(keras)
    model.set_weights(chief["initial"])
    model.compile(optimizer=programs.placement.make_inner_optimizer(keras, optimizer), loss="mse")
    model.fit(x, y, batch_size=2 * programs.common.BATCH, epochs=1, shuffle=False, verbose=0)
    rtol, atol = (1e-5, 1e-6) if wire_dtype == "float32" else (2**-6, 2e-3)
    for worker in out:
        for got, want in zip(worker["weights"], model.get_weights()):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    # The chief's last checkpoint holds the master copy read back from the ps tasks: float32, the
    # reference's weights, and the optimizer's step count.
    restored = programs.placement.mlp_regression_model(keras)
    inner = programs.placement.make_inner_optimizer(keras, optimizer)
    inner.build(restored.trainable_variables)
    master = [tf.Variable(w) for w in chief["initial"]]
    ckpt = tf.train.Checkpoint(master=master, optimizer=list(inner.variables))
    ckpt.restore(tf.train.latest_checkpoint(str(tmp_path / "opt0"))).expect_partial()
    assert int(inner.iterations.numpy()) == steps
    for got, want in zip(master, model.get_weights()):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6 if wire_dtype == "float32" else 2e-3)
