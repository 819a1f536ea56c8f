"""The slot maps of the control and job vectors (`tf_backup.protocol.slots`): no overlap, named reads, blocks."""

import numpy as np

from tf_backup.protocol import pushes
from tf_backup.protocol import slots
from tf_backup.protocol.slots import Block


def test_control_slots_do_not_overlap():
    c = slots.Control(num_workers=3)
    used = [slots.Control.STEP, slots.Control.VERSION, slots.Control.ROUND,
            slots.Control.STOP_ROUND, slots.Control.LAST_TAKEN, slots.Control.FINISHED]
    for block in (c.taken, c.pushed, c.dropped, c.last_tag, c.ended, c.cancelled):
        used += [block(w) for w in range(3)]
    assert len(set(used)) == len(used) and max(used) < c.size
    job_slots = slots.Job(3)
    job = [slots.Job.JOB_ID, slots.Job.DONE, slots.Job.ABORT, slots.Job.HEARTBEAT]
    job += [f(w) for f in (job_slots.joined, job_slots.left, job_slots.beat) for w in range(3)]
    assert len(set(job)) == len(job) and max(job) < job_slots.size


def test_the_control_view_reads_slots_by_name():
    c = slots.Control(num_workers=3)
    values = np.zeros([c.size], np.int64)
    values[slots.Control.STEP], values[slots.Control.VERSION], values[slots.Control.CLOSED] = 5, 6, 2
    values[c.pushed(1)], values[c.last_tag(1)], values[c.dropped(2)] = 4, 5, 7
    ctl = c.view(values)
    assert (ctl.step, ctl.version, ctl.closed, ctl.finished) == (5, 6, 2, False)
    assert ctl.block(Block.PUSHED).tolist() == [0, 4, 0] and ctl.block(Block.DROPPED).tolist() == [0, 0, 7]
    assert ctl.last_steps() == [-1, 5, -1] and pushes.fresh_workers(ctl) == [1]


# The blocks' order on the ps before they were an enum (`Control.BLOCKS`, names as strings).
BLOCKS_BY_NAME = ("taken", "pushed", "dropped", "last_tag", "ended", "cancelled", "compute_us", "batches")


def test_every_block_maps_to_the_slots_it_had_by_name():
    c = slots.Control(num_workers=3)
    assert [b.name.lower() for b in Block] == list(BLOCKS_BY_NAME)
    assert sorted(b.value for b in Block) == list(range(len(BLOCKS_BY_NAME))) and c.size == 14 + 8 * 3
    ctl = c.view(np.arange(c.size, dtype=np.int64) * 10)
    assert ctl.slow == (100, 110, 120, 130)  # the header's 4 SLOW slots, before the blocks
    for place, name in enumerate(BLOCKS_BY_NAME):
        block = Block[name.upper()]
        expected = [slots.Control.HEADER + place * 3 + w for w in range(3)]
        assert [c.slot(block, w) for w in range(3)] == expected
        assert [getattr(c, name)(w) for w in range(3)] == expected  # the named accessor agrees
        assert ctl.block(block).tolist() == [10 * slot for slot in expected]
