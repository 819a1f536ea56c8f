"""`WorkerContext`: what the parts of one worker's client share for one optimizer."""

import dataclasses
from typing import Optional

from tf_backup import cluster as cluster_lib
from tf_backup.protocol import config as config_lib
from tf_backup.ps import job as job_lib
from tf_backup.ps.shared_state import SharedState
from tf_backup.worker import chief_link


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """Where a worker runs and whom it answers to (`WorkerClient`, its `Waiter` and `WorkerRecovery`).

    Attributes:
      state: the optimizer's shared state.
      config: protocol settings.
      info: the cluster.
      monitor: this worker's membership of the job (health checks).
      chief: the chief's aggregator in this process (`chief_link.NONE` but on the chief).
    """

    state: SharedState
    config: config_lib.ProtocolConfig
    info: cluster_lib.ClusterInfo
    monitor: Optional[job_lib.JobMonitor]
    chief: chief_link.ChiefLink = chief_link.NONE

    @property
    def w(self) -> int:
        """This worker's index."""
        return self.info.worker_index
