"""`Checkpoint`: the chief's training state on disk (master variables, inner optimizer, global step).

With each checkpoint goes the workers' input positions (`Control.batches`:
per worker, the batches of its input it had finished with when the step was
published) in a small JSON file, `input_positions-<step>.json`, written before
the checkpoint itself: a checkpoint that exists has its positions. They are
not in the TensorFlow checkpoint because their length is the number of
workers, which a resumed job may change (its shards then differ, and every
worker reads its new shard from the start).
"""

import json
import os
import re
from typing import List, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

_POSITIONS = "input_positions-{step}.json"


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
        # The restored checkpoint's input positions (None: no checkpoint, or none saved with it).
        self.restored_positions: Optional[List[int]] = None

    def _make(self) -> None:
        self._ckpt = tf.train.Checkpoint(**self._objects)
        self._manager = tf.train.CheckpointManager(self._ckpt, self.directory, max_to_keep=3)

    def add(self, **variables) -> int:
        """Adds more state (lists of variables, by name) before the first save.

        Restores the latest checkpoint again, now with the added state, and
        returns its global step (the Embedding tables of `tf_backup.frontend.sparse`).
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
        self.restored_positions = None
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
        self.restored_positions = self._read_positions(self.restored_step)
        logging.info("tf_backup: restored %s at global step %d", path, self.saved_step)
        return self.saved_step

    def due(self, step: int) -> bool:
        """Whether a periodic save is due at `step` (every `every_steps`, not saved yet)."""
        return step % self.every_steps == 0 and step != self.saved_step

    def save(self, step: int, why: str, input_positions: Optional[Sequence[int]] = None) -> None:
        if step == self.saved_step:
            return
        if input_positions is not None:
            self._write_positions(step, input_positions)
        self._step.assign(step)
        path = self._manager.save(checkpoint_number=step)
        self.saved_step = step
        self._remove_stale_positions()
        logging.info("tf_backup: saved %s at global step %d (%s)", path, step, why)

    # -- input positions -----------------------------------------------------------------

    # tf.io.gfile, not os: a checkpoint directory may be on a cloud bucket (`gs://...`, TPU pods).

    def _positions_path(self, step: int) -> str:
        return os.path.join(self.directory, _POSITIONS.format(step=step))

    def _write_positions(self, step: int, positions: Sequence[int]) -> None:
        tf.io.gfile.makedirs(self.directory)
        path = self._positions_path(step)
        with tf.io.gfile.GFile(path + ".tmp", "w") as f:
            f.write(json.dumps({"step": int(step), "batches": [int(p) for p in np.asarray(positions)]}))
        tf.io.gfile.rename(path + ".tmp", path, overwrite=True)

    def _read_positions(self, step: int) -> Optional[List[int]]:
        path = self._positions_path(step)
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path) as f:
                return [int(p) for p in json.loads(f.read())["batches"]]
        logging.warning("tf_backup: the checkpoint of step %d has no input positions: every worker "
                        "reads its input from the start.", step)
        return None

    def _remove_stale_positions(self) -> None:
        """Removes the positions of checkpoints the manager deleted (it keeps the last few)."""
        kept = {int(re.search(r"(\d+)$", p).group(1)) for p in self._manager.checkpoints}
        for name in tf.io.gfile.listdir(self.directory):
            found = re.fullmatch(r"input_positions-(\d+)\.json", name)
            if found and int(found.group(1)) not in kept:
                tf.io.gfile.remove(os.path.join(self.directory, name))
