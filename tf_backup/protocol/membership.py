"""Membership: what the chief sees of a worker (died, rejoined), and when too few are left; no I/O.

The chief watches the workers' heartbeats (`tf_backup.ps.job.Liveness`); a
worker that stopped beating is dead, one that left the job (its fit ended) is
gone but not dead.
"""

import enum
from typing import Sequence


class WorkerEventKind(str, enum.Enum):
    """What the chief saw of a worker: the `event` of a `tf_backup.ps.job.WorkerEvent`.

    Users read it (`BackupWorkerStrategy.worker_events()`, the trainer's
    summary), so it is a `str` enum: `event == "died"` holds, and it prints
    and serialises as `died`, as when it was a string.
    """

    DIED = "died"  # no heartbeat for `worker_timeout` (one that never joined: `startup_timeout`)
    REJOINED = "rejoined"  # a dead worker's heartbeat moved again (its process was restarted)

    def __str__(self) -> str:
        return self.value


def lost_workers(num_workers: int, needed: int, gone: Sequence[int], dead: Sequence[int]) -> bool:
    """Whether too few workers are left for a step (some dead, not only left)."""
    return num_workers - len(set(gone)) < needed and bool(dead)
