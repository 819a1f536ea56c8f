"""`IteratorReaper`: drops the strategy's dataset iterators on a thread of their own.

Destroying a tf.data iterator can block the thread that drops it for seconds:
the iterator's destructor joins the tf.data autotuner's thread
(`model::Model::OptimizeLoop`), and that thread can miss its wake-up. The
cancellation callback notifies it before `CancellationManager` marks itself
cancelled, so the woken thread may find `IsCancelled()` still false and sleep
out the rest of its optimization period, which doubles up to 60 s while the
iterator lives. Keras drops a fit's iterator as `fit` returns (and makes a new
one each epoch when `steps_per_epoch` is not set): that worker then stalls
there, and with b = 0 every other worker waits for it at the next step.
Measured with 1e7 parameters, 4 workers, fits of 8 steps: the slowest worker's
wait at a fit's end 0.01-13.3 s and 0.01-6.3 s in two runs (medians 1.37 and
1.44) with the iterators dropped where Keras drops them, 0.00-0.02 s with them
dropped here
(`benchmarks/results/fit_end_stall.md`).

`ExchangingIterator.__del__` (`tf_backup.frontend.exchange`) hands the
iterator's TensorFlow parts to its strategy's reaper, whose thread drops them:
the wait, if any, happens there. The GIL is free meanwhile on TensorFlow 2.21:
another Python thread of a stalled worker ran during the stall (WORKSPACE_NOTES),
and `EagerTensor_dealloc` releases it around `TFE_DeleteTensorHandle` in the
sources read. By the same sources a drop waits at most about as long as its
iterator lived (the period doubles from 10 ms), so the thread keeps up with a
loop of fits, one iterator after another.
"""

import queue
import threading
from typing import Any, Dict, Optional

IDLE_SECONDS = 5.0  # the thread ends after this long with nothing to drop; the next `release` starts one


class IteratorReaper:
    """Drops what it is given on a daemon thread of its own, in order.

    The thread starts at a `release` when none runs, and ends once it has had nothing to drop for
    `idle` seconds, so no wait of it is unbounded and an idle strategy keeps no thread.

    State: `released` (items handed over), `dropped` (items the thread has dropped), `running`.
    """

    def __init__(self, name: str = "tf_backup-iterator-reaper", idle: float = IDLE_SECONDS):
        self._name = name
        self._idle = idle
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()  # guards `_thread` and `_closed` against the thread's own end
        self._closed = False
        self.released = 0
        self.dropped = 0

    @property
    def running(self) -> bool:
        """Whether the thread runs now (it has something to drop, or had within `idle` seconds)."""
        with self._lock:
            return self._thread is not None

    def release(self, holder: Dict[Any, Any], key: Any) -> bool:
        """Takes `holder[key]` out of `holder` and has it dropped on the reaper's thread.

        The value goes straight from `holder` into a box on the queue, and the thread takes it out
        of the box: no frame of the caller's (or of this method) is left holding it, which would
        make whichever thread lets go last, maybe the caller's, run its destructor. Returns False,
        leaving `holder` as it is, once closed.
        """
        with self._lock:
            if self._closed:
                return False
            self.released += 1
            self._queue.put([holder.pop(key)])
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            return True

    def close(self) -> None:
        """Takes nothing more; what is queued is still dropped, and the thread ends `idle` seconds later.

        Does not wait: one drop may block for a minute.
        """
        with self._lock:
            self._closed = True

    def _run(self) -> None:
        while True:
            try:
                box = self._queue.get(timeout=self._idle)
            except queue.Empty:
                with self._lock:  # a `release` between the timeout and here queued an item: go on
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            box.pop()  # unkept: the value's destructors run here, now
            self.dropped += 1
