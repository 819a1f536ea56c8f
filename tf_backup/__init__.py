"""tf_backup: synchronous SGD with backup workers for TensorFlow 2 / Keras 3."""

from tf_backup.chief.aggregator import StepRecord
from tf_backup.errors import AggregatorError
from tf_backup.errors import ChiefUnavailableError
from tf_backup.errors import PsUnavailableError
from tf_backup.errors import StepTimeoutError
from tf_backup.errors import WorkersLostError
from tf_backup.frontend.optimizer import SyncReplicasOptimizer
from tf_backup.frontend.strategy import BackupWorkerStrategy
from tf_backup.local.cluster import LocalCluster
from tf_backup.local.failures import LocalClusterError
from tf_backup.local.launch import launch_local
from tf_backup.memory import tune_malloc
from tf_backup.ps.accumulators import ConditionalAccumulator
from tf_backup.ps.accumulators import SharedVariable
from tf_backup.ps.server import serve

__all__ = [
    "AggregatorError",
    "BackupWorkerStrategy",
    "ChiefUnavailableError",
    "ConditionalAccumulator",
    "LocalCluster",
    "LocalClusterError",
    "PsUnavailableError",
    "SharedVariable",
    "StepRecord",
    "StepTimeoutError",
    "SyncReplicasOptimizer",
    "WorkersLostError",
    "launch_local",
    "serve",
    "tune_malloc",
]

__version__ = "0.1.0"
