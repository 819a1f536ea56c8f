"""A ps task's lifecycle in `serve()`, pure (`tf_backup.ps.lifecycle.transition`): every transition, no cluster."""

import pytest
import test_imports  # tests/, on sys.path under pytest

from tf_backup.ps import lifecycle
from tf_backup.ps.lifecycle import EndReason
from tf_backup.ps.lifecycle import JobRead
from tf_backup.ps.lifecycle import NoAnswer
from tf_backup.ps.lifecycle import NoJob
from tf_backup.ps.lifecycle import Phase
from tf_backup.ps.lifecycle import Ps0Empty

SETTINGS = lifecycle.Settings(startup_timeout=600.0, chief_timeout=120.0, exit_grace=60.0, silent_worker=10.0,
                              ps_restart_timeout=30.0, chief_rejoins=False)
REJOINS = lifecycle.Settings(**{**SETTINGS.__dict__, "chief_rejoins": True})
JOB = 77


def job(job_id=JOB, done=False, aborted=False, joined=(1, 1, 1), left=(0, 0, 0), silence=(0.0, 0.0, 0.0),
        chief_silence=0.0) -> JobRead:
    return JobRead(job_id, done, aborted, tuple(map(bool, joined)), tuple(map(bool, left)), tuple(silence),
                   chief_silence)


def step(state, read, now, settings=SETTINGS):
    return lifecycle.transition(state, read, now, settings)


WAITING = lifecycle.waiting(now=0.0)
SERVING = step(WAITING, job(), now=1.0)
DONE = step(SERVING, job(done=True), now=100.0)  # ENDING: workers 0-2 have not left yet


class Probe:
    """`NoAnswer.listening`, counting its calls."""

    def __init__(self, listening: bool):
        self.listening, self.calls = listening, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.listening


def test_the_fixtures_phases():
    assert (WAITING.phase, SERVING.phase, DONE.phase) == (Phase.WAITING, Phase.SERVING, Phase.ENDING)


# -- WAITING ------------------------------------------------------------------------------------

def test_waiting_without_a_job_goes_on_waiting_until_startup_timeout():
    assert step(WAITING, NoJob(), now=600.0) == WAITING
    ended = step(WAITING, NoJob(), now=600.5)
    assert (ended.phase, ended.reason) == (Phase.ENDED, EndReason.NO_JOB)
    assert ended.reason.failed


def test_a_previous_jobs_finished_state_is_no_job():
    assert step(WAITING, job(done=True), now=5.0) == WAITING
    assert step(WAITING, job(done=True), now=601.0).reason is EndReason.NO_JOB


def test_a_job_that_starts_is_served():
    assert SERVING == lifecycle.Lifecycle(Phase.SERVING, started=0.0, job_id=JOB, joined=(True,) * 3,
                                          left=(False,) * 3)


# -- SERVING ------------------------------------------------------------------------------------

def test_serving_goes_on_while_the_chief_beats():
    assert step(SERVING, job(silence=(0.0, 50.0, 50.0), chief_silence=120.0), now=200.0) == SERVING


def test_the_chief_marking_the_job_done_ends_it():
    assert (DONE.reason, DONE.ended_at) == (EndReason.DONE, 100.0)
    assert not DONE.reason.failed


def test_the_chief_aborting_the_job_ends_it_failed():
    aborted = step(SERVING, job(done=True, aborted=True), now=100.0)
    assert (aborted.phase, aborted.reason) == (Phase.ENDING, EndReason.ABORTED)
    assert aborted.reason.failed


def test_a_silent_chief_is_lost():
    lost = step(SERVING, job(chief_silence=120.5), now=300.0)
    assert (lost.phase, lost.reason, lost.ended_at) == (Phase.ENDING, EndReason.CHIEF_LOST, 300.0)
    assert lost.reason.failed


def test_every_task_silent_or_gone_but_the_chief_not_left_loses_the_chief_at_once():
    gone = job(left=(0, 1, 0), silence=(11.0, 0.0, 11.0))  # worker 2 silent, worker 1 left, the chief silent
    lost = step(SERVING, gone, now=300.0)
    assert (lost.phase, lost.reason) == (Phase.ENDED, EndReason.CHIEF_LOST)  # nobody left to wait for


def test_with_chief_rejoins_the_chief_gets_chief_timeout_of_silence():
    gone = job(left=(0, 1, 1), silence=(11.0, 0.0, 0.0))
    assert step(SERVING, gone, now=300.0, settings=REJOINS).phase is Phase.SERVING
    lost = step(SERVING, gone._replace(chief_silence=121.0), now=400.0, settings=REJOINS)
    assert (lost.phase, lost.reason) == (Phase.ENDED, EndReason.CHIEF_LOST)


def test_a_worker_that_never_joined_is_not_waited_for():
    read = job(done=True, joined=(1, 0, 1), left=(1, 0, 1))
    ended = step(SERVING, read, now=100.0)
    assert (ended.phase, ended.reason) == (Phase.ENDED, EndReason.DONE)
    assert ended.never_left() == [] and ended.result().left == [0, 2]


def test_done_with_every_worker_left_ends_in_the_same_read():
    ended = step(SERVING, job(done=True, left=(1, 1, 1)), now=100.0)
    assert (ended.phase, ended.reason, ended.ended_at) == (Phase.ENDED, EndReason.DONE, 100.0)


# -- ENDING -------------------------------------------------------------------------------------

def test_ending_waits_for_the_workers_until_exit_grace():
    assert step(DONE, job(done=True, left=(1, 0, 0)), now=160.0).phase is Phase.ENDING
    ended = step(DONE, job(done=True, left=(1, 0, 0)), now=160.5)
    assert (ended.phase, ended.reason) == (Phase.ENDED, EndReason.DONE)
    assert ended.never_left() == [1, 2]


def test_ending_ends_once_every_worker_left_or_went_silent():
    ended = step(DONE, job(done=True, left=(1, 1, 0), silence=(0.0, 0.0, 10.5)), now=101.0)
    assert (ended.phase, ended.reason, ended.ended_at) == (Phase.ENDED, EndReason.DONE, 100.0)


def test_the_end_reason_is_kept_while_ending():
    lost = step(SERVING, job(chief_silence=121.0), now=300.0)
    later = step(lost, job(done=True), now=310.0)  # a DONE read later does not relabel a lost chief
    assert (later.reason, later.ended_at) == (EndReason.CHIEF_LOST, 300.0)


@pytest.mark.parametrize("before", ["serving", "ending"])
def test_a_new_job_is_served_from_the_start(before):
    state = SERVING if before == "serving" else DONE
    new = step(state, job(job_id=JOB + 1, joined=(1, 0, 0)), now=150.0)
    assert new == lifecycle.Lifecycle(Phase.SERVING, started=0.0, job_id=JOB + 1, joined=(True, False, False),
                                      left=(False,) * 3)


def test_no_job_read_while_serving_ends_only_past_startup_timeout():
    # As before the lifecycle was explicit: a read without a job counts from the start of serve().
    assert step(SERVING, NoJob(), now=500.0) == SERVING
    assert step(SERVING, NoJob(), now=601.0).reason is EndReason.NO_JOB


# -- another ps task: ps 0 does not answer ------------------------------------------------------

def test_ps0_restarting_within_ps_restart_timeout_is_waited_for_without_a_probe():
    probe = Probe(listening=False)
    first = step(SERVING, NoAnswer(probe), now=200.0)
    assert (first.phase, first.unanswered_since) == (Phase.SERVING, 200.0)
    assert step(first, NoAnswer(probe), now=229.0) == first
    assert probe.calls == 0


def test_ps0_that_still_accepts_connections_is_slow_not_gone():
    probe = Probe(listening=True)
    first = step(SERVING, NoAnswer(probe), now=200.0)
    assert step(first, NoAnswer(probe), now=300.0) == first  # past ps_restart_timeout, before chief_timeout
    assert probe.calls == 1


def test_ps0_gone_past_ps_restart_timeout_ends_serving():
    first = step(SERVING, NoAnswer(Probe(False)), now=200.0)
    ended = step(first, NoAnswer(Probe(False)), now=230.0)
    assert (ended.phase, ended.reason) == (Phase.ENDED, EndReason.PS0_EXITED)
    assert not ended.reason.failed and ended.result() == (JOB, "ps 0 exited", [])


def test_ps0_silent_for_chief_timeout_ends_serving_without_a_probe():
    probe = Probe(listening=True)
    first = step(SERVING, NoAnswer(probe), now=200.0)
    ended = step(first, NoAnswer(probe), now=320.0)
    assert (ended.phase, ended.reason, probe.calls) == (Phase.ENDED, EndReason.PS0_EXITED, 0)


def test_ps0_gone_after_the_job_ended_keeps_the_reason_and_does_not_wait_for_a_restart():
    probe = Probe(listening=False)
    ended = step(DONE, NoAnswer(probe), now=101.0)  # ps 0 exits once the job is done
    assert (ended.phase, ended.reason, probe.calls) == (Phase.ENDED, EndReason.DONE, 1)


# -- another ps task: ps 0 answers, but without the job vector (it restarted empty) -----------------

def test_ps0_back_empty_is_waited_for_within_ps_restart_timeout_then_its_rewrite_is_served():
    first = step(SERVING, Ps0Empty(), now=200.0)
    assert (first.phase, first.unanswered_since) == (Phase.SERVING, 200.0)
    assert step(first, Ps0Empty(), now=229.0) == first
    written_again = step(first, job(), now=229.5)
    assert (written_again.phase, written_again.job_id, written_again.unanswered_since) == (Phase.SERVING, JOB, None)


def test_ps0_down_then_back_empty_counts_ps_restart_timeout_from_when_it_went_down():
    down = step(SERVING, NoAnswer(Probe(False)), now=200.0)
    assert step(down, Ps0Empty(), now=229.0).phase is Phase.SERVING
    ended = step(step(down, Ps0Empty(), now=229.0), Ps0Empty(), now=230.0)
    assert (ended.phase, ended.reason, ended.unanswered_since) == (Phase.ENDED, EndReason.PS0_RESTARTED, 200.0)


def test_ps0_back_empty_without_ps_restart_timeout_ends_the_task_failed_at_once():
    no_restarts = lifecycle.Settings(**{**SETTINGS.__dict__, "ps_restart_timeout": 0.0})
    ended = step(SERVING, Ps0Empty(), now=200.0, settings=no_restarts)
    assert (ended.phase, ended.reason) == (Phase.ENDED, EndReason.PS0_RESTARTED)
    assert ended.reason.failed  # non-zero: a cluster manager restarts it with the job's next attempt


def test_ps0_back_empty_after_the_job_ended_keeps_the_reason():
    ended = step(DONE, Ps0Empty(), now=101.0)
    assert (ended.phase, ended.reason) == (Phase.ENDED, EndReason.DONE)


def test_ps0_back_empty_is_read_only_once_a_job_runs():
    with pytest.raises(ValueError, match="serves a job"):
        step(WAITING, Ps0Empty(), now=1.0)


def test_an_answer_clears_the_silence_of_ps0():
    first = step(SERVING, NoAnswer(Probe(False)), now=200.0)
    assert step(first, job(), now=201.0).unanswered_since is None
    assert step(first, NoJob(), now=201.0).unanswered_since is None


# -- what cannot happen --------------------------------------------------------------------------

def test_nothing_is_read_after_the_end():
    ended = step(WAITING, NoJob(), now=601.0)
    with pytest.raises(ValueError, match="ended"):
        step(ended, job(), now=602.0)


def test_ps0_is_read_with_a_deadline_only_once_a_job_runs():
    with pytest.raises(ValueError, match="serves a job"):
        step(WAITING, NoAnswer(Probe(True)), now=1.0)


# -- the result -----------------------------------------------------------------------------------

def test_the_result_is_typed_and_reads_as_before():
    ended = step(DONE, job(done=True, left=(1, 1, 1)), now=101.0)
    result = ended.result()
    assert result == lifecycle.ServeResult(job_id=JOB, reason=EndReason.DONE, left=[0, 1, 2])
    assert result.reason == "done" and isinstance(result.reason, EndReason)


def test_serve_raises_for_the_failed_ends():
    assert {r for r in EndReason if r.failed} == {EndReason.PS0_RESTARTED, EndReason.ABORTED, EndReason.CHIEF_LOST,
                                                  EndReason.NO_JOB}


def test_the_lifecycle_imports_no_tensorflow():
    # Nor through a module it imports (the import rules' own walk, `tests/test_imports.py`).
    assert test_imports._third_party_through("tf_backup.ps.lifecycle", {"tensorflow", "keras"}) == []
