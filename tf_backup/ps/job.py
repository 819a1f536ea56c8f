"""The job on the ps tasks: start, join, leave, abort, heartbeats and who is alive.

One int64 vector, `tf_backup/job` on ps task 0 (slots in `slots.Job`),
says which job runs (its id), whether it is done or aborted, and per worker
whether it joined or left and its heartbeat. Every process that watches
heartbeats reads them through a `BeatWatch`: the workers (`JobMonitor`, the
chief's), the chief (`Liveness`, every other worker's) and the ps tasks
(`tf_backup.ps.server.serve`, everybody's).
"""

import dataclasses
import random
import threading
import time
from typing import Callable, List, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from tf_backup import _checks
from tf_backup import cluster as cluster_lib
from tf_backup import errors
from tf_backup.protocol.membership import WorkerEventKind
from tf_backup.protocol.slots import Job
from tf_backup.ps import accumulators
from tf_backup.ps.endpoint import Endpoint


def job_variable(where: Endpoint, num_workers: int) -> accumulators.SharedVariable:
    """The job vector on ps task 0 (`where` is its endpoint)."""
    return accumulators.SharedVariable(Job.NAME, tf.int64, [Job(num_workers).size], where)


class BeatWatch:
    """When each heartbeat slot of the job vector last moved, on this process's clock.

    A slot counts as moved when its value differs from the last one seen; the
    first value seen counts only if it is not 0 (0: never beaten), so a task
    that never beat is silent from the moment the watch was made.
    """

    def __init__(self, slots: Sequence[int], clock: Callable[[], float] = time.monotonic):
        self._slots = list(slots)
        self._clock = clock
        now = clock()
        self._values: List[Optional[int]] = [None] * len(self._slots)
        self._since = [now] * len(self._slots)

    def observe(self, values) -> List[int]:
        """Reads the slots from a job vector; returns the positions (in `slots`) that moved."""
        now = self._clock()
        moved = []
        for i, slot in enumerate(self._slots):
            beat = int(values[slot])
            if beat != self._values[i]:
                if self._values[i] is not None or beat:
                    self._since[i] = now
                self._values[i] = beat
                moved.append(i)
        return moved

    def reset(self) -> None:
        """Counts every slot's silence from now."""
        self._since = [self._clock()] * len(self._slots)

    def silent_seconds(self, i: int) -> float:
        """Seconds since slot `i` (a position in `slots`) last moved."""
        return self._clock() - self._since[i]


class Heartbeat(threading.Thread):
    """Bumps this worker's heartbeat slots of the job vector every second.

    The chief bumps `Job.HEARTBEAT` (the workers and ps tasks watch it) and its
    own `Job.beat`; every other worker its `Job.beat` (the chief watches them,
    `Liveness`). A beat is the wall-clock time in milliseconds, so a restarted
    worker's beats differ from its predecessor's.
    """

    def __init__(self, job_var: accumulators.SharedVariable, slots: List[int], interval: float = 1.0):
        super().__init__(name="tf_backup-heartbeat", daemon=True)
        self._var = job_var
        self._slots = list(slots)
        self._interval = interval
        self._stop_event = threading.Event()

    def beat(self) -> None:
        now = int(time.time() * 1000)
        self._var.scatter_update(self._slots, [now] * len(self._slots))

    def run(self):
        failing = False  # beats go on through a ps outage: a restarted ps 0 gets the job vector back
        while not self._stop_event.wait(self._interval):
            try:
                self.beat()
                failing = False
            except Exception as e:  # pylint: disable=broad-except
                if not failing and not self._stop_event.is_set():
                    logging.warning("tf_backup: a heartbeat failed (it is tried again every %.0f s): %s",
                                    self._interval, e)
                failing = True

    def stop(self):
        self._stop_event.set()


class JobMonitor:
    """One worker's membership of the job: start (chief), join, health checks, leave.

    `check` reads the job vector at most once a second. Once the chief marked
    the job done, `done` is True.
    """

    def __init__(self, job_var: accumulators.SharedVariable, info: cluster_lib.ClusterInfo,
                 startup_timeout: float, chief_timeout: float):
        self._var = job_var
        self._job = Job(info.num_workers)
        self._worker_index = info.worker_index
        self._info = info
        self._startup_timeout = startup_timeout
        self._chief_timeout = chief_timeout
        self._last_check = 0.0
        self._chief_beat: Optional[BeatWatch] = None
        self._heartbeat: Optional[Heartbeat] = None
        self.job_id: Optional[int] = None
        self.rejoined = False  # (chief) `start` joined the job that was running, not a new one
        self.done = False

    def start(self, rejoin: bool = False) -> int:
        """(Chief.) Starts a new job with a random id, joins it and starts beating; returns the id.

        `rejoin`: if the ps already holds a job that is neither done nor
        aborted (this chief was restarted), join that one instead (`rejoined`).
        """
        self._chief_beat = BeatWatch([Job.HEARTBEAT])
        running = self._running_job() if rejoin else None
        if running is not None:
            self.job_id, self.rejoined = running, True
            self._var.scatter_update([self._job.joined(self._worker_index), self._job.left(self._worker_index)], [1, 0])
            logging.warning("tf_backup: the chief rejoins the running job %d.", running)
        else:
            self.job_id = random.SystemRandom().randrange(1, 2**62)
            values = np.zeros([self._job.size], np.int64)
            values[Job.JOB_ID] = self.job_id
            values[self._job.joined(self._worker_index)] = 1
            self._var.assign(values)
        self._start_heartbeat([Job.HEARTBEAT, self._job.beat(self._worker_index)])
        return self.job_id

    def _running_job(self) -> Optional[int]:
        """The id of the job on the ps if one runs (not done, not aborted, of this many workers), else None."""
        if not self._var.is_initialized():
            return None
        values = self._var.read()
        if len(values) != self._job.size or not values[Job.JOB_ID] or values[Job.DONE] or values[Job.ABORT]:
            return None
        return int(values[Job.JOB_ID])

    def join(self) -> int:
        """Waits for the chief to start a job on the ps tasks, joins it; returns its id."""
        if self.job_id is not None:
            return self.job_id

        def started():
            if not self._var.is_initialized():
                return None
            values = self._var.read()
            # A finished job's state (DONE) is a previous run's: wait for the new chief.
            return values if values[Job.JOB_ID] and not values[Job.DONE] else None

        values = _checks.poll_until(
            started, timeout=self._startup_timeout, first=0.1, longest=0.1,
            on_timeout=lambda waited: errors.StepTimeoutError(
                f"Worker {self._info.task} waited {self._startup_timeout:.0f} s for the chief "
                f"{self._info.chief} to start the job (startup_timeout)."))
        # `left` is cleared: this may be a restarted worker rejoining.
        self._var.scatter_update([self._job.joined(self._worker_index), self._job.left(self._worker_index)], [1, 0])
        self.job_id = int(values[Job.JOB_ID])
        self._chief_beat = BeatWatch([Job.HEARTBEAT])
        self._chief_beat.observe(values)
        self._start_heartbeat([self._job.beat(self._worker_index)])
        return self.job_id

    def _start_heartbeat(self, slots: List[int]) -> None:
        self._heartbeat = Heartbeat(self._var, slots)
        self._heartbeat.beat()
        self._heartbeat.start()

    def left_workers(self) -> List[int]:
        """The workers that have left the job (their process ended or shut down)."""
        values = self._var.read()
        return [w for w in range(self._job.num_workers) if values[self._job.left(w)]]

    def check(self, force: bool = False) -> None:
        """Updates `done`; raises ChiefUnavailableError if the chief aborted, went silent or was replaced."""
        now = time.monotonic()
        if not force and now - self._last_check < 1.0:
            return
        self._last_check = now
        values = self._var.read()
        chief = self._info.chief
        if self.job_id is not None and values[Job.JOB_ID] != self.job_id:
            raise errors.ChiefUnavailableError(
                f"The job on the ps tasks changed (job id {self.job_id} -> {values[Job.JOB_ID]}): "
                f"the chief {chief} was restarted. Restart this worker to rejoin."
            )
        if values[Job.ABORT]:
            raise errors.ChiefUnavailableError(f"The chief {chief} aborted the job; its log says why.")
        self.done = bool(values[Job.DONE])
        if self._chief_beat is None:
            return
        self._chief_beat.observe(values)
        silent = self._chief_beat.silent_seconds(0)
        if not self.done and silent > self._chief_timeout:
            raise errors.ChiefUnavailableError(
                f"The chief {chief} has sent no heartbeat for {silent:.0f} s "
                f"(chief_timeout={self._chief_timeout:.0f} s)."
            )

    def leave(self, *, chief_failed: Optional[bool] = None) -> None:
        """Leaves the job; the chief (`chief_failed` not None) first marks it done, and aborted if it failed.

        Waits for the updates to land before returning (the process may exit
        right after); a ps that is gone is logged, not raised.
        """
        if self.job_id is None:
            return  # never joined a job: nothing on the ps to update (the job vector may not exist)
        try:
            if chief_failed is not None:
                self._var.scatter_update([Job.DONE, Job.ABORT], [1, int(chief_failed)])
            self._var.scatter_update([self._job.left(self._worker_index)], [1])
            self._var.read()
        except Exception as e:  # pylint: disable=broad-except
            logging.warning("tf_backup shutdown could not update the job state: %s", e)
        if self._heartbeat is not None:
            self._heartbeat.stop()


def restore(job_var: accumulators.SharedVariable, values: np.ndarray) -> None:
    """(Chief.) Writes the job vector `values` (as last read) again, every heartbeat set to now.

    For a ps task 0 that restarted empty (`tf_backup.ps.recovery`): the same job
    id, so the workers carry on, and fresh beats, so nobody counts the outage
    as silence.
    """
    values = np.array(values, np.int64)
    job = Job((len(values) - Job.HEADER) // 3)
    now = int(time.time() * 1000)
    values[[Job.HEARTBEAT] + [job.beat(w) for w in range(job.num_workers)]] = now
    job_var.assign(values)


@dataclasses.dataclass
class WorkerEvent:
    """A worker the chief declared dead, or saw come back.

    Attributes:
      worker: the worker index.
      task: the worker's task (`/job:worker/task:2 (host:port)`).
      event: `WorkerEventKind.DIED` (no heartbeat for `worker_timeout`) or `.REJOINED`
        (a `str` enum: `event == "died"` holds).
      step: the global step when the chief noticed.
      last_step: the step the worker last pushed a gradient for (-1: none).
      time: `time.time()` when the chief noticed.
    """

    worker: int
    task: str
    event: WorkerEventKind
    step: int
    last_step: int
    time: float


class Liveness:
    """The chief's view of which workers are alive, from their heartbeats.

    A worker that joined the job is dead when its heartbeat (`Job.beat`) has
    not moved for `worker_timeout` seconds and it has not left the job; one
    that has not joined yet is dead `startup_timeout` seconds after the chief
    started watching. A dead worker whose heartbeat moves again (its process
    was restarted) is alive again. The chief itself is always alive.
    """

    def __init__(self, job_var: accumulators.SharedVariable, info: cluster_lib.ClusterInfo,
                 worker_timeout: float, startup_timeout: float, clock: Callable[[], float] = time.monotonic):
        self._var = job_var
        self._info = info
        self._job = Job(info.num_workers)
        self._worker_timeout = worker_timeout
        self._startup_timeout = startup_timeout
        self._watch = BeatWatch([self._job.beat(w) for w in range(info.num_workers)], clock)
        self.dead: set = set()
        self.left: set = set()
        self.events: List[WorkerEvent] = []
        self.values: Optional[np.ndarray] = None  # the job vector as last read

    @property
    def job_var(self) -> accumulators.SharedVariable:
        return self._var

    def reset(self) -> None:
        """Counts every worker's silence from now (after a ps outage, in which nobody could beat)."""
        self._watch.reset()

    @property
    def gone(self) -> frozenset:
        """The workers that are dead or left the job: nothing waits for them."""
        return frozenset(self.dead | self.left)

    def update(self, step: int, last_steps: Sequence[int]) -> List[WorkerEvent]:
        """Reads the heartbeats; returns the new events (also kept in `events`)."""
        values = self.values = self._var.read()
        moved = set(self._watch.observe(values))
        new = []
        for w in range(self._info.num_workers):
            if w == self._info.worker_index:
                continue
            if values[self._job.left(w)]:
                self.left.add(w)
                continue
            self.left.discard(w)
            if w in moved:
                if w in self.dead:
                    self.dead.discard(w)
                    new.append(self._event(w, WorkerEventKind.REJOINED, step, last_steps))
                continue
            timeout = self._worker_timeout if values[self._job.joined(w)] else self._startup_timeout
            if w not in self.dead and self._watch.silent_seconds(w) > timeout:
                self.dead.add(w)
                new.append(self._event(w, WorkerEventKind.DIED, step, last_steps))
        self.events.extend(new)
        return new

    def _event(self, w: int, event: WorkerEventKind, step: int, last_steps: Sequence[int]) -> WorkerEvent:
        return WorkerEvent(worker=w, task=str(self._info.workers[w]), event=event, step=int(step),
                           last_step=int(last_steps[w]), time=time.time())

    def silent_seconds(self, w: int) -> float:
        return self._watch.silent_seconds(w)
