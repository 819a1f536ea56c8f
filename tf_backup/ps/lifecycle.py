"""A ps task's lifecycle in `serve()`, pure: its phases, why it ends, and the move on each read.

`serve()` reads the job vector on ps 0 every `poll_interval` and hands what it
read to `transition`:

  WAITING --a job starts--> SERVING --done, aborted or chief lost--> ENDING --workers gone--> ENDED
                                   (or `exit_grace` after the end) --^

Any phase may end at once: no job within `startup_timeout` (NO_JOB), or, on a
ps task other than ps 0, ps 0 gone for good (PS0_EXITED) or back empty and not
written again within `ps_restart_timeout` (PS0_RESTARTED). A new job id (a
restarted chief's job) is served from the start, even if the previous one had
ended. The reads (`JobRead`, `NoJob`, `NoAnswer`, `Ps0Empty`) and the sleeps
are `tf_backup.ps.server`'s; nothing here does I/O or imports TensorFlow.
"""

import dataclasses
import enum
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

CHIEF = 0  # the chief is worker 0 in tf_backup order


class Phase(enum.Enum):
    WAITING = "waiting"  # for the chief to start a job (`startup_timeout`)
    SERVING = "serving"  # a job runs
    ENDING = "ending"  # the job ended: the workers that joined leave (`exit_grace`)
    ENDED = "ended"  # `serve()` returns, or raises for a failed end


class EndReason(str, enum.Enum):
    """Why `serve()` ended; a str, so `result.reason == "done"` reads as before."""

    DONE = "done"  # the chief marked the job done
    PS0_EXITED = "ps 0 exited"  # (a ps task other than ps 0) ps 0 went away before this task saw the end
    PS0_RESTARTED = "ps 0 restarted"  # (another ps task) ps 0 came back empty, not written again: `PsRestartedError`
    ABORTED = "aborted"  # the chief aborted the job: `ChiefUnavailableError`
    CHIEF_LOST = "chief lost"  # the chief went silent, or every task did: `ChiefUnavailableError`
    NO_JOB = "no job"  # no job started within `startup_timeout`: `TimeoutError`

    @property
    def failed(self) -> bool:
        """Whether `serve()` raises (a failed job ends its ps tasks non-zero, so they are restarted with it)."""
        return self in (EndReason.PS0_RESTARTED, EndReason.ABORTED, EndReason.CHIEF_LOST, EndReason.NO_JOB)


class ServeResult(NamedTuple):
    """What `serve()` returns: the job, why it ended (DONE or PS0_EXITED), the workers that left cleanly."""

    job_id: int
    reason: EndReason
    left: List[int]


@dataclasses.dataclass(frozen=True)
class Settings:
    """`serve()`'s timing arguments that the transitions read (seconds; see `serve()`)."""

    startup_timeout: float
    chief_timeout: float
    exit_grace: float
    silent_worker: float
    ps_restart_timeout: float
    chief_rejoins: bool


class JobRead(NamedTuple):
    """The job vector, read: a job id (not 0) and, per worker, its flags and seconds of heartbeat silence."""

    job_id: int
    done: bool
    aborted: bool
    joined: Tuple[bool, ...]
    left: Tuple[bool, ...]
    silence: Tuple[float, ...]  # per worker, seconds since its beat last moved (`BeatWatch`)
    chief_silence: float  # seconds since the chief's heartbeat (`Job.HEARTBEAT`) last moved


class NoJob(NamedTuple):
    """The job vector holds no job (not written yet, or job id 0)."""


class NoAnswer(NamedTuple):
    """(A ps task other than ps 0, once a job runs.) ps 0 did not answer the read.

    `listening`: whether ps 0's address still accepts connections; a probe (a
    TCP connect, up to a second), called only when its answer decides.
    """

    listening: Callable[[], bool]


class Ps0Empty(NamedTuple):
    """(A ps task other than ps 0, once a job runs.) ps 0 answered without the job vector.

    It restarted and lost every resource; the chief writes them again under
    `ps_restart_timeout` (`tf_backup.ps.recovery`), and until then this read
    comes back.
    """


Read = Union[JobRead, NoJob, NoAnswer, Ps0Empty]


@dataclasses.dataclass(frozen=True)
class Lifecycle:
    """Where a ps task's `serve()` stands.

    Attributes:
      phase: see `Phase`.
      started: when `serve()` began waiting (the clock of `transition`'s `now`).
      job_id: the job served (None: none yet).
      ended_at: when the job ended (done, aborted, lost); None while it runs.
      reason: why (None while it runs).
      unanswered_since: (a ps task other than ps 0) since when ps 0 has not answered; None: it answers.
      joined, left: per worker, as last read.
    """

    phase: Phase
    started: float
    job_id: Optional[int] = None
    ended_at: Optional[float] = None
    reason: Optional[EndReason] = None
    unanswered_since: Optional[float] = None
    joined: Tuple[bool, ...] = ()
    left: Tuple[bool, ...] = ()

    def never_left(self) -> List[int]:
        """The workers that joined the job and had not left it at the last read."""
        return [w for w, (j, l) in enumerate(zip(self.joined, self.left)) if j and not l]

    def result(self) -> ServeResult:
        return ServeResult(self.job_id, self.reason, [w for w, l in enumerate(self.left) if l])


def waiting(now: float) -> Lifecycle:
    """The lifecycle of a `serve()` that starts waiting for a job at `now`."""
    return Lifecycle(Phase.WAITING, started=now)


def transition(state: Lifecycle, read: Read, now: float, settings: Settings) -> Lifecycle:
    """The lifecycle after `read`, at `now`; pure (but for `NoAnswer.listening`, called when it decides)."""
    if state.phase is Phase.ENDED:
        raise ValueError(f"serve() has ended ({state.reason}): nothing more is read.")
    if isinstance(read, NoAnswer):
        return _no_answer(state, read, now, settings)
    if isinstance(read, Ps0Empty):
        return _ps0_empty(state, now, settings)
    if isinstance(read, NoJob) or (state.job_id is None and read.done):
        # No job yet, or a previous job's finished state: wait for the chief.
        state = dataclasses.replace(state, unanswered_since=None)
        if now - state.started > settings.startup_timeout:
            return dataclasses.replace(state, phase=Phase.ENDED, reason=EndReason.NO_JOB)
        return state
    if read.job_id != state.job_id:
        state = Lifecycle(Phase.SERVING, state.started, job_id=read.job_id)
    state = dataclasses.replace(state, unanswered_since=None, joined=read.joined, left=read.left)
    gone = all(l or not j or s > settings.silent_worker for j, l, s in zip(read.joined, read.left, read.silence))
    if state.ended_at is None and read.done:
        state = _end(state, now, EndReason.ABORTED if read.aborted else EndReason.DONE)
    if state.ended_at is None and (read.chief_silence > settings.chief_timeout
                                   or gone and not read.left[CHIEF] and not settings.chief_rejoins):
        state = _end(state, now, EndReason.CHIEF_LOST)  # silent, or every task that used the ps is
    if state.ended_at is not None and (gone or now - state.ended_at > settings.exit_grace):
        state = dataclasses.replace(state, phase=Phase.ENDED)
    return state


def _end(state: Lifecycle, now: float, reason: EndReason) -> Lifecycle:
    return dataclasses.replace(state, phase=Phase.ENDING, ended_at=now, reason=reason)


def _unanswered_since(state: Lifecycle, now: float) -> float:
    """Since when ps 0 has not answered with the job vector (down, then back empty: one stretch)."""
    if state.job_id is None:
        raise ValueError("Only a ps task that serves a job reads ps 0 with a deadline.")
    return now if state.unanswered_since is None else state.unanswered_since


def _no_answer(state: Lifecycle, read: NoAnswer, now: float, settings: Settings) -> Lifecycle:
    since = _unanswered_since(state, now)
    down = now - since
    restarting = state.ended_at is None and down < settings.ps_restart_timeout  # the job is not over: ps 0 died
    if down < settings.chief_timeout and (restarting or read.listening()):
        return dataclasses.replace(state, unanswered_since=since)  # ps 0 is slow or restarting, not gone
    # ps 0 exits once the job is done and every worker has left (a later poll here may never see
    # DONE); without ps 0 nothing can go on anyway.
    return dataclasses.replace(state, phase=Phase.ENDED, unanswered_since=since,
                               reason=state.reason or EndReason.PS0_EXITED)


def _ps0_empty(state: Lifecycle, now: float, settings: Settings) -> Lifecycle:
    since = _unanswered_since(state, now)
    if state.ended_at is None and now - since < settings.ps_restart_timeout:
        return dataclasses.replace(state, unanswered_since=since)  # the chief is writing the state again
    # Nobody writes it again (no `ps_restart_timeout`, or past it, or the job had ended): this task's
    # share of the state belongs to a job that cannot go on; a failed end (non-zero), so a cluster
    # manager starts it again with the next attempt, as for ABORTED.
    return dataclasses.replace(state, phase=Phase.ENDED, unanswered_since=since,
                               reason=state.reason or EndReason.PS0_RESTARTED)
