"""Every private TensorFlow and Keras import tf_backup makes, in one place.

A TensorFlow or Keras upgrade that moves one of these touches this file only.
The supported versions are declared in `setup.py`; `.ci/versions.py` checks each
(docs/versions.md). The TensorFlow modules below differ between 2.16.2 and 2.21.0
in comments and one TPU method tf_backup does not call, so nothing here depends
on the version yet: a check of `tf.__version__`, when one is needed, goes in
this file and nowhere else.
"""

# pylint: disable=g-direct-tensorflow-import,unused-import
import functools

from keras.src.backend.tensorflow import trainer as keras_trainer
from tensorflow.python.distribute import distribute_lib
from tensorflow.python.distribute import mirrored_strategy
from tensorflow.python.distribute import one_device_strategy

Strategy = distribute_lib.Strategy
OneDeviceExtended = one_device_strategy.OneDeviceExtended
MirroredExtended = mirrored_strategy.MirroredExtended
from tensorflow.python.distribute import input_util

get_distributed_datasets_from_function = input_util.get_distributed_datasets_from_function
from tensorflow.python.distribute import input_lib
from tensorflow.python.ops import control_flow_util

DistributedDataset = input_lib.DistributedDataset
DistributedDatasetsFromFunction = input_lib.DistributedDatasetsFromFunction
DistributedIterator = input_lib.DistributedIterator
DistributedIteratorSpec = input_lib.DistributedIteratorSpec
in_xla_context = control_flow_util.GraphOrParentsInXlaContext
from tensorflow.python.autograph.core import ag_ctx
from tensorflow.python.autograph.impl import api as autograph
from tensorflow.python.distribute import tpu_strategy

TPUExtended = tpu_strategy.TPUExtended


def autograph_convert(fn):
    """`fn` converted as `TPUStrategy.run` converts it before `tpu_run`."""
    return autograph.tf_convert(fn, ag_ctx.control_status_ctx())


KerasTrainer = keras_trainer.TensorFlowTrainer


def wrap_keras_train_functions(wrap) -> None:
    """Makes Keras's TensorFlow trainer pass each train function it makes through `wrap(model, fn)`.

    Keras 3 offers no hook around the call of the train function in `fit`
    (`logs = self.train_function(iterator)`), and the first call is the one
    that traces the step, so a model is known to a strategy only once its first
    step runs. `make_train_function` is where Keras makes the function (it keeps
    it until the next `compile`), before any step; `wrap` returns it unchanged
    for models of other strategies. Idempotent (docs/design.md, "How an error
    reaches the user").
    """
    make = KerasTrainer.make_train_function
    if getattr(make, "tf_backup_wrap", None) is wrap:
        return

    @functools.wraps(make)
    def make_train_function(self, force=False):
        made = make(self, force)
        if self.train_function is not None:
            self.train_function = wrap(self, self.train_function)
        return None if made is None else self.train_function

    make_train_function.tf_backup_wrap = wrap
    KerasTrainer.make_train_function = make_train_function
