"""`BackupWorkerStrategy`'s arguments: checked once, then a typed record of them.

`StrategyArguments` checks what can be checked without the cluster when it is
built (the types and ranges, the arguments that exclude each other);
`protocol_config` checks the rest against the cluster (adaptive N's bounds,
b below the number of workers) and makes the protocol's configuration. The
meaning of each argument is in `BackupWorkerStrategy`'s docstring.
"""

import dataclasses
import os
from typing import Optional, Union

from tf_backup import _checks
from tf_backup import cluster as cluster_lib
from tf_backup.protocol import adaptive as adaptive_lib
from tf_backup.protocol import config as config_lib

AUTO = "auto"  # num_backup_workers: the chief chooses every step's N; apply_on_ps: where it can


@dataclasses.dataclass(frozen=True)
class StrategyArguments:
    """The arguments of `BackupWorkerStrategy` but the cluster resolver and the devices, checked.

    Building one checks every argument (in the order of the strategy's
    signature) and keeps them normalised: seconds as floats, `checkpoint_dir`
    as a string path or None. No defaults here: the strategy's signature is
    the one place they are written.

    Raises:
      TypeError: an argument has the wrong type.
      ValueError: an argument is out of range, or two exclude each other
        (bounds of N without `"auto"`, asynchronous with backup workers,
        `apply_on_ps=True` with `ps_restart_timeout` or `chief_rejoins`).
    """

    num_backup_workers: Union[int, str]
    min_replicas_to_aggregate: Optional[int]
    max_replicas_to_aggregate: Optional[int]
    adaptive_window: int
    asynchronous: bool
    step_timeout: float
    startup_timeout: float
    chief_timeout: float
    poll_interval: float
    worker_timeout: float
    max_steps: Optional[int]
    checkpoint_dir: Optional[str]
    checkpoint_every_steps: int
    ps_timeout: float
    ps_restart_timeout: float
    chief_rejoins: bool
    wire_dtype: str
    apply_on_ps: Union[bool, str]

    def __post_init__(self):
        def keep(name, value):  # frozen: the checked, normalised value replaces the one given
            object.__setattr__(self, name, value)

        if not self.auto:
            keep("num_backup_workers", _checks.check_int("num_backup_workers", self.num_backup_workers, 0,
                                                         kind=f'an integer >= 0 or "{AUTO}"'))
            if self.min_replicas_to_aggregate is not None or self.max_replicas_to_aggregate is not None:
                raise ValueError(
                    "`min_replicas_to_aggregate` and `max_replicas_to_aggregate` bound an adaptive N: "
                    f"they need num_backup_workers='{AUTO}'. Received "
                    f"num_backup_workers={self.num_backup_workers!r}, min_replicas_to_aggregate="
                    f"{self.min_replicas_to_aggregate!r}, max_replicas_to_aggregate={self.max_replicas_to_aggregate!r}")
        keep("adaptive_window", _checks.check_int("adaptive_window", self.adaptive_window, 1))
        _checks.check_bool("asynchronous", self.asynchronous)
        for name in ("step_timeout", "startup_timeout", "chief_timeout", "poll_interval", "worker_timeout",
                     "ps_timeout"):
            keep(name, _checks.check_seconds(name, getattr(self, name)))
        keep("ps_restart_timeout", _checks.check_seconds("ps_restart_timeout", self.ps_restart_timeout,
                                                         allow_zero=True))
        _checks.check_bool("chief_rejoins", self.chief_rejoins)
        if not isinstance(self.wire_dtype, str) or self.wire_dtype not in config_lib.WIRE_DTYPES:
            raise ValueError(f"`wire_dtype` must be one of {', '.join(config_lib.WIRE_DTYPES)}. "
                             f"Received wire_dtype={self.wire_dtype!r}")
        if self.apply_on_ps != AUTO and not isinstance(self.apply_on_ps, bool):
            raise TypeError(f'`apply_on_ps` must be a bool or "{AUTO}". Received apply_on_ps={self.apply_on_ps!r}')
        if self.apply_on_ps is True and (self.ps_restart_timeout or self.chief_rejoins):
            raise ValueError(
                "apply_on_ps=True keeps the master copy on the ps tasks, so a restarted ps task cannot be "
                "written again from the chief's, nor a rejoining chief's checkpoint be its state: set "
                "ps_restart_timeout=0 and chief_rejoins=False (a lost task ends the job; restart from the "
                f"checkpoint). Received ps_restart_timeout={self.ps_restart_timeout!r}, "
                f"chief_rejoins={self.chief_rejoins!r}")
        keep("max_steps", _checks.check_optional_int("max_steps", self.max_steps, 1))
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)):
                raise TypeError("`checkpoint_dir` must be a path or None. "
                                f"Received checkpoint_dir={self.checkpoint_dir!r}")
            keep("checkpoint_dir", os.fspath(self.checkpoint_dir))
        keep("checkpoint_every_steps", _checks.check_int("checkpoint_every_steps", self.checkpoint_every_steps, 1))
        if self.asynchronous and self.auto:
            raise ValueError(
                "Asynchronous training applies every gradient, so it has no N to choose: "
                f"set num_backup_workers=0. Received num_backup_workers='{AUTO}'")
        if self.asynchronous and self.num_backup_workers:
            raise ValueError(
                "Asynchronous training applies every gradient, so it has no backup workers: "
                f"set num_backup_workers=0. Received num_backup_workers={self.num_backup_workers}")

    @property
    def auto(self) -> bool:
        """Adaptive N: `num_backup_workers="auto"`."""
        return self.num_backup_workers == AUTO

    def protocol_config(self, info: cluster_lib.ClusterInfo) -> config_lib.ProtocolConfig:
        """The protocol's configuration for the cluster `info`, checking what depends on it.

        Raises:
          TypeError, ValueError: adaptive N's bounds are not `1 <= min <= max <=
            num_workers`, or `num_backup_workers` is not below the number of workers.
        """
        num_backup_workers, adaptive = self.num_backup_workers, None
        if self.auto:
            n_min, n_max = adaptive_lib.check_bounds(
                info.num_workers, self.min_replicas_to_aggregate, self.max_replicas_to_aggregate)
            adaptive = config_lib.AdaptiveSettings(n_min, n_max, window=self.adaptive_window,
                                                 warmup=min(config_lib.AdaptiveSettings.warmup, self.adaptive_window))
            num_backup_workers = info.num_workers - n_max  # the first steps' b
        if num_backup_workers >= info.num_workers:
            raise ValueError(
                f"`num_backup_workers` must be below the number of workers ({info.num_workers}): "
                f"at least one gradient makes a step. Received num_backup_workers={num_backup_workers}")
        return config_lib.ProtocolConfig(
            replicas_to_aggregate=1 if self.asynchronous else info.num_workers - num_backup_workers,
            num_workers=info.num_workers,
            adaptive=adaptive,
            staleness_check=not self.asynchronous,
            step_timeout=self.step_timeout,
            chief_timeout=self.chief_timeout,
            startup_timeout=self.startup_timeout,
            poll_max=self.poll_interval,
            poll_min=min(0.0005, self.poll_interval),
            ps_restart_timeout=self.ps_restart_timeout,
            wire_dtype=self.wire_dtype,
            apply_on_ps=apply_on_ps_before_the_optimizer(self.apply_on_ps, self.ps_restart_timeout,
                                                         self.chief_rejoins),
        )

    def extended_kwargs(self) -> dict:
        """The keyword arguments of the strategy's extended (`tf_backup.frontend.extended`) beyond the config."""
        return dict(worker_timeout=self.worker_timeout, max_steps=self.max_steps,
                    checkpoint_dir=self.checkpoint_dir, checkpoint_every_steps=self.checkpoint_every_steps,
                    ps_timeout=self.ps_timeout, chief_rejoins=self.chief_rejoins)


def apply_on_ps_before_the_optimizer(apply_on_ps: Union[bool, str], ps_restart_timeout: float,
                                     chief_rejoins: bool) -> Union[bool, str]:
    """`apply_on_ps` as far as the settings decide it: "auto" with a restart in place asked for is False.

    Only the chief can write a restarted task's state again, so it applies the update then; any
    other "auto" is left for the binding to decide from the inner optimizer (`binding.resolve_config`).
    """
    if apply_on_ps == AUTO and (ps_restart_timeout or chief_rejoins):
        return False
    return apply_on_ps
