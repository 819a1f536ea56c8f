"""Staleness: whether what a worker read, or is about to push, still belongs to the current step; no I/O.

A pull is consistent under the seqlock of STEP and VERSION (`consistent`); a
gradient tagged with a step the chief took or published is late
(`step_passed`, `already_taken`), and where steps are taken without every
worker a worker checks before it pushes (`checks_before_push`).
"""

from tf_backup.protocol.config import ProtocolConfig
from tf_backup.protocol.slots import ControlView


def consistent(before: ControlView, after: ControlView) -> bool:
    """The seqlock: parameters read between `before` and `after` belong to step `before.step`."""
    return before.step == before.version == after.version


def step_passed(ctl: ControlView, tag: int) -> bool:
    """Whether the global step moved past `tag` (a gradient tagged `tag` was taken or is stale)."""
    return ctl.step > tag


def already_taken(ctl: ControlView, tag: int) -> bool:
    """Whether a gradient tagged `tag` would be dropped: its step was taken (TAKEN_FOR) or published (STEP).

    TAKEN_FOR counts only while it is the step being published (`step + 1`): a
    state the chief wrote again (a rejoin) clears it, and older values are moot.
    """
    return ctl.step > tag or (ctl.taken_for == ctl.step + 1 and ctl.taken_for > tag)


def checks_before_push(config: ProtocolConfig) -> bool:
    """Whether a worker reads the control vector before each push, so as not to send a gradient already late.

    Only where a step can be taken without this worker (b > 0, or an adaptive
    N): with b = 0 every step waits for every worker, and the read would only
    cost a round trip.
    """
    return config.staleness_check and (config.adaptive is not None
                                       or config.replicas_to_aggregate < config.num_workers)
