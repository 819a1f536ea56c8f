"""Control views for the protocol's pure tests: `control(step=3, pushed=[1, 0], ...)`."""

import numpy as np

from tf_backup.protocol import slots
from tf_backup.protocol.slots import Block


def control(num_workers=2, **named):
    """A control view with the named header slots set (`step=3, round=2, ...`)."""
    c = slots.Control(num_workers)
    values = np.zeros([c.size], np.int64)
    for name, value in named.items():
        if name.upper() in Block.__members__:
            for w, v in enumerate(value):
                values[getattr(c, name)(w)] = v
        else:
            values[getattr(slots.Control, name.upper())] = value
    return c.view(values)
