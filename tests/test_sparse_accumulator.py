"""The sparse conditional accumulator (IndexedSlices gradients), on an in-process server."""

import numpy as np
import pytest
import tensorflow as tf

from tf_backup.ps import accumulators
from tf_backup.ps import endpoint
from tf_backup.ps.layout import largest_first

DEVICE = "/job:localhost/replica:0/task:0/device:CPU:0"


@pytest.fixture
def where(server):
    return endpoint.Endpoint(server.target, DEVICE, timeout=10.0)


def test_take_sums_rows_counts_workers_and_drops_stale_pushes(where):
    acc = accumulators.SparseConditionalAccumulator("s/acc1", tf.float32, [1_000_000, 2], 3, where)
    acc.apply_grad([7, 3], [[1.0, 1.0], [2.0, 2.0]], local_step=0, worker=0)
    acc.apply_grad([7, 9, 9], [[3.0, 3.0], [1.0, 0.0], [1.0, 0.0]], local_step=0, worker=2)
    assert acc.num_accumulated() == 2
    indices, values, counts = acc.take_grad(2)
    np.testing.assert_array_equal(indices, [3, 7, 9])
    np.testing.assert_array_equal(values, [[2.0, 2.0], [4.0, 4.0], [2.0, 0.0]])  # sums, duplicates added
    np.testing.assert_array_equal(counts, [1, 0, 1])  # which workers the take holds
    # The take advanced the step: a push tagged 0 is dropped whole.
    acc.apply_grad([1], [[5.0, 5.0]], local_step=0, worker=1)
    assert acc.num_accumulated() == 0
    acc.apply_grad([1], [[5.0, 5.0]], local_step=1, worker=1)
    indices, values, counts = acc.take_grad(1)
    np.testing.assert_array_equal(indices, [1])
    np.testing.assert_array_equal(counts, [0, 1, 0])


def test_shared_by_name_across_endpoints_and_rejects_bad_rows(server, where):
    first = accumulators.SparseConditionalAccumulator("s/acc2", tf.float64, [10, 1], 2, where)
    first.set_global_step(4)
    other = accumulators.Endpoint(server.target, DEVICE, timeout=10.0)  # another process's session
    second = accumulators.SparseConditionalAccumulator("s/acc2", tf.float64, [10, 1], 2, other)
    second.apply_grad([2], [[1.5]], local_step=3, worker=1)  # stale: the step is 4
    second.apply_grad([2], [[1.5]], local_step=4, worker=1)
    assert first.num_accumulated() == 1
    indices, values, counts = first.take_grad(1)
    assert indices.tolist() == [2] and values.tolist() == [[1.5]] and counts.tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"must be in \[0, 10\)"):
        first.apply_grad([10], [[1.0]], local_step=5, worker=0)
    with pytest.raises(TypeError, match="dtype=int32"):
        accumulators.SparseConditionalAccumulator("s/acc3", tf.int32, [10], 1, where)
    with pytest.raises(ValueError, match="shape="):
        accumulators.SparseConditionalAccumulator("s/acc4", tf.float32, [None, 3], 1, where)


def test_embedding_tables_are_found_and_placed_by_size():
    import keras  # pylint: disable=g-import-not-at-top
    from tf_backup.frontend import sparse  # pylint: disable=g-import-not-at-top

    model = keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(1000, 8),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    dense_ids, sparse_ids = sparse.split(model.trainable_variables)
    assert sparse_ids == [0] and dense_ids == [1, 2]
    # Tables go largest first to the least loaded ps task, counting the dense shards' loads.
    assert largest_first([8000, 300, 5000], loads=[100, 0]) == [1, 0, 0]
