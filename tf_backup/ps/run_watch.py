"""`RunWatch`: says, while it waits, that a run on a ps task is overdue, and whether the task answers others.

A run's deadline (`Endpoint.timeout`, 60 s by default) ends a run that gets no
answer, and the job with it. Before that, nothing said which run waited, nor
whether the task was answering this process's other runs: the difference
between a task that is stuck and one connection that went silent. A run is
overdue once it has lasted `after` seconds beyond its own bounded wait (a
`wait=` run's seconds); the watch logs it once, then once more when it ends.

One watch per `Endpoints` (a strategy's, or `serve()`'s), with one daemon
thread while runs are in flight: a run starts it, and it ends at a look that
finds none (or at `close()`).
"""

import dataclasses
import itertools
import threading
import time
from typing import Dict, List, Optional

from absl import logging

POLL = 1.0  # seconds between the thread's looks
AFTER = 10.0  # seconds past its own wait before a run is reported: far beyond a step's runs


@dataclasses.dataclass
class InFlight:
    """One run in flight: what it is, on which task, since when, and the task's answers counted then."""

    what: str
    target: str
    started: float  # time.monotonic()
    wait: float  # its own bounded wait (0: none)
    deadline: float  # when it fails without an answer (its endpoint's timeout)
    answered_before: int  # runs on `target` answered before this one started
    reported: bool = False

    def due(self, after: float) -> float:
        """Seconds from its start to its report: `after` (at most half its deadline) past its own wait."""
        return self.wait + min(after, self.deadline / 2)


def overdue(runs: Dict[int, InFlight], now: float, after: float) -> List[int]:
    """The keys of the runs not yet reported that have lasted past their `due` time."""
    return [k for k, r in runs.items() if not r.reported and now - r.started >= r.due(after)]


def message(run: InFlight, now: float, answered: int, last_answer: Optional[float]) -> str:
    """What the watch logs of an overdue run: it, the deadline, and what the same task answered meanwhile."""
    others = answered - run.answered_before
    if others and last_answer is not None:
        meanwhile = (f"this process's other runs on that task were answered meanwhile ({others}, the last "
                     f"{now - last_answer:.1f} s ago): the task is up, and this run's connection is silent "
                     f"or the run is blocked there")
    else:
        meanwhile = "no other run of this process on that task was answered meanwhile"
    return (f"tf_backup: {run.what} on {run.target} has had no answer for {now - run.started:.0f} s "
            f"(it fails at {run.deadline:.0f} s); {meanwhile}.")


class RunWatch:
    """The runs in flight of one `Endpoints`, looked at every `POLL` seconds.

    Args:
      after: seconds beyond a run's own wait before it is reported (at most half its deadline).
    """

    def __init__(self, after: float = AFTER):
        self.after = float(after)
        self.reports = 0
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._runs: Dict[int, InFlight] = {}
        self._answered: Dict[str, int] = {}  # per target, runs that ended with an answer
        self._last_answer: Dict[str, float] = {}
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def started(self, what: str, target: str, wait: Optional[float], deadline: float) -> int:
        """Watches a run from now; returns its key for `ended`."""
        with self._lock:
            key = next(self._keys)
            self._runs[key] = InFlight(what, target, time.monotonic(), wait or 0.0, deadline,
                                       self._answered.get(target, 0))
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._loop, name="tf_backup-run-watch", daemon=True)
                self._thread.start()
        return key

    def ended(self, key: int, answered: bool) -> None:
        """The run `key` ended: with an answer from its task (any result, an error of the op too), or not."""
        now = time.monotonic()
        with self._lock:
            run = self._runs.pop(key)
            if answered:
                self._answered[run.target] = self._answered.get(run.target, 0) + 1
                self._last_answer[run.target] = now
        if run.reported:
            logging.warning("tf_backup: %s on %s %s after %.1f s.", run.what, run.target,
                            "was answered" if answered else "ended without an answer", now - run.started)

    def close(self) -> None:
        self._closed.set()

    def look(self) -> None:
        """Reports every overdue run once (the thread's body; tests call it)."""
        now = time.monotonic()
        with self._lock:
            lines = []
            for key in overdue(self._runs, now, self.after):
                run = self._runs[key]
                run.reported = True
                lines.append(message(run, now, self._answered.get(run.target, 0), self._last_answer.get(run.target)))
            self.reports += len(lines)
        for line in lines:
            logging.warning(line)

    def _loop(self) -> None:
        while not self._closed.wait(POLL):
            self.look()
            with self._lock:
                if not self._runs:  # idle: the next run starts the thread again
                    self._thread = None
                    return
