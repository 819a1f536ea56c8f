"""`StepMetrics`: what one step tells Keras, and the one place its names and dtype are defined.

`WorkerClient.sync` returns them; the step's `tf.py_function` carries them out
as one vector of `DTYPE` (`StepMetrics.as_array`); the front end keeps the
`LOGGED` ones in variables of the same names and dtype, which Keras's logs show
(`tf_backup.frontend.extended.ensure_metric_vars`, `Binding._exchange`).
"""

from typing import Dict, NamedTuple, Tuple

import numpy as np

from tf_backup.protocol import slow_workers

DTYPE = np.int64  # of every field on the way out of the step's py_function, and of the variables


class StepMetrics(NamedTuple):
    """What one step reports to Keras's logs."""

    global_step: int
    fresh_gradients: int  # averaged into the latest step
    dropped_gradients: int  # stale gradients dropped so far, all workers
    replicas_to_aggregate: int  # N of the step being gathered (adaptive N: the chief's latest choice)
    stopped: bool  # the fit round stopped: the fit ends after this batch
    # The persistently slow workers as the chief last published them (`slow_workers.Slowest`): how
    # many, and the slowest one's index (-1: none), factor over the typical worker in thousandths
    # (0: none; Keras's logs show it divided, `SCALES`), and the step it has been slow since (-1: none).
    slow_workers: int = 0
    slow_worker: int = -1
    slow_worker_factor: int = 0
    slow_worker_since_step: int = -1

    def as_array(self) -> np.ndarray:
        """The fields in their order, as one vector of `DTYPE` (`stopped` as 0 or 1)."""
        return np.asarray([int(value) for value in self], DTYPE)

    @classmethod
    def index(cls, name: str) -> int:
        """Where field `name` is in `as_array`."""
        return cls._fields.index(name)


SIZE = len(StepMetrics._fields)

# The fields in Keras's logs: all but `stopped`, which ends the fit instead of being shown.
LOGGED: Tuple[str, ...] = tuple(name for name in StepMetrics._fields if name != "stopped")

# Fields carried as an integer times a scale: Keras's logs show the value divided by it.
SCALES: Dict[str, int] = {"slow_worker_factor": slow_workers.FACTOR_SCALE}
