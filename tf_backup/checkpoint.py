"""`Checkpoint`: the chief's training state on disk (master variables, inner optimizer, global step)."""

from typing import List

from absl import logging
import tensorflow as tf


class Checkpoint:
    """The chief's training state on disk: master variables, inner optimizer, global step.

    `tf.train.CheckpointManager` writes a checkpoint's files first and then
    replaces its `checkpoint` state file atomically, so a process killed
    during a save leaves the previous checkpoint as the latest one.
    """

    def __init__(self, directory: str, master: List, inner, every_steps: int):
        self.directory = directory
        self.every_steps = every_steps
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self._objects = {"master": list(master), "optimizer": list(inner.variables),
                         "global_step": self._step}
        self._make()
        self.saved_step = None
        self.restored_step = None

    def _make(self) -> None:
        self._ckpt = tf.train.Checkpoint(**self._objects)
        self._manager = tf.train.CheckpointManager(self._ckpt, self.directory, max_to_keep=3)

    def add(self, **variables) -> int:
        """Adds more state (lists of variables, by name) before the first save.

        Restores the latest checkpoint again, now with the added state, and
        returns its global step (the Embedding tables of `tf_backup.sparse`).
        """
        if self.saved_step not in (None, self.restored_step):  # a save since the restore
            raise ValueError("State can only be added to a checkpoint before its first save.")
        self._objects.update({name: list(value) for name, value in variables.items()})
        self._make()
        return self.restore()

    def restore(self) -> int:
        """Restores the latest checkpoint, if any; returns its global step (0: none)."""
        path = self._manager.latest_checkpoint
        self.restored_step = 0
        if path is None:
            return 0
        try:
            self._ckpt.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            raise ValueError(
                f"The checkpoint {path} does not match this model and optimizer (was "
                f"`checkpoint_dir` used by another job?): {e}".splitlines()[0]
            ) from e
        self.saved_step = self.restored_step = int(self._step.numpy())
        logging.info("tf_backup: restored %s at global step %d", path, self.saved_step)
        return self.saved_step

    def maybe_save(self, step: int) -> None:
        if step % self.every_steps == 0:
            self.save(step, why="periodic")

    def save(self, step: int, why: str) -> None:
        if step == self.saved_step:
            return
        self._step.assign(step)
        path = self._manager.save(checkpoint_number=step)
        self.saved_step = step
        logging.info("tf_backup: saved %s at global step %d (%s)", path, step, why)
