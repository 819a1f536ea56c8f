"""Large models on several ps tasks: each ps task holds its share of the parameters."""

import keras
import numpy as np
import pytest

import tf_backup
from tf_backup.layout import Layout
import workers


class _Var:
    def __init__(self, shape, dtype="float32", name="v"):
        self.shape, self.dtype, self.name = shape, dtype, name


def test_layout_spreads_variables_by_size_largest_first():
    # 512, 192, 64, 8, 8, 1 elements (the test MLP) over 2 shards: the largest alone,
    # then every next variable to the lighter shard.
    layout = Layout([_Var((3, 64)), _Var((64,)), _Var((64, 8)), _Var((8,)), _Var((8, 1)),
                              _Var((1,))], 2)
    assert layout.shards == [[2], [0, 1, 3, 4, 5]]
    assert layout.shard_sizes == [512, 273]
    # Four equal variables over 2 shards: two each.
    even = Layout([_Var((100,))] * 4, 2)
    assert even.shard_sizes == [200, 200] and even.shards == [[0, 2], [1, 3]]
    # Greedy bound: no shard exceeds the mean by more than the largest variable.
    sizes = [37, 1000, 5, 640, 640, 300, 299, 1]
    spread = Layout([_Var((n,)) for n in sizes], 3)
    assert sum(spread.shard_sizes) == sum(sizes)
    assert max(spread.shard_sizes) <= sum(sizes) / 3 + max(sizes)
    assert sorted(i for m in spread.shards for i in m) == list(range(len(sizes)))


def test_layout_with_more_shards_than_variables_leaves_shards_empty():
    layout = Layout([_Var((4,)), _Var((2,))], 3)
    assert layout.shard_sizes == [4, 2, 0]
    flats = layout.pack([np.arange(4.0), np.arange(2.0)])
    assert [int(f.shape[0]) for f in flats] == [4, 2, 0]


@pytest.mark.cluster
def test_two_ps_tasks_each_hold_their_share_and_training_matches_one_process():
    steps = 4
    out = tf_backup.launch_local(workers.train_on_several_ps, num_workers=2, num_ps=2, args=(steps,),
                                 timeout=240)
    chief = out[0]
    assert chief["shards"] == [[2], [0, 1, 3, 4, 5]]
    # ps task s holds shard s and nothing else, with exactly its share of the elements.
    for worker in out:
        held = worker["held"]
        assert sorted(held) == [0, 1] and list(held[0]) == [0] and list(held[1]) == [1]
        assert held[0][0].size == 512 and held[1][1].size == 273
        assert held[0][0].size + held[1][1].size == sum(worker["sizes"]) == 785
        # What the ps tasks hold is the trained model: shard 0 is the 64x8 kernel, shard 1 the rest
        # in variable order.
        np.testing.assert_array_equal(held[0][0], worker["weights"][2].ravel())
        rest = np.concatenate([worker["weights"][i].ravel() for i in (0, 1, 3, 4, 5)])
        np.testing.assert_array_equal(held[1][1], rest)
    assert chief["stats"]["global_step"] == steps and chief["stats"]["taken"] == [steps, steps]
    # Same as single-process large-batch SGD from the same initial weights.
    x, y = workers.regression_data(steps * 2)
    model = workers.mlp_regression_model(keras)
    model.set_weights(chief["initial"])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=2 * workers.BATCH, epochs=1, shuffle=False, verbose=0)
    for worker in out:
        for got, want in zip(worker["weights"], model.get_weights()):
            np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(chief["weights"][0], chief["initial"][0])  # it trained
