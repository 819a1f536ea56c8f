"""The chief's checkpoint and the input positions saved with it (no cluster)."""

import os

import keras
import numpy as np

from tf_backup.chief import checkpoint as checkpoint_lib


def make(directory, every_steps=5):
    master = [keras.Variable(np.zeros(3, np.float32))]
    inner = keras.optimizers.SGD(0.1, momentum=0.9)
    inner.build(master)
    return checkpoint_lib.Checkpoint(str(directory), master, inner, every_steps), master


def test_each_checkpoint_keeps_the_input_positions_it_was_saved_with(tmp_path):
    ckpt, master = make(tmp_path)
    assert ckpt.restore() == 0 and ckpt.restored_positions is None
    for step in range(1, 21):
        assert ckpt.due(step) == (step % 5 == 0)
        master[0].assign(np.full(3, step, np.float32))
        if ckpt.due(step):
            ckpt.save(step, why="periodic", input_positions=[step, 2 * step])
    # The manager keeps the last 3 checkpoints; the positions of the deleted one go with it.
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("input_positions")) == [
        "input_positions-10.json", "input_positions-15.json", "input_positions-20.json"]
    assert not ckpt.due(20)  # saved already

    restored, master = make(tmp_path)
    assert restored.restore() == 20
    assert restored.restored_positions == [20, 40]
    np.testing.assert_array_equal(master[0].numpy(), np.full(3, 20, np.float32))


def test_a_checkpoint_saved_without_positions_restores_none(tmp_path):
    ckpt, _ = make(tmp_path)
    ckpt.save(7, why="end")  # e.g. saved by an older version, or the positions were never read
    restored, _ = make(tmp_path)
    assert restored.restore() == 7 and restored.restored_positions is None
