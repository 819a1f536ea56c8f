"""The settings of the step protocol, the same on every worker, and the constants they pick from.

`ProtocolConfig` is what the strategy resolves from its arguments
(`tf_backup.frontend.binding.resolve_config`) and hands to the chief's
aggregator and every worker's client; `AdaptiveSettings` the bounds of adaptive
N (`tf_backup.protocol.adaptive`). `docs/design.md` is the whole contract.
"""

import dataclasses
from typing import Optional, Union

KEEP_PUBLISHED = 2  # the chief keeps its last published parameters for its own worker's pull
WIRE_DTYPES = ("float32", "bfloat16", "float16")  # what `ProtocolConfig.wire_dtype` may be


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """Settings of the step protocol, the same on every worker.

    Attributes:
      replicas_to_aggregate: N, the fresh gradients averaged into one step
        (with `adaptive`, the first step's; the chief picks every other).
      num_workers: N + b, every worker of the cluster.
      staleness_check: whether a gradient tagged with an old step is dropped.
        False gives asynchronous SGD (with `replicas_to_aggregate=1`).
      step_timeout: the longest a worker waits for the global step to advance,
        and the chief for enough gradients, in seconds.
      chief_timeout: how long a silent chief heartbeat is tolerated, seconds.
      startup_timeout: how long a worker waits for the chief to create the
        shared state, seconds.
      poll_min, poll_max: the first and the longest sleep between polls.
      ps_restart_timeout: how long the chief and the workers wait for a ps
        task that failed to answer again, seconds; the chief then writes the
        state again (`tf_backup.ps.recovery`). 0: a lost ps ends the job.
      adaptive: the bounds and window of adaptive N (`num_backup_workers="auto"`), or None: N is fixed.
      wire_dtype: what gradients and parameters cross the network in ("float32", "bfloat16" or
        "float16"); sums, the applied parameters and the optimizer's state stay in the
        variables' dtype, and a push's norm and one-hot are always exact.
      apply_on_ps: each ps task applies the inner optimizer to its shard (`tf_backup.ps.ps_update`);
        False: the chief applies it to its master copy. "auto" until the binding resolves it from
        the inner optimizer (`tf_backup.frontend.binding.resolve_config`): a bool after.
    """

    replicas_to_aggregate: int
    num_workers: int
    staleness_check: bool = True
    adaptive: Optional["AdaptiveSettings"] = None
    step_timeout: float = 600.0
    chief_timeout: float = 120.0
    startup_timeout: float = 600.0
    poll_min: float = 0.0005
    poll_max: float = 0.01
    ps_restart_timeout: float = 0.0
    wire_dtype: str = "float32"
    apply_on_ps: Union[bool, str] = False

    @property
    def min_replicas(self) -> int:
        """The fewest gradients a step may be taken with (fewer live workers: the job is lost)."""
        return self.adaptive.n_min if self.adaptive is not None else self.replicas_to_aggregate


@dataclasses.dataclass(frozen=True)
class AdaptiveSettings:
    """Adaptive N (`tf_backup.protocol.adaptive`): the chief picks each step's N in `[n_min, n_max]`.

    Attributes:
      n_min, n_max: the bounds (`min_replicas_to_aggregate`, `max_replicas_to_aggregate`).
      window: steps over which arrival times and the noise scale are averaged.
      warmup: steps taken with `n_max` before the rule chooses.
      noise_factor: what one more gradient is worth to the inner optimizer, a factor on the
        measured noise scale (`adaptive.noise_factor_for` the optimizer, set when it is bound).
    """

    n_min: int
    n_max: int
    window: int = 50
    warmup: int = 5  # enough for the compute times of every worker; the noise needs steps of 2+
    noise_factor: float = 1.0
