"""`Waker`: ends a blocked run on a ps task after a deadline, by sending it a token."""

import contextlib
import threading
import time
from typing import Callable, Optional

from absl import logging


class Waker(threading.Thread):
    """Ends a blocked run after a deadline by sending it a token (`SharedState.push_wait`).

    A run cancelled at its deadline leaves undecided whatever it had started:
    a push and a wait in one run may or may not have pushed. So that run has
    no deadline of its own (beyond the endpoint's, which fails the job), and
    this thread, armed before it and disarmed after, runs `poke()` (a token
    into the waiting queue) if it lasts longer than `seconds`. A poke racing
    with the run's own return leaves one spare token: the next wait returns at
    once and looks again.

    State (under `_cond`): `_deadline` (None: disarmed) and `_closed`.
    """

    def __init__(self, poke: Callable[[], None], name: str):
        super().__init__(name=name, daemon=True)
        self._poke = poke
        self._cond = threading.Condition()  # signals: armed, disarmed or closed
        self._deadline: Optional[float] = None
        self._closed = False
        self.pokes = 0

    def arm(self, seconds: float) -> None:
        with self._cond:
            if self._closed:  # its thread is gone: the run would wait for the endpoint's deadline
                raise RuntimeError(f"{self.name} was closed (its optimizer binding was shut down).")
            self._deadline = time.monotonic() + seconds
            if not self.is_alive():
                self.start()
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None

    @contextlib.contextmanager
    def armed(self, seconds: float):
        """Armed for `seconds` while the block runs, disarmed after (also on an error)."""
        self.arm(seconds)
        try:
            yield
        finally:
            self.disarm()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self._deadline = None
            self.pokes += 1  # before the poke: the run it ends may return before `_poke` does
            try:
                self._poke()
            except Exception as e:  # pylint: disable=broad-except
                # The ps is gone: the blocked run fails at the endpoint's deadline.
                logging.warning("tf_backup: %s could not wake a blocked wait: %s", self.name, e)
