"""The chief's start, pure (`tf_backup.chief.startup.decide`): one row per case, no cluster."""

import pytest
import test_imports  # tests/, on sys.path under pytest

from tf_backup.chief import startup
from tf_backup.chief.startup import RunningJob
from tf_backup.chief.startup import Start
from tf_backup.chief.startup import Startup

ROWS = [
    # checkpoint step, rejoined, the running job's state on the ps -> start, aggregator's first step
    pytest.param(0, False, None, Startup(Start.NEW_JOB, 0), id="new job"),
    pytest.param(40, False, None, Startup(Start.RESUME, 40), id="resume from a checkpoint"),
    # The job monitor rejoined a running job whose previous chief died before creating this state.
    pytest.param(0, True, None, Startup(Start.NEW_JOB, 0), id="rejoined, no state yet"),
    pytest.param(40, True, None, Startup(Start.RESUME, 40), id="rejoined, no state yet, a checkpoint"),
    # The job went on past the checkpoint: back to it; the workers' later gradients are dropped.
    pytest.param(40, True, RunningJob(step=57, finished=False), Startup(Start.REJOIN, 40), id="rejoin"),
    pytest.param(0, True, RunningJob(step=9, finished=False), Startup(Start.REJOIN, 0), id="rejoin, no checkpoint"),
    # A finished job is not redone: its last step, whatever the checkpoint.
    pytest.param(40, True, RunningJob(step=100, finished=True), Startup(Start.FINISH, 100), id="finish"),
    pytest.param(0, True, RunningJob(step=100, finished=True), Startup(Start.FINISH, 100), id="finish, no checkpoint"),
]


@pytest.mark.parametrize("checkpoint_step,rejoined,running,want", ROWS)
def test_the_chief_starts_as_the_table_says(checkpoint_step, rejoined, running, want):
    got = startup.decide(checkpoint_step, rejoined, running)
    assert got == want
    assert isinstance(got.start, Start)


def test_every_start_has_a_row():
    assert {row.values[-1].start for row in ROWS} == set(Start)


def test_only_the_starts_without_a_running_job_create_the_state():
    assert {s for s in Start if s.creates_state} == {Start.NEW_JOB, Start.RESUME}


def test_a_new_job_cannot_find_its_state_running():
    with pytest.raises(ValueError, match="new job"):
        startup.decide(40, False, RunningJob(step=57, finished=False))


def test_the_decision_imports_no_tensorflow():
    # Nor through a module it imports (the import rules' own walk, `tests/test_imports.py`).
    assert test_imports._third_party_through("tf_backup.chief.startup", {"tensorflow", "keras"}) == []
