"""Errors tf_backup raises: a distributed wait that cannot complete, a lost task, a lost delivery.

They subclass TensorFlow's `OpError`s, so `except tf.errors.OpError` still
catches them. `model.fit`, `train_on_batch` and `BackupWorkerStrategy.run`
raise them by type (`except tf_backup.errors.WorkersLostError`): the training
step runs the protocol in a `tf.py_function`, which turns any Python error
into a `tf.errors.UnknownError`; the step keeps the first of ours on the
strategy and the call raises it once TensorFlow's error is out
(docs/design.md, "How an error reaches the user"). TensorFlow's error is its
`__context__`, and its `__cause__` too except out of `fit` with Keras's
traceback filtering on (the default), which clears every error's `__cause__`.
A custom loop that runs `strategy.run` inside its own `tf.function` gets
TensorFlow's `UnknownError`, whose message holds the error's name and message.
"""

import tensorflow as tf


class StepTimeoutError(tf.errors.DeadlineExceededError):
    """A worker or the chief waited longer than its deadline for a step."""

    def __init__(self, message: str):
        super().__init__(None, None, message)


class ChiefUnavailableError(tf.errors.UnavailableError):
    """The chief stopped sending heartbeats, or the job state disappeared."""

    def __init__(self, message: str):
        super().__init__(None, None, message)


class AggregatorError(tf.errors.InternalError):
    """The chief's aggregator failed; the message holds its error, its `__cause__`.

    The chief's next wait raises it (an aggregator that stopped with
    `WorkersLostError` has that raised as it is instead).
    """

    def __init__(self, message: str):
        super().__init__(None, None, message)


class PsUnavailableError(tf.errors.UnavailableError):
    """A ps task did not answer within the deadline (it is gone, or unreachable)."""

    def __init__(self, message: str):
        super().__init__(None, None, message)


class PsRestartedError(PsUnavailableError):
    """A ps task answered as a new process: its server restarted, and every resource on it is gone.

    TensorFlow answers a session made before the restart with `AbortedError:
    Session ... is not found`; the endpoint then makes a new session for the
    next run. With `ps_restart_timeout`, the chief writes the state again
    (`tf_backup.ps.recovery`).
    """


class WorkersLostError(AggregatorError):
    """Fewer workers are alive than a step needs: the chief's aggregator stopped.

    Kept by the aggregator as it was raised; the chief's next wait raises it,
    and so does the chief's `fit`.
    """


class DuplicateDeliveryError(tf.errors.AbortedError):
    """gRPC delivered a request to a ps task twice: the first delivery ran, its result is lost.

    TensorFlow fails such a run with `AbortedError: The same RunGraph (Worker)
    request was received twice` (seen on a loaded 2-core machine).
    `tf_backup.ps.endpoint.Endpoint.run` retries what is idempotent and raises
    this for the rest (a take: did it run?).
    """

    def __init__(self, message: str):
        super().__init__(None, None, message)


class ExchangeError(tf.errors.InternalError):
    """A compiled step's gradient was overwritten before its exchange ran (it was never pushed)."""

    def __init__(self, message: str):
        super().__init__(None, None, message)


# Every tf_backup error type (with its subclasses): what a training step keeps for `fit` to raise.
ALL = (StepTimeoutError, ChiefUnavailableError, AggregatorError, PsUnavailableError, DuplicateDeliveryError,
       ExchangeError)
