"""MultiWorkerMirroredStrategy as the benchmarks run it: collectives with a timeout, and the two
Keras 3.15 `fit` failures on a multi-worker MWMS worked around.
"""


MWMS_COLLECTIVE_TIMEOUT = 600.0


def multi_worker_mirrored():
    """MultiWorkerMirroredStrategy whose collectives (the start barrier, every all-reduce) time out.

    Without `timeout_seconds` a worker whose peer is gone waits in its all-reduce for ever; with
    it the collective fails with DeadlineExceeded after `MWMS_COLLECTIVE_TIMEOUT` seconds.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=MWMS_COLLECTIVE_TIMEOUT)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def patch_keras_for_multi_worker_mirrored():
    """Works around Keras 3.15 `fit` on a multi-worker `MultiWorkerMirroredStrategy`.

    Its train step reduces the scalar logs with `strategy.reduce("MEAN", v, axis=0)`, which fails
    ("Invalid reduction dimension 0 for input with 0 dimensions"). Logs are reduced with "first"
    instead (this worker's values): one scalar all-reduce less per step for MWMS, so the
    comparison favours MWMS slightly.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer  # pylint: disable=g-import-not-at-top
    if getattr(tf_trainer.reduce_per_replica, "_patched", False):
        return
    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        return original(values, strategy, "first" if reduction in ("auto", "mean") else reduction)

    reduce_per_replica._patched = True  # pylint: disable=protected-access
    tf_trainer.reduce_per_replica = reduce_per_replica


def build_for_multi_worker_mirrored(model, data_batch) -> None:
    """Builds a compiled model under a multi-worker MWMS from a plain batch, in place of Keras' own build.

    Keras 3.15 `fit` builds loss/metrics from one batch of the distributed iterator, reduced with
    strategy.reduce("MEAN", PerReplica), which fails on a multi-worker MWMS ("Attempt to convert a
    value (PerReplica...) with an unsupported type"). The replacement still reads (and drops) that
    one batch, as Keras does before it resets the fit's iterator: a shuffled pipeline then feeds
    the fit the same order under MWMS as under tf_backup (its second iteration's).
    """
    model._symbolic_build(data_batch=data_batch)  # pylint: disable=protected-access

    def read_one_batch(iterator=None, data_batch=None):
        del data_batch
        for _, _, it in iterator or ():
            next(it)
            break

    model._maybe_symbolic_build = read_one_batch  # pylint: disable=protected-access


def malloc_keeper(keras):
    """A callback that applies our malloc settings again before every batch, as our exchange does each step.

    tf.data's iterators reset glibc's mmap threshold to 128 KiB on Python 3.11+ (`tf_backup.memory`),
    for MWMS as for us: without this MWMS would run with glibc's allocator as TensorFlow left it,
    and we with ours.
    """
    from tf_backup import memory  # pylint: disable=g-import-not-at-top

    class MallocKeeper(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            memory.reapply()

    return MallocKeeper()
