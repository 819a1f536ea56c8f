"""Training configs: a JSON file from `configs/` (or a path), overridden by flags.

A config is a flat JSON object; `model` is a small object (`kind` plus its
sizes). `TrainConfig.from_dict` validates every field and names the field and
the value in its error.
"""

import dataclasses
import importlib.resources
import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple, Union

MODES = ("sync_backup", "sync", "async")
AUTO = "auto"  # num_backup_workers: adaptive N
OPTIMIZERS = ("sgd", "momentum", "adam", "rmsprop", "adamw")


class ConfigError(ValueError):
    """A config file or a value in it (or a flag overriding it) is not valid."""


def available() -> List[str]:
    """The names of the configs shipped in `configs/`."""
    return sorted(p.name[:-5] for p in importlib.resources.files("configs").iterdir()
                  if p.name.endswith(".json"))


def read(name_or_path: str) -> Dict[str, Any]:
    """Reads a shipped config by name (`mnist1d`) or a JSON file by path."""
    if name_or_path.endswith(".json") or os.sep in name_or_path:
        path = name_or_path
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"--config={name_or_path}: cannot read the file ({e.strerror}).") from e
    else:
        resource = importlib.resources.files("configs") / f"{name_or_path}.json"
        if not resource.is_file():
            raise ConfigError(
                f"--config={name_or_path}: no such config; known: {', '.join(available())} "
                "(or a path to a .json file).")
        text = resource.read_text()
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config={name_or_path}: not valid JSON ({e}).") from e
    if not isinstance(values, dict):
        raise ConfigError(f"--config={name_or_path}: a config must be a JSON object.")
    return values


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; every task of the run gets the same one.

    Attributes:
      dataset: a name known to `trainers.data` (mnist1d, mnist, cifar10, regression).
      model: `{"kind": ..., sizes}` for `trainers.models.build`.
      num_workers: worker processes, N + b.
      num_backup_workers: b; 0 in the `sync` and `async` modes; "auto": the chief
        picks each step's N (adaptive N) between `min_replicas_to_aggregate` and
        `max_replicas_to_aggregate` (None: 1 and every worker).
      num_ps: ps tasks the variables are spread over.
      mode: sync_backup (N of N + b), sync (all workers), async (every gradient applied).
      optimizer, learning_rate: the inner Keras optimizer.
      batch_size: examples per worker per step.
      steps: global steps to train; exclusive with `epochs`.
      epochs: passes over the training set (N * batch_size examples per step).
      straggler: a `tf_backup.sim.stragglers` spec.
      cancel_stragglers: cut a straggler's delay short once its batch is
        superseded (the step moved on): the batch is cancelled, not pushed.
      restart_stragglers: cut it short the same way, then restart the batch
        on the new step (a fresh delay first); it is pushed for that step.
      seed: seeds the model initializers, data shuffling and the straggler model.
      data_dir: tfds data directory (None: tfds' default).
      log_every: global steps between progress lines on the chief.
    """

    dataset: str
    model: Dict[str, Any]
    num_workers: int = 5
    num_backup_workers: Union[int, str] = 1
    min_replicas_to_aggregate: Optional[int] = None
    max_replicas_to_aggregate: Optional[int] = None
    num_ps: int = 1
    mode: str = "sync_backup"
    optimizer: str = "adam"
    learning_rate: float = 0.001
    batch_size: int = 32
    steps: Optional[int] = None
    epochs: Optional[int] = None
    straggler: str = "none"
    cancel_stragglers: bool = False
    restart_stragglers: bool = False
    seed: int = 0
    data_dir: Optional[str] = None
    log_every: int = 50
    description: str = ""

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"Unknown config field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}.")
        for required in ("dataset", "model"):
            if values.get(required) is None:
                raise ConfigError(f"The config has no `{required}`.")
        config = cls(**values)
        config.validate()
        return config

    def replace(self, **overrides) -> "TrainConfig":
        """A copy with `overrides` (flag values; None means "keep the config's")."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "steps" in overrides:
            overrides.setdefault("epochs", None)
        elif "epochs" in overrides:
            overrides["steps"] = None
        config = dataclasses.replace(self, **overrides)
        if config.mode in ("sync", "async"):
            config = dataclasses.replace(config, num_backup_workers=0)
        config.validate()
        return config

    def validate(self) -> None:
        def integer(name, minimum):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"--{name} must be an integer >= {minimum}. Received {name}={value!r}")

        auto = self.num_backup_workers == AUTO
        for name, minimum in (("num_workers", 1), ("num_backup_workers", 0), ("num_ps", 1),
                              ("batch_size", 1), ("seed", 0), ("log_every", 1)):
            if not (name == "num_backup_workers" and auto):
                integer(name, minimum)
        for name in ("min_replicas_to_aggregate", "max_replicas_to_aggregate"):
            if getattr(self, name) is None:
                continue
            if not auto:
                raise ConfigError(f"--{name} bounds an adaptive N: it needs --num_backup_workers=auto. "
                                  f"Received {name}={getattr(self, name)!r}, num_backup_workers="
                                  f"{self.num_backup_workers!r}")
            integer(name, 1)
        if auto:
            lo = self.min_replicas_to_aggregate or 1
            hi = self.max_replicas_to_aggregate or self.num_workers
            if not lo <= hi <= self.num_workers:
                raise ConfigError(
                    f"Need 1 <= --min_replicas_to_aggregate <= --max_replicas_to_aggregate <= --num_workers "
                    f"({self.num_workers}). Received min_replicas_to_aggregate={self.min_replicas_to_aggregate!r}, "
                    f"max_replicas_to_aggregate={self.max_replicas_to_aggregate!r}")
        for name in ("cancel_stragglers", "restart_stragglers"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"`{name}` must be true or false. Received {name}={getattr(self, name)!r}")
        if self.cancel_stragglers and self.restart_stragglers:
            raise ConfigError("Set at most one of --cancel_stragglers (skip a superseded batch) and "
                              "--restart_stragglers (compute it on the new step). Received both.")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}. Received mode={self.mode!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"--optimizer must be one of {', '.join(OPTIMIZERS)}. Received optimizer={self.optimizer!r}")
        if not auto and self.num_backup_workers >= self.num_workers:
            raise ConfigError(
                f"--num_backup_workers must be below --num_workers ({self.num_workers}). "
                f"Received num_backup_workers={self.num_backup_workers}")
        if self.mode == "sync_backup" and not auto and self.num_backup_workers < 1:
            raise ConfigError(
                "--mode=sync_backup needs --num_backup_workers >= 1 (use --mode=sync for none). "
                f"Received num_backup_workers={self.num_backup_workers}")
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
            raise ConfigError(f"--learning_rate must be a positive number. Received learning_rate={lr!r}")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(
                f"Give exactly one of --steps and --epochs. Received steps={self.steps!r}, epochs={self.epochs!r}")
        for name in ("steps", "epochs"):
            if getattr(self, name) is not None:
                integer(name, 1)
        if not isinstance(self.model, dict) or "kind" not in self.model:
            raise ConfigError(f"`model` must be an object with a `kind`. Received model={self.model!r}")

    @property
    def adaptive(self) -> bool:
        """Whether the chief picks each step's N (`num_backup_workers="auto"`)."""
        return self.num_backup_workers == AUTO and self.mode != "async"

    @property
    def replicas_to_aggregate(self) -> int:
        """N: gradients averaged per step (adaptive N: the upper bound, the first steps' N)."""
        if self.mode == "async":
            return 1
        if self.adaptive:
            return self.max_replicas_to_aggregate or self.num_workers
        return self.num_workers - self.num_backup_workers

    @property
    def tolerated_failures(self) -> int:
        """Workers that may die without ending the job: b, or (adaptive N) all but the smallest N."""
        if self.mode == "async":
            return 0
        if self.adaptive:
            return self.num_workers - (self.min_replicas_to_aggregate or 1)
        return self.num_backup_workers

    def strategy_args(self) -> Dict[str, Any]:
        """The `BackupWorkerStrategy` arguments of the mode and the backup workers."""
        args = {"num_backup_workers": self.num_backup_workers, "asynchronous": self.mode == "async"}
        if self.adaptive:
            args.update(min_replicas_to_aggregate=self.min_replicas_to_aggregate,
                        max_replicas_to_aggregate=self.max_replicas_to_aggregate)
        return args

    def schedule(self, num_train: int) -> Tuple[int, int]:
        """(epochs, steps_per_epoch) of `model.fit` on every worker, in local batches.

        In the sync modes a worker computes at most one gradient per global
        step, so its batches count global steps, and a global step consumes
        N * batch_size examples. In async mode every gradient is a global
        step: each worker runs 1/W of them.
        """
        workers = self.num_workers if self.mode == "async" else 1
        if self.steps is not None:
            return 1, math.ceil(self.steps / workers)
        per_batch = self.batch_size * (self.num_workers if self.mode == "async" else self.replicas_to_aggregate)
        return self.epochs, max(1, math.ceil(num_train / per_batch))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
