"""Membership: when too few workers are left for a step; no I/O.

The chief watches the workers' heartbeats (`tf_backup.ps.job.Liveness`); a
worker that stopped beating is dead, one that left the job (its fit ended) is
gone but not dead.
"""

from typing import Sequence


def lost_workers(num_workers: int, needed: int, gone: Sequence[int], dead: Sequence[int]) -> bool:
    """Whether too few workers are left for a step (some dead, not only left)."""
    return num_workers - len(set(gone)) < needed and bool(dead)
