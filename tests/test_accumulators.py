"""The conditional accumulator's staleness check, in one process on the local CPU."""

import numpy as np
import pytest
import tensorflow as tf

from tf_backup import accumulators

CPU = "/device:CPU:0"


def test_take_sums_fresh_gradients_and_advances_the_step():
    acc = accumulators.ConditionalAccumulator("t/acc1", tf.float32, [2], CPU)
    acc.apply_grad([1.0, 2.0], local_step=0)
    acc.apply_grad([3.0, 4.0], local_step=0)
    assert acc.num_accumulated() == 2
    np.testing.assert_array_equal(acc.take_grad(2).numpy(), [4.0, 6.0])
    # The take advanced the accumulator to step 1: a gradient tagged 0 is stale.
    acc.apply_grad([100.0, 100.0], local_step=0)
    assert acc.num_accumulated() == 0
    acc.apply_grad([0.5, 0.5], local_step=1)
    np.testing.assert_array_equal(acc.take_grad(1).numpy(), [0.5, 0.5])


def test_set_global_step_makes_older_tags_stale():
    acc = accumulators.ConditionalAccumulator("t/acc2", tf.float64, [1], CPU, reduction_type="MEAN")
    acc.set_global_step(5)
    acc.apply_grad([1.0], local_step=4)
    assert acc.num_accumulated() == 0
    acc.apply_grad([1.0], local_step=5)
    acc.apply_grad([3.0], local_step=7)
    np.testing.assert_array_equal(acc.take_grad(2).numpy(), [2.0])


def test_same_shared_name_reaches_the_same_resources():
    a = accumulators.ConditionalAccumulator("t/acc3", tf.float32, [1], CPU)
    b = accumulators.ConditionalAccumulator("t/acc3", tf.float32, [1], CPU)
    a.apply_grad([2.0], local_step=0)
    assert b.num_accumulated() == 1
    v = accumulators.SharedVariable("t/var", tf.int64, [3], CPU)
    assert not v.is_initialized()
    v.assign([1, 2, 3])
    w = accumulators.SharedVariable("t/var", tf.int64, [3], CPU)
    w.scatter_update([0], [7])
    w.scatter_max([1, 2], [1, 9])
    np.testing.assert_array_equal(v.read().numpy(), [7, 2, 9])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dtype=tf.int32), TypeError, "float16, float32 and float64. Received dtype=int32"),
    (dict(reduction_type="MAX"), ValueError, "reduction_type='MAX'"),
])
def test_bad_accumulator_arguments(kwargs, error, message):
    args = dict(shared_name="t/bad", dtype=tf.float32, shape=[1], device=CPU)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        accumulators.ConditionalAccumulator(**args)
