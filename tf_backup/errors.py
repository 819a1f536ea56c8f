"""Errors tf_backup raises when a distributed wait cannot complete.

They subclass TensorFlow's `OpError`s. Raised outside a traced function (for
example while `fit` builds the optimizer) they reach the caller as they are.
Raised inside the training step, which runs them in a `tf.py_function`,
TensorFlow turns them into a `tf.errors.UnknownError` whose message holds the
error's name and message (`StepTimeoutError: Worker 2 ... waited 600 s for
global step 13 ...`): catch `tf.errors.OpError` around `model.fit`.
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
    """The chief's aggregator failed; the message holds its error."""

    def __init__(self, message: str):
        super().__init__(None, None, message)


class PsUnavailableError(tf.errors.UnavailableError):
    """A ps task did not answer within the deadline (it is gone, or unreachable)."""

    def __init__(self, message: str):
        super().__init__(None, None, message)
