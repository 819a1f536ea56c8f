"""Every private TensorFlow import tf_backup makes, in one place.

A TensorFlow upgrade that moves one of these touches this file only. The
supported TensorFlow versions are declared in `setup.py`.
"""

# pylint: disable=g-direct-tensorflow-import,unused-import
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
