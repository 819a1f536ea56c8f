"""Membership (`tf_backup.protocol.membership`): too few workers, the kinds of worker events."""

import json
import pickle

from tf_backup.protocol import membership
from tf_backup.protocol.membership import WorkerEventKind


def test_too_few_workers_needs_a_dead_one_not_only_workers_that_left():
    assert membership.lost_workers(num_workers=3, needed=2, gone={1, 2}, dead={2})  # 1 of 3 left, 2 needed
    assert not membership.lost_workers(num_workers=3, needed=2, gone={2}, dead={2})  # 2 alive: enough
    assert not membership.lost_workers(num_workers=3, needed=2, gone={1, 2}, dead=set())  # they left: the fit ended


def test_a_worker_event_kind_reads_prints_and_serialises_as_the_string_it_was():
    died = WorkerEventKind.DIED
    assert died == "died" and WorkerEventKind.REJOINED == "rejoined" and WorkerEventKind("died") is died
    assert str(died) == f"{died}" == "%s" % died == "died"  # logs and user f-strings print the word
    assert json.dumps({"event": died}) == '{"event": "died"}'
    assert pickle.loads(pickle.dumps(died)) is died  # a local cluster's results come back pickled
