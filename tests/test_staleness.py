"""Staleness (`tf_backup.protocol.staleness`): the seqlock, a gradient already late, checks before a push."""

import dataclasses

from tf_backup.protocol import config as config_lib
from tf_backup.protocol import staleness

from tests.controls import control


def test_the_seqlock_accepts_only_an_unchanged_version():
    assert staleness.consistent(control(step=3, version=3), control(step=3, version=3))
    assert not staleness.consistent(control(step=3, version=4), control(step=4, version=4))  # a publish ran
    assert not staleness.consistent(control(step=3, version=3), control(step=3, version=4))  # one began after


def test_a_gradient_is_already_taken_once_its_step_is_taken_or_published():
    assert not staleness.already_taken(control(step=3), 3)  # step 3 is being gathered
    assert staleness.already_taken(control(step=3, taken_for=4), 3)  # taken, not yet published
    assert staleness.already_taken(control(step=4, taken_for=4), 3)  # published
    assert not staleness.already_taken(control(step=4, taken_for=4), 4)
    # A TAKEN_FOR that is not the step being published (left by an earlier state, or cleared) says nothing.
    assert not staleness.already_taken(control(step=2, taken_for=7), 3)


def test_only_clusters_that_take_steps_without_every_worker_read_before_a_push():
    sync = config_lib.ProtocolConfig(replicas_to_aggregate=4, num_workers=4)
    assert not staleness.checks_before_push(sync)  # b = 0: never late, the read would only cost
    assert staleness.checks_before_push(dataclasses.replace(sync, replicas_to_aggregate=3))
    assert staleness.checks_before_push(
        dataclasses.replace(sync, adaptive=config_lib.AdaptiveSettings(n_min=2, n_max=4)))
    assert not staleness.checks_before_push(dataclasses.replace(sync, replicas_to_aggregate=1, staleness_check=False))
