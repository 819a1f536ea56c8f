"""Compiled steps: the host exchange kept outside XLA and TPU programs.

A compiled step cannot hold the exchange (a `tf.py_function` that talks to the
ps tasks), so a step is split in two:

1. **the replica step**, compiled or not: forward, backward and
   `SyncReplicasOptimizer.apply`, which writes this worker's packed gradient
   into `StepBuffers` on the worker's devices. No py_function, no op on a ps.
2. **the exchange** (`binding.Binding.exchange`), host ops: read the buffers,
   push, wait, pull, assign the new parameters, set the step metrics.

Where the exchange runs (docs/design.md, "Compiled steps"):
- the replica function is compiled inside a `strategy.run` that is not
  (a custom loop's `strategy.run(tf.function(fn, jit_compile=True))`, a TPU
  program): right after it, in `run`;
- `strategy.run` itself is inside an XLA function (Keras's
  `compile(jit_compile=True)` compiles `one_step_on_data` around it): at the
  next batch fetch. The strategy's distributed iterators are
  `ExchangingIterator`s, whose `get_next` and `get_next_as_optional` run the
  pending exchange before they hand out the batch; Keras fetches batches
  outside the compiled function (also with `steps_per_execution > 1`), and the
  end of `fit` flushes the last one (`SyncReplicasOptimizer.finalize_variable_values`).
  When one is dropped, its strategy's `IteratorReaper` destroys TensorFlow's
  iterator on a thread of its own (`tf_backup.frontend.iterator_reaper`).

A step that is not compiled at all exchanges inside `apply`, as it always did.
"""

from typing import List, Sequence

import tensorflow as tf

from tf_backup.frontend import _tf_internal


def in_compiled_context() -> bool:
    """Whether the code being traced now will be compiled by XLA (jit_compile, a TPU program)."""
    if tf.executing_eagerly():
        return False
    return _tf_internal.in_xla_context(tf.compat.v1.get_default_graph())


class StepBuffers:
    """One binding's gradient buffers on this worker, written by the replica step.

    `flats[s]` holds shard s of the packed gradient (without the one-hot). With
    several local replicas each replica writes its own copy (the variables
    synchronize on read, by SUM): the exchange's read is the in-host
    all-reduce, done on the host instead of inside the compiled step.
    `pending` counts gradients written and not exchanged yet (0 or 1; more means
    a step was never exchanged).
    """

    def __init__(self, sizes: Sequence[int], dtype, device: str):
        on_read = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ)
        with tf.init_scope(), tf.device(device):
            self.flats = [tf.Variable(tf.zeros([size], dtype), aggregation=tf.VariableAggregation.SUM,
                                      name=f"tf_backup_grad_{s}", **on_read)
                          for s, size in enumerate(sizes)]
            self.pending = tf.Variable(tf.constant(0, tf.int64), name="tf_backup_pending",
                                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA, **on_read)

    def write(self, flats: Sequence[tf.Tensor]) -> None:
        """(Replica step.) This replica's gradient shards, and one more pending gradient."""
        for var, flat in zip(self.flats, flats):
            var.assign(flat)
        self.pending.assign_add(1)

    def read(self) -> List[tf.Tensor]:
        """(Host.) The gradient shards, summed over this worker's replicas."""
        return [var.read_value() for var in self.flats]

    def clear(self) -> None:
        self.pending.assign(0)


class ExchangingIterator(_tf_internal.DistributedIterator):
    """A distributed iterator that runs the strategy's pending exchanges before each batch.

    Only the class differs from TensorFlow's (`exchanging` swaps it in): the
    state, the type spec's components and the tracing are TensorFlow's. Dropped,
    it hands its TensorFlow parts to the strategy's `IteratorReaper`.
    """

    def get_next(self, name=None):
        self._strategy.extended.exchange_pending()
        return super().get_next(name)

    def get_next_as_optional(self):
        self._strategy.extended.exchange_pending()
        return super().get_next_as_optional()

    def __del__(self):
        # Destroying TensorFlow's iterator can block this thread for up to a minute (a lost wake-up
        # of tf.data's autotuner, `tf_backup.frontend.iterator_reaper`): its strategy's reaper drops it.
        reaper = getattr(getattr(getattr(self, "_strategy", None), "extended", None), "iterator_reaper", None)
        if reaper is not None and "_iterators" in self.__dict__:
            reaper.release(self.__dict__, "_iterators")  # never held in a local here: see `release`

    @property
    def _type_spec(self):
        spec = super()._type_spec
        spec.__class__ = _ExchangingIteratorSpec
        return spec


class _ExchangingIteratorSpec(_tf_internal.DistributedIteratorSpec):
    """Rebuilds an `ExchangingIterator` inside a tf.function (Keras passes the iterator in)."""

    __slots__ = []

    @property
    def value_type(self):
        return ExchangingIterator

    def _from_components(self, components):
        iterator = super()._from_components(components)
        iterator.__class__ = ExchangingIterator
        return iterator


def exchanging(distributed):
    """Makes the iterators of a distributed dataset `ExchangingIterator`s (returns it)."""
    for base, sub in ((_tf_internal.DistributedDataset, _ExchangingDataset),
                      (_tf_internal.DistributedDatasetsFromFunction, _ExchangingDatasetsFromFunction)):
        if type(distributed) is base:  # pylint: disable=unidiomatic-typecheck
            distributed.__class__ = sub
    return distributed


def _exchanging_iterator(iterator):
    if type(iterator) is _tf_internal.DistributedIterator:  # pylint: disable=unidiomatic-typecheck
        iterator.__class__ = ExchangingIterator
    return iterator


class _ExchangingDataset(_tf_internal.DistributedDataset):

    def __iter__(self):
        return _exchanging_iterator(super().__iter__())


class _ExchangingDatasetsFromFunction(_tf_internal.DistributedDatasetsFromFunction):

    def __iter__(self):
        return _exchanging_iterator(super().__iter__())
