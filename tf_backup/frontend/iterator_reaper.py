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
wait at a fit's end 0.01-13.3 s (median 1.37) with the iterators dropped where
Keras drops them, 0.00-0.02 s with them dropped here
(`benchmarks/results/fit_end_stall.md`).

`ExchangingIterator.__del__` (`tf_backup.frontend.exchange`) hands the
iterator's TensorFlow parts to its strategy's reaper, whose thread drops them:
the wait, if any, happens there, and the GIL is free meanwhile (TensorFlow
releases it while it deletes a tensor handle). A drop waits at most about as
long as its iterator lived (the period doubles from 10 ms), so the thread keeps
up with any loop of fits, one iterator after another.
"""

import queue
import threading
from typing import Any, Optional

_STOP = object()  # the last item `close` queues


class IteratorReaper:
    """Drops what it is given on its own daemon thread, in order (started at the first `release`).

    State: `released` (items handed over), `dropped` (items the thread has dropped).
    """

    def __init__(self, name: str = "tf_backup-iterator-reaper"):
        self._name = name
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._closed = False
        self.released = 0
        self.dropped = 0

    def release(self, item: Any) -> bool:
        """Hands `item` over to be dropped on the reaper's thread; False (kept by the caller) once closed."""
        with self._lock:
            if self._closed:
                return False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self.released += 1
            self._queue.put(item)
            return True

    def close(self) -> None:
        """Drops what is queued, then ends the thread; does not wait (a drop may block for a minute)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._thread is not None:
                self._queue.put(_STOP)

    def _run(self) -> None:
        while True:
            item = self._queue.get()  # idle until there is work: `close` always queues _STOP
            if item is _STOP:
                return
            del item  # TensorFlow's destructors run here
            self.dropped += 1
