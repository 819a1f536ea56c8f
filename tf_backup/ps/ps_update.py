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

import keras
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


def rule_for(inner) -> UpdateRule:
    """The rule of `inner` on the ps.

    Raises:
      ValueError: `inner` has no elementwise kernel here (the message names it and what to do).
    """
    name = type(inner).__name__
    unsupported = [attr for attr in ("clipnorm", "clipvalue", "global_clipnorm", "weight_decay",
                                     "gradient_accumulation_steps", "loss_scale_factor")
                   if getattr(inner, attr, None)]
    if getattr(inner, "use_ema", False):
        unsupported.append("use_ema")
    if type(inner) is keras.optimizers.Adam and getattr(inner, "amsgrad", False):
        unsupported.append("amsgrad")
    if unsupported:
        raise ValueError(
            f"apply_on_ps=True applies the inner optimizer elementwise on flat shards, without "
            f"{', '.join(unsupported)}: leave them unset or use apply_on_ps=False. Received {name} with "
            + ", ".join(f"{a}={getattr(inner, a)!r}" for a in unsupported))
    if type(inner) is keras.optimizers.SGD:
        if float(inner.momentum) == 0.0:
            return UpdateRule(Kind.SGD, ())
        return UpdateRule(Kind.MOMENTUM, ("momentums",))
    if type(inner) is keras.optimizers.Adam:
        return UpdateRule(Kind.ADAM, ("_momentums", "_velocities"))
    raise ValueError(
        "apply_on_ps=True supports keras.optimizers.SGD (with or without momentum) and "
        f"keras.optimizers.Adam: use apply_on_ps=False (the chief applies any optimizer). Received {name}")


def hyper_names(rule: UpdateRule) -> List[str]:
    """The scalars the chief feeds each step, in `hyper_values`' order."""
    return {Kind.SGD: ["lr"], Kind.MOMENTUM: ["lr", "momentum"],
            Kind.ADAM: ["lr", "beta1_power", "beta2_power", "beta1", "beta2", "epsilon"]}[rule.kind]


def hyper_values(inner, rule: UpdateRule) -> Dict[str, float]:
    """(Chief, eager.) The scalars of the step `inner.iterations` is at, as Keras's `update_step` computes them."""
    lr = float(keras.ops.convert_to_numpy(inner.learning_rate))  # a schedule is evaluated at `iterations`
    if rule.kind is Kind.SGD:
        return {"lr": lr}
    if rule.kind is Kind.MOMENTUM:
        return {"lr": lr, "momentum": float(inner.momentum)}
    local_step = float(int(inner.iterations.numpy()) + 1)
    b1, b2 = float(inner.beta_1), float(inner.beta_2)
    return {"lr": lr, "beta1_power": b1 ** local_step, "beta2_power": b2 ** local_step, "beta1": b1, "beta2": b2,
            "epsilon": float(inner.epsilon)}


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


def slot_variables(inner, rule: UpdateRule) -> List[List]:
    """(Chief.) Per slot, the inner optimizer's Keras variables of it (one per model variable)."""
    return [list(getattr(inner, attr)) for attr in rule.slot_attrs]


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


class ChiefSide:
    """(Chief.) Its part of an update applied on the ps: the step's scalars, the step count, the checkpoint's copy.

    The chief keeps the Keras master copy and the inner optimizer (with its
    slots) for checkpoints only: `refresh` reads them back from the ps tasks
    before each save, and a restored checkpoint is written to the ps tasks at
    the start (`SharedState.write_update_state`).
    """

    def __init__(self, inner, rule: UpdateRule, state, master: List):
        self.inner, self.rule, self.state, self.master = inner, rule, state, master

    def hyper(self) -> Dict[str, float]:
        return hyper_values(self.inner, self.rule)

    def applied(self) -> None:
        """One step applied on the ps: the inner optimizer's `iterations` moves on (schedules, Adam's powers)."""
        self.inner.iterations.assign_add(1)

    def flats(self):
        """(The master copy, [slots per shard] per slot) packed from the chief's Keras variables, as float32 numpy."""
        layout = self.state.layout
        pack = lambda variables: [f.numpy() for f in layout.pack([tf.convert_to_tensor(v) for v in variables])]  # noqa: E731
        return pack(self.master), [pack(slot) for slot in slot_variables(self.inner, self.rule)]

    def refresh(self) -> None:
        """The master copy and the slots read back from the ps tasks into the chief's Keras variables."""
        master, slots = self.state.update.read()
        layout = self.state.layout
        for v, value in zip(self.master, layout.unpack(master)):
            v.assign(value)
        for variables, flats in zip(slot_variables(self.inner, self.rule), slots):
            for v, value in zip(variables, layout.unpack(flats)):
                v.assign(value)


def hyper_feed(placeholders: Dict[str, tf.Tensor], values: Optional[Dict[str, float]]) -> Dict:
    return {placeholders[k]: np.float32(v) for k, v in values.items()}
