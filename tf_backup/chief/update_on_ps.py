"""(Chief.) Its side of the update applied on the ps tasks (`apply_on_ps=True`): it reads Keras.

Which kernel applies the inner Keras optimizer's rule (`rule_for`; a
`ValueError` that names any other optimizer), the step's scalars as Keras's
`update_step` computes them (`hyper_values`), and `ChiefSide`: the chief's
Keras copy of the master and the slots, for checkpoints. The kernels, built
into a ps task's graph, are `tf_backup.ps.ps_update`, which imports no Keras.
"""

from typing import Dict, List, Optional

import keras
import tensorflow as tf

from tf_backup.ps.ps_update import Kind
from tf_backup.ps.ps_update import UpdateRule


def rule_for(inner) -> UpdateRule:
    """The rule of `inner` on the ps.

    Raises:
      ValueError: `inner` has no elementwise kernel here (the message names it and what to do).
    """
    reason = unsupported(inner)
    if reason is not None:
        raise ValueError(reason)
    if type(inner) is keras.optimizers.SGD:
        if float(inner.momentum) == 0.0:
            return UpdateRule(Kind.SGD, ())
        return UpdateRule(Kind.MOMENTUM, ("momentums",))
    return UpdateRule(Kind.ADAM, ("_momentums", "_velocities"))


def unsupported(inner) -> Optional[str]:
    """Why `inner` cannot be applied on the ps (what to do included); None if it can."""
    name = type(inner).__name__
    if type(inner) not in (keras.optimizers.SGD, keras.optimizers.Adam):
        return ("apply_on_ps=True supports keras.optimizers.SGD (with or without momentum) and "
                f"keras.optimizers.Adam: use apply_on_ps=False (the chief applies any optimizer). Received {name}")
    settings = [attr for attr in ("clipnorm", "clipvalue", "global_clipnorm", "weight_decay",
                                  "gradient_accumulation_steps", "loss_scale_factor")
                if getattr(inner, attr, None)]
    if getattr(inner, "use_ema", False):
        settings.append("use_ema")
    if type(inner) is keras.optimizers.Adam and getattr(inner, "amsgrad", False):
        settings.append("amsgrad")
    if settings:
        return (f"apply_on_ps=True applies the inner optimizer elementwise on flat shards, without "
                f"{', '.join(settings)}: leave them unset or use apply_on_ps=False. Received {name} with "
                + ", ".join(f"{a}={getattr(inner, a)!r}" for a in settings))
    return None


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


def slot_variables(inner, rule: UpdateRule) -> List[List]:
    """(Chief.) Per slot, the inner optimizer's Keras variables of it (one per model variable)."""
    return [list(getattr(inner, attr)) for attr in rule.slot_attrs]


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
