"""Embedding models (IndexedSlices gradients) train through model.fit on a cluster."""

import keras
import numpy as np
import pytest

import tf_backup
import workers

pytestmark = pytest.mark.cluster


def reference(initial, steps, rows_per_step):
    x, y = workers.embedding_data(steps * rows_per_step)
    model = workers.embedding_model(keras)
    model.set_weights(initial)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    model.fit(x, y, batch_size=rows_per_step, epochs=1, shuffle=False, verbose=0)
    return model.get_weights()


@pytest.mark.parametrize("local_devices", [1, 2])
def test_embedding_model_trains_through_fit_like_large_batch_sgd(local_devices):
    steps = 6
    out = tf_backup.launch_local(workers.train_embedding, num_workers=2,
                                 kwargs=dict(steps=steps, local_devices=local_devices), timeout=240)
    expected = reference(out[0]["initial"], steps, 2 * workers.BATCH * local_devices)
    for worker in out:
        assert worker["stats"] == {"global_step": steps, "pushed": [steps] * 2, "taken": [steps] * 2,
                                   "dropped": [0, 0]}
        for got, want in zip(worker["weights"], expected):
            np.testing.assert_allclose(got, want, atol=1e-5)
    table, initial_table = out[0]["weights"][0], out[0]["initial"][0]
    x, _ = workers.embedding_data(steps * 2 * workers.BATCH * local_devices)
    used = np.unique(x)
    unused = np.setdiff1d(np.arange(workers.VOCAB), used)
    assert len(used) > 20 and len(unused) > 100
    # Rows of tokens in the data moved; rows of tokens never seen did not.
    assert np.all(np.abs(table[used] - initial_table[used]).max(axis=1) > 0)
    np.testing.assert_array_equal(table[unused], initial_table[unused])
