"""How a process reaches one ps task: a graph of raw ops and a session on the task's server.

Processes reach a ps task through an `Endpoint`: a graph of raw ops and a
`tf.compat.v1.Session` on the task's gRPC target, TensorFlow's distributed
session runtime (the one TF1's SyncReplicasOptimizer used). Every run has a
deadline. We do not use eager remote execution (`connect_to_cluster`) here:
on TF 2.21 a ps task serving several eager clients crashed (SIGSEGV in
`GetOrCreateKernelAndDevice`), and one failed eager remote op poisons all later
ones of its client (see WORKSPACE_NOTES.md).

A strategy owns its `Endpoints` (one per task, with its `ps_timeout`); there
is no process-wide registry.
"""

import enum
import threading
import time
from typing import Dict, Optional, Tuple

from absl import logging
import tensorflow as tf

from tf_backup import errors
from tf_backup.ps.run_watch import RunWatch

DEFAULT_TIMEOUT = 60.0


class OnDuplicate(enum.Enum):
    """What `Endpoint.run` does when gRPC delivered its request twice (the first delivery ran)."""

    RETRY = "retry"  # idempotent runs (reads, assignments): run again
    DONE = "done"  # it happened once (a push): return None, its result is lost
    RAISE = "raise"  # the caller decides (a take: did it run?): DuplicateDeliveryError


def is_duplicate_delivery(error: tf.errors.OpError) -> bool:
    """Whether `error` is TensorFlow's answer to a request delivered twice."""
    return isinstance(error, tf.errors.AbortedError) and "received twice" in (error.message or "")


def is_session_lost(error: tf.errors.OpError) -> bool:
    """Whether `error` is a task's answer to a session it does not know: its server restarted since.

    (TF 2.21 answers `AbortedError: Session <handle> is not found` to every run
    of that session, for ever: checked with a server killed and started again.)
    """
    message = error.message or ""
    return isinstance(error, tf.errors.AbortedError) and "Session" in message and "is not found" in message


class Endpoint:
    """A graph and a session on one task's server, shared by this process's resources on it.

    Args:
      target: the server's target, e.g. "grpc://ps0:2222".
      device: the device the resources live on, e.g.
        "/job:ps/replica:0/task:0/device:CPU:0".
      timeout: seconds any single run may take before it fails with
        `PsUnavailableError` (the task is gone, or a network partition).
      watch: reports runs that go unanswered for long before their deadline
        (`run_watch`); None: none.
    """

    def __init__(self, target: str, device: str, timeout: float = DEFAULT_TIMEOUT,
                 watch: Optional[RunWatch] = None):
        self.target = target
        self.device = device
        self.timeout = timeout
        self.watch = watch
        self.graph = tf.Graph()
        self._lock = threading.Lock()
        self._session: Optional[tf.compat.v1.Session] = None
        self._options = tf.compat.v1.RunOptions(timeout_in_ms=int(timeout * 1000))

    def build(self, fn):
        """Calls `fn()` to add ops to this endpoint's graph, on its device."""
        with self._lock, self.graph.as_default(), tf.device(self.device):
            return fn()

    def run(self, fetches, feed_dict=None, what: str = "an op", on_duplicate: OnDuplicate = OnDuplicate.RETRY,
            wait: Optional[float] = None):
        """Runs `fetches` on the task; raises PsUnavailableError past the deadline.

        `wait` (seconds) makes the run a bounded blocking wait instead (a
        dequeue from an empty queue): past it the run is cancelled on the task
        and `run` returns None.

        gRPC may deliver a request twice (see `errors.DuplicateDeliveryError`);
        `on_duplicate` says what then.
        """
        for attempt in range(3):
            try:
                return self._run_once(fetches, feed_dict, what, wait)
            except tf.errors.AbortedError as e:
                if not is_duplicate_delivery(e):
                    raise
                if on_duplicate is OnDuplicate.RAISE or attempt == 2:
                    raise errors.DuplicateDeliveryError(f"{what} on {self.target}: {e.message}") from e
                logging.warning("tf_backup: %s on %s was delivered twice (%s).", what, self.target,
                                on_duplicate.value)
                if on_duplicate is OnDuplicate.DONE:
                    return None
        raise AssertionError("unreachable")

    def _run_once(self, fetches, feed_dict, what, wait=None):
        if self.watch is None:
            return self._run_session(fetches, feed_dict, what, wait)
        key, answered = self.watch.started(what, self.target, wait, self.timeout), False
        try:
            got = self._run_session(fetches, feed_dict, what, wait)
            answered = True  # a result, or a wait's None: the task cancelled the run at `wait`
            return got
        except errors.PsRestartedError:
            answered = True  # the task answered that it lost the session
            raise
        except errors.PsUnavailableError:
            raise  # no answer in time, or no connection
        except tf.errors.OpError:
            answered = True  # the task's own error
            raise
        finally:
            self.watch.ended(key, answered)

    def _run_session(self, fetches, feed_dict, what, wait=None):
        with self._lock:
            if self._session is None:
                config = tf.compat.v1.ConfigProto(
                    allow_soft_placement=False, operation_timeout_in_ms=int(self.timeout * 1000))
                # By default every session of a process to one target shares one TCP connection:
                # one that goes silent (no reset, no answer) stalls them all, and a new session
                # too (tests/test_endpoint.py). With a connection of its own, the session made
                # after a deadline (`_forget_session`) reaches the task again at once.
                config.rpc_options.disable_session_connection_sharing = True
                self._session = tf.compat.v1.Session(self.target, graph=self.graph, config=config)
            session = self._session
        options = self._options
        if wait is not None:
            options = tf.compat.v1.RunOptions(timeout_in_ms=max(1, int(wait * 1000)))
        try:
            return session.run(fetches, feed_dict=feed_dict, options=options)
        except tf.errors.AbortedError as e:
            if not is_session_lost(e):
                raise
            self._drop_session(session)
            raise errors.PsRestartedError(
                f"{what} on {self.device} ({self.target}): the task was restarted; what it held is gone.") from e
        except tf.errors.DeadlineExceededError as e:
            if wait is not None:
                return None  # nothing came within `wait`; the task cancelled the run
            self._forget_session(session)
            raise self._unavailable(what, e) from e
        except tf.errors.UnavailableError as e:
            self._forget_session(session)
            raise self._unavailable(what, e) from e

    def _forget_session(self, session: tf.compat.v1.Session) -> None:
        """Makes the next run use a new session (and connection), unless another thread already did.

        `session` is closed in the background once every run still in it has
        met its deadline (`timeout`): a close now would cancel those runs. Not
        left to the garbage collector either: a close over a silent connection
        blocks for `timeout`, in whichever thread collects it.
        """
        if self._forget(session):
            _close_later(session, self.timeout, self.target)

    def _drop_session(self, session: tf.compat.v1.Session) -> None:
        """Forgets `session`, which its task no longer knows (it restarted), and closes it in the background now."""
        if self._forget(session):
            _close_later(session, 0.0, self.target)

    def _forget(self, session: tf.compat.v1.Session) -> bool:
        with self._lock:
            if self._session is not session:
                return False
            self._session = None
            return True

    def close(self, wait: float = 5.0) -> None:
        """Closes the session, waiting at most `wait` seconds for the task.

        A session's close asks the task's master to end it: to a task that is
        gone, it blocks until `timeout` (as it would when the session is
        garbage collected). So the close runs in a daemon thread, joined for
        `wait` seconds: a close to a live task ends there (one still running
        while the interpreter tears down can abort the process), and one to a
        task that is gone is left behind, holding the session.
        """
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            _close_later(session, 0.0, self.target).join(wait)

    def _unavailable(self, what: str, e: tf.errors.OpError) -> errors.PsUnavailableError:
        cause = "DeadlineExceededError" if isinstance(e, tf.errors.DeadlineExceededError) else type(e).__name__
        return errors.PsUnavailableError(
            f"{what} on {self.device} ({self.target}) did not complete within "
            f"{self.timeout:.0f} s ({cause}: the task is down or unreachable)."
        )


def _close_quietly(session: tf.compat.v1.Session, after: float = 0.0) -> None:
    time.sleep(after)
    try:
        session.close()
    except tf.errors.OpError:
        pass  # the task is gone: nothing to end there


def _close_later(session: tf.compat.v1.Session, after: float, target: str) -> threading.Thread:
    """Closes `session` after `after` seconds in a daemon thread (started; returned to join)."""
    closer = threading.Thread(target=_close_quietly, args=(session, after), name=f"tf_backup-close-{target}",
                              daemon=True)
    closer.start()
    return closer


class Endpoints:
    """One `Endpoint` per task, all with the same deadline and one `RunWatch`: what one strategy (or `serve()`) owns.

    Every resource of a task built through the same `Endpoints` shares its
    graph and session (one session per ps task per process: see the module doc).
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, watch: Optional[RunWatch] = None):
        self.timeout = float(timeout)
        self.watch = RunWatch() if watch is None else watch
        self._lock = threading.Lock()
        self._by_task: Dict[Tuple[str, str, float], Endpoint] = {}

    def of(self, task, timeout: Optional[float] = None) -> Endpoint:
        """The endpoint of `task` (a `cluster.Task`: its target and CPU device).

        `timeout` (default: this object's) gives the runs another deadline, on
        a session of their own.
        """
        timeout = self.timeout if timeout is None else float(timeout)
        with self._lock:
            key = (task.target, task.device, timeout)
            if key not in self._by_task:
                self._by_task[key] = Endpoint(task.target, task.device, timeout, self.watch)
            return self._by_task[key]

    def close(self, wait: float = 5.0) -> None:
        """Closes every endpoint's session, waiting at most `wait` seconds for each (see `Endpoint.close`)."""
        with self._lock:
            endpoints, self._by_task = list(self._by_task.values()), {}
        for e in endpoints:
            e.close(wait)
        self.watch.close()
