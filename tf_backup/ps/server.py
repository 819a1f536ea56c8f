"""`serve()`: what a `ps` task runs."""

import time

from absl import logging
import tensorflow as tf

from tf_backup import _checks
from tf_backup import cluster as cluster_lib
from tf_backup import errors
from tf_backup import memory
from tf_backup import topology
from tf_backup.protocol.slots import Job
from tf_backup.ps import endpoint as endpoint_lib
from tf_backup.ps import job as job_lib
from tf_backup.ps import lifecycle


def _start_server(info: cluster_lib.ClusterInfo) -> tf.distribute.Server:
    spec = tf.train.ClusterSpec({cluster_lib.PS_JOB: [t.address for t in info.ps]})
    try:
        return tf.distribute.Server(
            spec, job_name=cluster_lib.PS_JOB, task_index=info.task.index, protocol="grpc", start=True
        )
    except tf.errors.OpError as e:
        raise ValueError(
            f"The ps task {info.task} could not start its server on {info.task.address} "
            f"(is the port already in use?): {e.message}"
        ) from e


def _job_variable_of_other_ps(endpoints: endpoint_lib.Endpoints, ps0: cluster_lib.Task, num_workers: int):
    """The job vector as a ps task other than ps 0 reads it once the job runs.

    ps 0 exits as soon as the job is done and every worker has left; a read
    from another ps task just after would block for the endpoint's whole
    timeout (60 s) on the vanished task, so these reads have a short deadline.
    """
    return job_lib.job_variable(endpoints.of(ps0, timeout=5.0), num_workers)


def _accepts_connections(task: cluster_lib.Task) -> bool:
    try:
        cluster_lib.wait_for_tasks([task], timeout=0.0)
        return True
    except TimeoutError:
        return False


def serve(cluster_resolver=None, *, startup_timeout: float = 600.0, chief_timeout: float = 120.0,
          exit_grace: float = 60.0, poll_interval: float = 0.5, silent_worker: float = 10.0,
          ps_restart_timeout: float = 0.0, chief_rejoins: bool = False) -> lifecycle.ServeResult:
    """Runs this process's `ps` task until the training job ends.

    Starts a `tf.distribute.Server` for the task and serves the shared state
    the workers place on it. Returns once the chief has marked the job done and
    every worker has left (or `exit_grace` seconds after the chief marked it
    done), so no worker's last op meets a vanished ps task.

    Args:
      cluster_resolver: default `TFConfigClusterResolver()`; its task must be a
        `ps` task.
      startup_timeout: seconds to wait for the chief to start the job.
      chief_timeout: seconds of chief silence (no heartbeat, job not done)
        after which the job is declared lost.
      exit_grace: seconds to wait, after the job is done (or lost), for the
        workers that have not left yet.
      poll_interval: seconds between two reads of the job state.
      silent_worker: once the job is done, a worker that joined but whose
        heartbeat has not moved for this many seconds is not waited for (its
        process was killed). When every worker, the chief included, is
        silent or gone before the job is done, the job is lost at once
        (with `chief_rejoins`: once the chief has been silent `chief_timeout`).
      ps_restart_timeout: (a ps task other than ps 0) seconds it keeps
        serving while ps 0 is gone before the job is done: ps 0 may be
        restarting, and the chief writes the job again (`tf_backup.ps.recovery`;
        the workers' `BackupWorkerStrategy(ps_restart_timeout=...)`). 0: it
        exits with ps 0. ps 0 back empty and not written again in that
        time: `PsRestartedError`.
      chief_rejoins: a chief that dies once every other task has left (the
        end of the job) may be restarted and rejoin: it is waited for up to
        `chief_timeout` of silence, not declared lost at once (the chief's
        `BackupWorkerStrategy(chief_rejoins=True)`).

    Returns:
      A `tf_backup.ps.lifecycle.ServeResult`: `job_id`, `reason` (an
      `EndReason`, a str: "done", or on a ps task other than ps 0 "ps 0
      exited") and `left`, the workers that left cleanly.

    A worker that never joined the job (it exited, or is not started) is not
    waited for.

    Raises:
      ValueError: an argument is out of range, this task is not a ps task, or its server cannot start.
      TypeError: `chief_rejoins` is not a bool.
      TimeoutError: no job started within `startup_timeout`.
      tf_backup.errors.ChiefUnavailableError: the chief went silent without
        finishing the job, or aborted it (a failed job ends its ps tasks
        non-zero too, so a cluster manager restarts them with the job).
      tf_backup.errors.PsRestartedError: (a ps task other than ps 0) ps 0
        restarted and its state was not written again within
        `ps_restart_timeout` (0: at once).
    """
    # Every argument is checked before anything starts: a bad one would otherwise surface as a
    # sleep(-1) or a comparison error deep in the serving loop.
    startup_timeout = _checks.check_seconds("startup_timeout", startup_timeout)
    chief_timeout = _checks.check_seconds("chief_timeout", chief_timeout)
    exit_grace = _checks.check_seconds("exit_grace", exit_grace, allow_zero=True)
    poll_interval = _checks.check_seconds("poll_interval", poll_interval)
    silent_worker = _checks.check_seconds("silent_worker", silent_worker)
    ps_restart_timeout = _checks.check_seconds("ps_restart_timeout", ps_restart_timeout, allow_zero=True)
    _checks.check_bool("chief_rejoins", chief_rejoins)
    settings = lifecycle.Settings(startup_timeout, chief_timeout, exit_grace, silent_worker, ps_restart_timeout,
                                  chief_rejoins)
    if cluster_resolver is None:
        cluster_resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    info = topology.cluster_info(cluster_resolver)  # a TPU pod: one worker per host group
    if info.task.job != cluster_lib.PS_JOB:
        raise ValueError(
            f"`tf_backup.serve()` runs ps tasks; this process is {info.task}. Workers build a "
            "BackupWorkerStrategy instead."
        )
    memory.tune_malloc()  # the ps copies every gradient and parameter in and out: keep freed buffers
    server = _start_server(info)  # serves until this function returns
    logging.info("tf_backup: ps task %s serving on %s", info.task, server.target)
    ps0 = info.ps[0]
    if info.task != ps0:
        cluster_lib.wait_for_tasks([ps0], startup_timeout, waiter=f"ps task {info.task}")
    endpoints = endpoint_lib.Endpoints()
    try:
        return _serve_job(info, endpoints, settings, poll_interval)
    finally:
        # Its sessions go to ps 0: here, to itself (closed at once); on another ps task, to a ps 0 that
        # may have exited first, whose close would block until the session's deadline: 2 s at most.
        endpoints.close(wait=2.0)


def _serve_job(info: cluster_lib.ClusterInfo, endpoints: endpoint_lib.Endpoints, settings: lifecycle.Settings,
               poll_interval: float) -> lifecycle.ServeResult:
    """`serve()`'s loop: reads the job vector until the job ends (`tf_backup.ps.lifecycle`); returns `serve()`'s result."""
    ps0 = info.ps[0]
    job = job_lib.job_variable(endpoints.of(ps0), info.num_workers)
    beats = _Beats(info.num_workers)
    done_job = None  # once the job runs, another ps task reads it with a short deadline
    state = lifecycle.waiting(time.monotonic())
    while True:
        now = time.monotonic()
        if state.job_id is not None and info.task != ps0:
            done_job = done_job or _job_variable_of_other_ps(endpoints, ps0, info.num_workers)
            read = _read_ps0(done_job, beats, ps0)
        else:
            read = beats.read(job.read() if job.is_initialized() else None)
        served = state.job_id
        state = lifecycle.transition(state, read, now, settings)
        if state.job_id != served:
            logging.info("tf_backup: ps task %s serves job %d", info.task, state.job_id)
        if state.phase is lifecycle.Phase.ENDED:
            break
        time.sleep(poll_interval)
    if isinstance(read, lifecycle.NoAnswer):
        logging.warning("tf_backup: ps task %s exits: ps task 0 %s has exited", info.task, ps0)
    elif isinstance(read, lifecycle.JobRead) and info.task == ps0 and len(info.ps) > 1:
        time.sleep(2 * poll_interval)  # the other ps tasks see DONE before ps 0 is gone
    return _ended(info, state, settings)


def _read_ps0(done_job, beats: "_Beats", ps0: cluster_lib.Task) -> lifecycle.Read:
    """(A ps task other than ps 0, once a job runs.) The job vector on ps 0, read; ps 0's failures as reads."""
    try:
        return beats.read(done_job.read())
    except errors.PsUnavailableError:  # (a restarted ps 0: PsRestartedError; the next read is answered)
        return lifecycle.NoAnswer(listening=lambda: _accepts_connections(ps0))
    except tf.errors.FailedPreconditionError:  # answered, but the variable is gone: ps 0 restarted empty
        return lifecycle.Ps0Empty()


class _Beats:
    """The job vector's reads as `lifecycle` reads, with each worker's heartbeat silence.

    Its `BeatWatch` is the job's: a new one for each job id read.
    """

    def __init__(self, num_workers: int):
        self._slots = Job(num_workers)
        self._num_workers = num_workers
        self._job_id = None
        self._watch = None

    def read(self, values) -> lifecycle.Read:
        if values is None or not values[Job.JOB_ID]:
            return lifecycle.NoJob()
        n, slots = self._num_workers, self._slots
        if int(values[Job.JOB_ID]) != self._job_id:
            self._job_id = int(values[Job.JOB_ID])
            # Every worker's beat, then the chief's heartbeat (the last slot).
            self._watch = job_lib.BeatWatch([slots.beat(w) for w in range(n)] + [Job.HEARTBEAT])
        self._watch.observe(values)
        return lifecycle.JobRead(
            self._job_id, done=bool(values[Job.DONE]), aborted=bool(values[Job.ABORT]),
            joined=tuple(bool(values[slots.joined(w)]) for w in range(n)),
            left=tuple(bool(values[slots.left(w)]) for w in range(n)),
            silence=tuple(self._watch.silent_seconds(w) for w in range(n)),
            chief_silence=self._watch.silent_seconds(n))


def _ended(info: cluster_lib.ClusterInfo, state: lifecycle.Lifecycle,
           settings: lifecycle.Settings) -> lifecycle.ServeResult:
    """`serve()`'s result, or its error, once `state` has ENDED."""
    reason = state.reason
    if reason is lifecycle.EndReason.NO_JOB:
        raise TimeoutError(
            f"The ps task {info.task} waited {settings.startup_timeout:.0f} s for the chief "
            f"{info.chief} to start a job (startup_timeout)."
        )
    missing = [str(info.workers[w]) for w in state.never_left()]
    if missing and reason not in (lifecycle.EndReason.PS0_EXITED, lifecycle.EndReason.PS0_RESTARTED):
        # (Not when ps 0 went away or came back empty: this task did not see the last state then.)
        logging.warning("tf_backup: ps task %s exits; workers that never left: %s",
                        info.task, ", ".join(missing))
    if reason is lifecycle.EndReason.PS0_RESTARTED:
        raise errors.PsRestartedError(
            f"The ps task 0 {info.ps[0]} restarted and lost the job {state.job_id}'s state, and the chief "
            f"{info.chief} did not write it again within ps_restart_timeout ({settings.ps_restart_timeout:.0f} s); "
            f"the ps task {info.task} exits with the job.")
    if reason is lifecycle.EndReason.ABORTED:
        # Non-zero, so that a cluster manager (restartPolicy: OnFailure) or `LocalCluster`'s supervisor
        # starts this task again for the next attempt: an exit 0 would leave the job without its ps.
        raise errors.ChiefUnavailableError(
            f"The chief {info.chief} aborted the job {state.job_id} (its log says why); the ps task {info.task} "
            "exits with it.")
    if reason is lifecycle.EndReason.CHIEF_LOST:
        raise errors.ChiefUnavailableError(
            f"The ps task {info.task} heard no heartbeat from the chief {info.chief} for "
            f"{settings.chief_timeout:.0f} s and the job {state.job_id} was not done."
        )
    return state.result()
