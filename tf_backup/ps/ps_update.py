"""The update applied on the ps tasks (`apply_on_ps=True`): the inner optimizer's rule as TF kernels.

With the update applied where the gradients are summed, a step moves no
model-sized tensor through the chief: each ps task takes its shard's sum,
averages it, and applies it to its shard of the master copy with TensorFlow's
fused `ResourceApply*` kernels, which compute exactly Keras's update rules
(TF1's SyncReplicasOptimizer applied on the ps the same way). The chief only
sends the step's scalars (learning rate, bias corrections) and reads each
shard's counts. The price is generality: the rule must be elementwise, so that
it can run on a flat shard that cuts through variables:

| inner optimizer | kernel | slots per shard |
|---|---|---|
| `keras.optimizers.SGD(momentum=0)` | `ResourceApplyGradientDescent` | none |
| `keras.optimizers.SGD(momentum>0, nesterov=...)` | `ResourceApplyKerasMomentum` | momentum |
| `keras.optimizers.Adam(amsgrad=False)` | `ResourceApplyAdam` | m, v |

with no clipping, weight decay, EMA or gradient accumulation (they look at a
whole variable, or are not an elementwise rule). Any other optimizer is
refused with a `ValueError` that names it: the chief applies it (the default).
"""

import enum
import threading
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_backup.ps import accumulators
from tf_backup.ps import endpoint as endpoint_lib


class Kind(enum.Enum):
    SGD = "sgd"
    MOMENTUM = "momentum"
    ADAM = "adam"


class UpdateRule(NamedTuple):
    """Which kernel applies the inner optimizer's update, and its slot variables' names in Keras."""

    kind: Kind
    slot_attrs: tuple  # the inner optimizer's per-variable slot lists, in the kernel's order

    @property
    def num_slots(self) -> int:
        return len(self.slot_attrs)


def hyper_names(rule: UpdateRule) -> List[str]:
    """The scalars the chief feeds each step, in `hyper_values`' order."""
    return {Kind.SGD: ["lr"], Kind.MOMENTUM: ["lr", "momentum"],
            Kind.ADAM: ["lr", "beta1_power", "beta2_power", "beta1", "beta2", "epsilon"]}[rule.kind]


def build_apply(rule: UpdateRule, var, slots: List, grad: tf.Tensor, hyper: Dict[str, tf.Tensor],
                nesterov: bool = False) -> tf.Operation:
    """(In a ps task's graph.) The kernel that applies `grad` to the resource `var` with its `slots`."""
    h = {k: tf.cast(v, grad.dtype) for k, v in hyper.items()}
    if rule.kind is Kind.SGD:
        return tf.raw_ops.ResourceApplyGradientDescent(var=var, alpha=h["lr"], delta=grad)
    if rule.kind is Kind.MOMENTUM:
        return tf.raw_ops.ResourceApplyKerasMomentum(var=var, accum=slots[0], lr=h["lr"], grad=grad,
                                                     momentum=h["momentum"], use_nesterov=nesterov)
    return tf.raw_ops.ResourceApplyAdam(var=var, m=slots[0], v=slots[1], beta1_power=h["beta1_power"],
                                        beta2_power=h["beta2_power"], lr=h["lr"], beta1=h["beta1"],
                                        beta2=h["beta2"], epsilon=h["epsilon"], grad=grad)


class UpdateState:
    """(The ps side.) One optimizer's master copy and slots on the ps tasks, and the run that takes and applies a shard.

    Each shard's master copy is its published parameters (`params/<s>`), or,
    when those are narrower on the wire, a float variable `master/<s>` beside
    them; slot k of shard s is `slot<k>/<s>`, on the shard's task.

    Args:
      rule: the inner optimizer's rule (`rule_for`).
      nesterov: (SGD with momentum) Nesterov momentum.
      prefix: the resources' name prefix (`SharedState.prefix`).
      params: the published parameters, one `SharedVariable` per shard.
      dtype: the master copy's dtype (the variables').
      each_shard: runs `fn(s)` for every shard at once (`SharedState.each_shard`).
    """

    def __init__(self, rule: UpdateRule, nesterov: bool, prefix: str, params: Sequence, dtype,
                 each_shard: Callable):
        self.rule, self._nesterov, self._prefix, self._dtype = rule, nesterov, prefix, tf.as_dtype(dtype)
        self._params, self._each_shard = list(params), each_shard
        narrow = self._params and self._params[0].dtype != self._dtype
        self.master = [accumulators.SharedVariable(f"{prefix}/master/{s}", dtype, p.shape, p.endpoint)
                       for s, p in enumerate(self._params)] if narrow else self._params
        self.slots = [[accumulators.SharedVariable(f"{prefix}/slot{k}/{s}", dtype, p.shape, p.endpoint)
                       for s, p in enumerate(self._params)] for k in range(rule.num_slots)]
        self._runs: Dict[tuple, dict] = {}  # (generation, shard): the take-and-apply run
        self._lock = threading.Lock()

    def write(self, master: Sequence, slots: Sequence[Sequence]) -> None:
        """(Chief, before its aggregator starts.) The master copy and the slots, per shard."""
        if self.master is not self._params:
            self._each_shard(lambda s: self.master[s].assign(master[s]))
        for k, per_shard in enumerate(slots):
            self._each_shard(lambda s: self.slots[k][s].assign(per_shard[s]))

    def read(self):
        """(master flats, [slot flats per shard] per slot), read from every task at once."""
        master = self._each_shard(lambda s: self.master[s].read())
        return master, [self._each_shard(lambda s: var[s].read()) for var in self.slots]

    def placeholders(self) -> Dict[str, tf.Tensor]:
        """(In a graph.) One float placeholder per scalar of the step (`hyper_names`)."""
        return {k: tf.compat.v1.placeholder(tf.float32, [], name=k) for k in hyper_names(self.rule)}

    def build_take_apply(self, shard: int, acc, num_workers: int, required=None, before=(), hyper=None) -> dict:
        """(In shard `shard`'s endpoint graph.) Take, average, apply, then the wire copy; fetches (tail, sq norm).

        `acc`: the shard's `ConditionalAccumulator`. `required` and `hyper`:
        placeholders made outside (a branch of a `tf.cond` cannot hold one).
        """
        required = tf.compat.v1.placeholder(tf.int32, []) if required is None else required
        hyper = self.placeholders() if hyper is None else hyper
        with tf.control_dependencies(list(before)):
            taken = tf.raw_ops.ResourceAccumulatorTakeGradient(handle=acc.ops["handle"], num_required=required,
                                                               dtype=self._dtype)
        size = int(self._params[shard].shape[0])
        body, tail = taken[:size], taken[size:]
        count = tf.maximum(tf.reduce_sum(tail[-num_workers:]), 1.0)  # the one-hot's sum: gradients taken
        master = self.master[shard].ops
        slots = [var[shard].ops["handle"] for var in self.slots]
        applied = build_apply(self.rule, master["handle"], slots, body / count, hyper, nesterov=self._nesterov)
        if self.master is not self._params:  # the narrow copy every worker pulls
            with tf.control_dependencies([applied]):
                value = tf.raw_ops.ReadVariableOp(resource=master["handle"], dtype=self._dtype)
                applied = tf.raw_ops.AssignVariableOp(resource=self._params[shard].ops["handle"],
                                                      value=tf.cast(value, self._params[shard].dtype))
        with tf.control_dependencies([applied]):
            fetch = (tf.identity(tail), tf.reduce_sum(tf.square(body)))
        return {"required": required, "hyper": hyper, "fetch": fetch}

    def take_apply(self, shard: int, acc, num_workers: int, generation: int, required: int,
                   hyper: Dict[str, float]):
        """Takes shard `shard`'s sum from `acc` and applies its mean there; returns (tail, squared norm of the sum).

        Set VERSION first (`SharedState.mark_version`): this changes the published parameters.
        """
        where = self._params[shard].endpoint
        key = (generation, shard)
        if key not in self._runs:
            built = where.build(lambda: self.build_take_apply(shard, acc, num_workers))
            with self._lock:
                self._runs.setdefault(key, built)
        run = self._runs[key]
        return where.run(run["fetch"], {run["required"]: int(required), **hyper_feed(run["hyper"], hyper)},
                         what=f"take and apply of `{self._prefix}` shard {shard}",
                         on_duplicate=endpoint_lib.OnDuplicate.RAISE)


def hyper_feed(placeholders: Dict[str, tf.Tensor], values: Optional[Dict[str, float]]) -> Dict:
    return {placeholders[k]: np.float32(v) for k, v in values.items()}
