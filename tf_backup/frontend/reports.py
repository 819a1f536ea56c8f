"""What `BackupWorkerStrategy` reports: the job's shape, and what happened (gradient counts, counters, history).

`GradientStats` is the typed reading of one optimizer's per-worker gradient
counts on the ps (`stats()` returns it as the dict it always returned);
`JobReports`, a base of the strategy, holds its read-only accessors, over its
extended (`tf_backup.frontend.extended`).
"""

import dataclasses
from typing import List, Optional, Tuple, Union

from tf_backup.chief import aggregator as aggregator_lib
from tf_backup.protocol import config as config_lib
from tf_backup.protocol import slots
from tf_backup.protocol import slow_workers as slow_workers_lib
from tf_backup.ps import job as job_lib


@dataclasses.dataclass(frozen=True)
class GradientStats:
    """Per-worker gradient counts of one optimizer, from its control vector on the ps.

    Attributes:
      global_step: the committed global step.
      pushed: gradients each worker pushed.
      taken: gradients of each worker averaged into a step.
      cancelled: batches never pushed because the step moved on while they
        were computed (`BackupWorkerStrategy.sleep_unless_superseded`).
      batches: each worker's input position: batches pushed or cancelled,
        counting a restarted batch once (`BackupWorkerStrategy.input_position`).
    """

    global_step: int
    pushed: Tuple[int, ...]
    taken: Tuple[int, ...]
    cancelled: Tuple[int, ...]
    batches: Tuple[int, ...]

    @classmethod
    def read(cls, ctl: slots.ControlView) -> "GradientStats":
        def ints(block: slots.Block):
            return tuple(int(x) for x in ctl.block(block))

        return cls(global_step=ctl.step, pushed=ints(slots.Block.PUSHED), taken=ints(slots.Block.TAKEN),
                   cancelled=ints(slots.Block.CANCELLED), batches=ints(slots.Block.BATCHES))

    @property
    def dropped(self) -> Tuple[int, ...]:
        """Gradients pushed and never applied (stale, or pending when training stopped): `pushed - taken`."""
        return tuple(p - t for p, t in zip(self.pushed, self.taken))

    def as_dict(self) -> dict:
        """`BackupWorkerStrategy.stats()`'s dict: `global_step`, and a list per worker for each count."""
        return {"global_step": self.global_step, "pushed": list(self.pushed), "taken": list(self.taken),
                "dropped": list(self.dropped), "cancelled": list(self.cancelled), "batches": list(self.batches)}


class JobReports:
    """`BackupWorkerStrategy`'s read-only accessors (a base of the strategy: `self.extended`)."""

    # -- what the job is -------------------------------------------------------------

    @property
    def num_workers(self) -> int:
        """N + b: every worker of the cluster."""
        return self.extended.cluster.num_workers

    @property
    def replicas_to_aggregate(self) -> int:
        """N: the fresh gradients averaged into one step (adaptive N: the first steps', the upper bound)."""
        return self.extended.config.replicas_to_aggregate

    @property
    def num_backup_workers(self) -> Union[int, str]:
        """b: the workers a step does not wait for (0 in asynchronous mode; `"auto"`: adaptive N)."""
        if self.asynchronous:
            return 0
        if self.adaptive is not None:
            return "auto"
        return self.num_workers - self.replicas_to_aggregate

    @property
    def adaptive(self) -> Optional[config_lib.AdaptiveSettings]:
        """The bounds and window of adaptive N, or None when N is fixed."""
        return self.extended.config.adaptive

    @property
    def asynchronous(self) -> bool:
        return not self.extended.config.staleness_check

    @property
    def worker_index(self) -> int:
        """This process's worker index; 0 is the chief."""
        return self.extended.cluster.worker_index

    @property
    def is_chief(self) -> bool:
        return self.extended.cluster.is_chief

    # -- what happened -------------------------------------------------------------

    def stats(self) -> dict:
        """Per-worker gradient counts of the latest optimizer, read from the ps.

        Returns:
          A dict with `global_step` and per-worker lists `pushed`, `taken`
          and `dropped` (pushed and never applied: stale, or still pending when
          training stopped), so `taken + dropped == pushed` for every worker;
          and `cancelled`: batches never pushed because the step moved on
          while they were computed (see `sleep_unless_superseded`); and
          `batches`: each worker's input position (batches pushed or
          cancelled, counting a restarted batch once; see `input_position`).
          (`GradientStats.as_dict`.)
        """
        return GradientStats.read(self.extended.latest_binding().state.read_control()).as_dict()

    def counters(self):
        """This worker's protocol counters for the latest optimizer (`tf_backup.frontend.binding.Counters`).

        Raises:
          ValueError: no SyncReplicasOptimizer has been built yet.
        """
        return self.extended.latest_binding().counters()

    def step_history(self) -> List[aggregator_lib.StepRecord]:
        """The chief's record of the latest optimizer's steps, in order (chief only): the newest
        `tf_backup.chief.aggregator.HISTORY_LIMIT` (100,000) steps, so that a long job's record stays
        bounded (at most 64 MB); `StepRecord.step` says which steps they are."""
        if not self.is_chief:
            raise ValueError(
                f"Only the chief keeps the step history; this is worker {self.worker_index}."
            )
        if not self.extended.bindings:
            return []
        return list(self.extended.latest_binding().aggregator.history)

    def slow_workers(self) -> Tuple[slow_workers_lib.SlowWorker, ...]:
        """The persistently slow workers as of the latest step (chief only): which, how many times the
        typical worker's compute time, since which step (`tf_backup.protocol.slow_workers`); the
        stretches of the whole job are in `step_history()` (`StepRecord.slow_workers`)."""
        if not self.is_chief:
            raise ValueError(f"Only the chief sees every worker's compute times; this is worker {self.worker_index}.")
        if not self.extended.bindings:
            return ()
        return self.extended.latest_binding().aggregator.tracker.slow_workers.slow

    def worker_events(self) -> List[job_lib.WorkerEvent]:
        """The workers the chief declared dead, or saw rejoin, in order (chief only)."""
        if not self.is_chief:
            raise ValueError(
                f"Only the chief watches the workers' heartbeats; this is worker {self.worker_index}."
            )
        events = []
        for binding in self.extended.bindings:
            if binding.aggregator is not None and binding.aggregator.liveness is not None:
                events += binding.aggregator.liveness.events
        return events

    @property
    def initial_step(self) -> int:
        """The global step the latest optimizer started from.

        On the chief, the step of the checkpoint it restored (0: none); on the
        other workers, the step of their first pull (a worker restarted into a
        running job starts where the job is).
        """
        return self.extended.latest_binding().initial_step

    @property
    def input_position(self) -> int:
        """Batches of this worker's input the job has finished with (latest optimizer), when it joined.

        0 for a new job. A worker restarted into a running job: the batches its
        predecessors pushed or cancelled. A job resumed from a checkpoint: the
        batches each worker had pushed for the steps before the checkpoint's
        (saved with it), so the redone steps read their batches again. Skip
        them before `fit` makes its iterator, so that no batch is trained on
        twice and none is skipped: `distribute_dataset(dataset, resume_input=True)`
        does (after sharding), or `dataset.skip(strategy.input_position)` on a
        dataset that is this worker's shard already.
        It holds only for a dataset that yields the same batches in the same
        order in every process (see docs/design.md, "Input position").
        Known after the optimizer is built (`optimizer.build(model.trainable_variables)`
        under the scope, as for `initial_step`).
        """
        return self.extended.latest_binding().initial_input_position
