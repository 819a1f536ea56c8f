"""The update applied on the ps (`apply_on_ps`): which inner optimizers it takes, and its kernels' arithmetic."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_backup.chief import update_on_ps
from tf_backup.ps import ps_update


@pytest.mark.parametrize("make, kind", [
    (lambda: keras.optimizers.SGD(0.1), ps_update.Kind.SGD),
    (lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True), ps_update.Kind.MOMENTUM),
    (lambda: keras.optimizers.Adam(1e-3), ps_update.Kind.ADAM),
])
def test_elementwise_optimizers_have_a_kernel(make, kind):
    assert update_on_ps.rule_for(make()).kind is kind


@pytest.mark.parametrize("make, message", [
    (lambda: keras.optimizers.RMSprop(), "supports keras.optimizers.SGD.*Received RMSprop"),
    (lambda: keras.optimizers.AdamW(), "Received AdamW"),  # weight decay: refused before the class
    (lambda: keras.optimizers.SGD(0.1, clipnorm=1.0), "without clipnorm.*clipnorm=1.0"),
    (lambda: keras.optimizers.Adam(amsgrad=True), "amsgrad"),
])
def test_other_optimizers_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        update_on_ps.rule_for(make())


@pytest.mark.parametrize("make", [
    lambda: keras.optimizers.SGD(0.1),
    lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    lambda: keras.optimizers.Adam(0.01),
])
def test_the_kernels_compute_keras_update_step_over_three_steps(make):
    rng = np.random.default_rng(0)
    start = rng.normal(size=[6]).astype(np.float32)
    grads = [rng.normal(size=[6]).astype(np.float32) for _ in range(3)]
    reference, inner = keras.Variable(start), make()
    inner.build([reference])
    ours, shadow = tf.Variable(start), make()  # `shadow` gives the scalars at each step, as the chief's inner
    shadow.build([keras.Variable(start)])
    rule = update_on_ps.rule_for(shadow)
    slots = [tf.Variable(np.zeros([6], np.float32)) for _ in range(rule.num_slots)]
    for g in grads:
        inner.apply([tf.constant(g)], [reference])
        hyper = {k: tf.constant(v, tf.float32) for k, v in update_on_ps.hyper_values(shadow, rule).items()}
        ps_update.build_apply(rule, ours.handle, [s.handle for s in slots], tf.constant(g), hyper,
                              nesterov=bool(getattr(shadow, "nesterov", False)))
        shadow.iterations.assign_add(1)
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours.numpy(), start)
